"""Whole live migrations in one process: every channel count, plain pre-copy,
zlib and zstd, tcp and unix, with a workload writing throughout; the
destination's memory must equal the source's, frozen since switchover."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable

import numpy as np
import pytest
from e2e_support import TRANSPORTS, MiB, Migration, write_pages

LIVE_RATE = 32 * MiB  # bytes per second the workload rewrites: 4 blocks a second
# Pages the test itself rewrites between rounds, so that every migration has
# writes after round 1, whatever the workload manages to do meanwhile.
BETWEEN_ROUNDS = np.arange(5, 2048, 37)

CASES = [
    *[(transport, channels, "none") for transport in TRANSPORTS for channels in (1, 2, 4, 8)],
    *[(transport, 0, "none") for transport in TRANSPORTS],  # plain pre-copy
    *[(transport, 4, method) for transport in TRANSPORTS for method in ("zlib", "zstd")],
]


def _options(channels: int, compression: str) -> dict:
    if not channels:
        return {"capabilities": {"multifd": False}}
    return {
        "parameters": {"multifd-channels": channels, "multifd-compression": compression},
    }


def _write_while_active(m: Migration) -> Callable[[int], None]:
    def on_pass(n: int) -> None:
        if not m.stopped:
            write_pages(m.src_blocks[0], BETWEEN_ROUNDS)

    return on_pass


@pytest.mark.parametrize(("transport", "channels", "compression"), CASES)
def test_live_migration(
    migration: Callable[..., Migration], transport: str, channels: int, compression: str
) -> None:
    m = migration(transport=transport, workload_rate=LIVE_RATE, **_options(channels, compression))
    m.on_pass = _write_while_active(m)
    src, dst = m.assert_completed()

    assert m.statuses("source") == ["setup", "active", "completed"]
    assert m.statuses("destination") == ["setup", "active", "completed"]
    assert m.stops == 1 and m.source_resumes == 0
    assert src["x-rounds"] >= 1
    assert dst["x-rounds"] == src["ram"]["dirty-sync-count"]  # one EOS per sync
    assert len(src["x-multifd-channels"]) == channels
    assert [c["id"] for c in dst["x-multifd-channels"]] == list(range(channels))
    for side, ram in ((src, src["ram"]), (dst, dst["x-ram"])):
        assert ram["transferred"] > 0
        for channel in side["x-multifd-channels"]:
            assert channel["error"] is None
            assert channel["sync-packets"] == src["ram"]["dirty-sync-count"]
    # Both ends counted the same pages, and the same bytes on the channels.
    for key in ("normal", "duplicate", "multifd-bytes", "transferred"):
        assert src["ram"][key] == dst["x-ram"][key], key
    if channels:
        assert src["ram"]["multifd-bytes"] > 0
        assert sum(c["pages"] for c in src["x-multifd-channels"]) == src["ram"]["normal"]
    else:
        assert src["ram"]["multifd-bytes"] == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_several_blocks(migration: Callable[..., Migration], transport: str) -> None:
    """Blocks of different sizes, one of a single page: a packet never mixes
    blocks, and each lands in the block of its name."""
    m = migration(
        transport=transport,
        sizes=(4 * MiB, 4096, 12 * MiB),
        parameters={"multifd-channels": 3},
        workload_rate=LIVE_RATE,
    )

    def on_pass(n: int) -> None:
        if not m.stopped:
            for block in m.src_blocks:
                write_pages(block, [0, block.pages - 1])

    m.on_pass = on_pass
    src, _ = m.assert_completed()
    assert src["ram"]["total"] == 16 * MiB + 4096


def test_same_endpoints_migrate_again(migration: Callable[..., Migration]) -> None:
    """A completed migration leaves nothing behind: the same source, destination,
    blocks and port migrate again (the workload wrote in between)."""
    m = migration(parameters={"multifd-channels": 2}, workload_rate=LIVE_RATE)
    m.assert_completed()
    first_port = m.uri
    m.workload.resume()
    write_pages(m.src_blocks[0], BETWEEN_ROUNDS)
    m.assert_completed()
    assert m.uri == first_port
    assert m.statuses("source").count("completed") == 2


def test_pages_are_spread_over_every_channel(migration: Callable[..., Migration]) -> None:
    """Batches go to the least loaded channel, ties taken in turn: no channel
    idles while another carries the migration."""
    m = migration(sizes=(32 * MiB,), parameters={"multifd-channels": 4})
    src, dst = m.assert_completed()
    pages = [c["pages"] for c in src["x-multifd-channels"]]
    assert sum(pages) == src["ram"]["normal"]
    assert min(pages) >= sum(pages) // 8, pages  # a fair share is a quarter
    assert [c["pages"] for c in dst["x-multifd-channels"]] == pages


def test_switchover_imports_nothing() -> None:
    """The switchover runs with the workload stopped: a module imported on
    first use there (numpy's unique imports numpy.ma: 20 to 60 ms) would be
    downtime of a process's first migration that no estimate foresaw. A fresh
    interpreter shows it."""
    script = textwrap.dedent(
        """
        import sys
        from multifd import MigrationDestination, MigrationSource, RAMBlock
        from multifd.demo.workload import fill
        from multifd.migration import source as source_module

        imported = []
        complete = source_module.MigrationSource._complete

        def watched(self, *args):
            before = set(sys.modules)
            try:
                return complete(self, *args)
            finally:
                imported.extend(sorted(set(sys.modules) - before))

        source_module.MigrationSource._complete = watched
        block = RAMBlock.anonymous("pc.ram", 1 << 20)
        fill(block.array)
        dst = MigrationDestination(
            [RAMBlock.anonymous("pc.ram", 1 << 20)], capabilities={"multifd": True}
        )
        src = MigrationSource([block], capabilities={"multifd": True})
        src.migrate(dst.incoming("tcp:127.0.0.1:0"))
        print(src.wait(30)["status"], dst.wait(30)["status"], imported)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["completed", "completed", "[]"], done.stdout + done.stderr
