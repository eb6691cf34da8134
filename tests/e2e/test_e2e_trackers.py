"""Every dirty tracker in a whole migration, against a known write pattern made
between rounds: exactly those pages travel again, and memory ends identical."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from e2e_support import Migration, write_pages

from multifd.memory import KernelTracker

# Two disjoint patterns: pass 1 (setup, before round 1) and pass 2 (after it).
# Whether the second is sent in a round of its own or at switchover, every
# page of it travels once more after round 1, and no other page does, but those
# of the first with a tracker set up at once (hash, explicit): the kernel
# tracker starts each range only when round 1 reaches it, so a page written
# before round 1 read it travels once.
FIRST = np.array([0, 3, 7, *range(100, 121), 2047])
SECOND = np.array([1, 500, *range(1000, 1010)])
# Data pages made zero at pass 2 travel again as ZERO records.
ZEROED_COUNT = 3


def _data_pages(m: Migration, count: int) -> np.ndarray:
    """The first data (non-zero) pages outside both patterns."""
    rows = m.src_blocks[0].page_rows(np.uint64)
    data = np.flatnonzero(np.any(rows != 0, axis=1))
    return np.setdiff1d(data, np.concatenate((FIRST, SECOND)))[:count]


def _write_pattern(m: Migration, mark: bool, zeroed: np.ndarray) -> Callable[[int], None]:
    block = m.src_blocks[0]
    rows = block.page_rows()

    def on_pass(n: int) -> None:
        if n == 1:
            write_pages(block, FIRST)
            if mark:
                for page in FIRST.tolist():
                    block.mark_dirty(page * 4096 + 8, 1)
        elif n == 2 and not m.stopped:
            write_pages(block, SECOND)
            rows[zeroed] = 0
            if mark:
                for page in [*SECOND.tolist(), *zeroed.tolist()]:
                    block.mark_dirty(page * 4096, 4096)

    return on_pass


@pytest.mark.parametrize("tracker", ["kernel", "hash", "explicit", "auto"])
def test_tracker_sees_the_write_pattern(migration: Callable[..., Migration], tracker: str) -> None:
    if tracker == "kernel" and (reason := KernelTracker.probe()) is not None:
        pytest.skip(f"kernel dirty tracking unavailable: {reason}")
    m = migration(parameters={"multifd-channels": 2, "x-dirty-tracker": tracker})
    zeroed = _data_pages(m, ZEROED_COUNT)
    m.on_pass = _write_pattern(m, mark=tracker == "explicit", zeroed=zeroed)
    src, dst = m.assert_completed()

    expected = (
        tracker if tracker != "auto" else "kernel" if KernelTracker.probe() is None else "hash"
    )
    assert src["x-dirty-tracker"] == {"pc.ram": expected}
    pages = m.src_blocks[0].pages
    again = len(SECOND) + ZEROED_COUNT + (len(FIRST) if expected != "kernel" else 0)
    ram = src["ram"]
    assert ram["normal"] + ram["duplicate"] == pages + again, ram
    assert (ram["normal"], ram["duplicate"]) == (dst["x-ram"]["normal"], dst["x-ram"]["duplicate"])


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_shared_memory_sources_arrive_whole(migration: Callable[..., Migration], kind: str) -> None:
    """A memfd or file block under the kernel tracker, its pages lent to unix
    sockets and hashed for x-verify: the writes between rounds travel again,
    and memory ends identical."""
    if (reason := KernelTracker.probe()) is not None:
        pytest.skip(f"kernel dirty tracking unavailable: {reason}")
    m = migration(
        transport="unix",
        source_kind=kind,
        capabilities={"x-verify": True},
        parameters={"multifd-channels": 2, "x-dirty-tracker": "kernel"},
    )
    zeroed = _data_pages(m, ZEROED_COUNT)
    m.on_pass = _write_pattern(m, mark=False, zeroed=zeroed)
    src, dst = m.assert_completed()
    assert src["x-dirty-tracker"] == {"pc.ram": "kernel"}
    ram = src["ram"]
    assert ram["normal"] + ram["duplicate"] == m.src_blocks[0].pages + len(SECOND) + ZEROED_COUNT
    assert dst["x-ram"]["normal"] == ram["normal"]


def test_explicit_tracker_sees_only_marked_writes(migration: Callable[..., Migration]) -> None:
    """With explicit marking, a write the application does not report stays
    behind: proof that the tracker asked for is the one at work."""
    m = migration(parameters={"multifd-channels": 2, "x-dirty-tracker": "explicit"})
    block = m.src_blocks[0]

    def on_pass(n: int) -> None:
        if n == 2 and not m.stopped:  # after round 1 sent every page
            write_pages(block, [10, 11])
            block.mark_dirty(10 * 4096, 1)  # page 11 is written but not marked

    m.on_pass = on_pass
    src, dst = m.run()
    assert src["status"] == dst["status"] == "completed"
    differ = np.flatnonzero(np.any(block.page_rows() != m.dst_blocks[0].page_rows(), axis=1))
    assert differ.tolist() == [11]
