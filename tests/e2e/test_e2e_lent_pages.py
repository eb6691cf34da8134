"""Pages lent to unix sockets (see channels/splice.py) are read from the
source's memory when the destination reads them: the source reports
`completed` only once every channel has been read, so the application may
write its memory again from that moment on."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from e2e_support import MiB, Migration

from multifd.migration.multifd_recv import MultifdReceiver


@pytest.mark.parametrize("channels", [1, 3])
def test_memory_written_after_completed_does_not_reach_the_destination(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch, channels: int
) -> None:
    m = migration(transport="unix", sizes=(24 * MiB,), parameters={"multifd-channels": channels})
    digests = [b.sha256() for b in m.src_blocks]
    # A destination slow to read: its socket buffers still hold the last
    # packets when the source has written everything.
    receive_one = MultifdReceiver._receive_one

    def slow(self: MultifdReceiver, rc: object) -> bool:
        time.sleep(0.002)
        return receive_one(self, rc)  # type: ignore[arg-type]

    monkeypatch.setattr(MultifdReceiver, "_receive_one", slow)

    def on_status(status: str) -> None:
        if status == "completed":  # at once, in the migration thread
            for block in m.src_blocks:
                block.array[:] = 0x5A

    m.on_status = on_status
    src, dst = m.run()
    assert (src["status"], dst["status"]) == ("completed", "completed")
    assert [b.sha256() for b in m.dst_blocks] == digests
    assert all((b.array == 0x5A).all() for b in m.src_blocks)
