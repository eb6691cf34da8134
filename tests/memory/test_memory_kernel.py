"""The kernel tracker's own cases: unaligned application buffers, writes made by
the kernel, scans that fill the region vector, and a block taken twice."""

from __future__ import annotations

import errno
import socket
import threading

import numpy as np
import pytest
from memory_support import (
    PATTERN,
    BlockMaker,
    MiB,
    anonymous_thp_mode,
    mapping_fields,
    present_pages,
    write_pages,
)

from multifd.memory import PAGE_SIZE, KernelTracker, RAMBlock, TrackerUnavailable
from multifd.memory.tracking import kernel as kernel_module

pytestmark = pytest.mark.usefixtures("kernel_tracking")


def test_probe_says_it_works_here() -> None:
    assert KernelTracker.probe() is None


def test_unaligned_buffer_reports_every_written_page() -> None:
    # An application's buffer may start inside a page, so each block page straddles two
    # real pages: the tracker reports a written page and, at most, its neighbour below.
    # The first and last real pages also hold other heap data, whose writes mark the
    # first and last block pages: conservative, never a missed page.
    memory = np.zeros(2 * MiB + PAGE_SIZE, dtype=np.uint8)
    offset = (100 - memory.ctypes.data) % PAGE_SIZE
    window = memory[offset : offset + 2 * MiB]
    with RAMBlock.from_buffer("app", window) as block, KernelTracker(block) as tracker:
        assert block.address % PAGE_SIZE == 100
        tracker.start()
        write_pages(block, PATTERN)
        edges = {0, block.pages - 1}
        reported = set(tracker.collect().indices().tolist())
        written = set(PATTERN.tolist())
        assert written <= reported <= written | {page - 1 for page in written} | edges
        assert set(tracker.collect().indices().tolist()) <= edges


def test_writes_by_the_kernel_are_seen(make_block: BlockMaker) -> None:
    block = make_block("anonymous", MiB)
    left, right = socket.socketpair()
    with left, right, KernelTracker(block) as tracker:
        tracker.start()
        left.sendall(b"x" * (2 * PAGE_SIZE))
        assert right.recv_into(block.page(40, count=2)) == 2 * PAGE_SIZE
        assert tracker.collect().indices().tolist() == [40, 41]


def test_huge_pages_are_tracked_page_by_page() -> None:
    # Anonymous blocks ask for transparent huge pages. Protecting a huge page
    # protects 2 MiB at once; the first write to it must split it, so that one
    # written 4 KiB page is reported, not the 511 around it.
    if anonymous_thp_mode() == "never":
        pytest.skip("transparent huge pages are off in this kernel")
    with RAMBlock.anonymous("huge", 8 * MiB) as block:
        block.array[:] = 1  # huge pages in, as a running workload has them
        if mapping_fields(block)["AnonHugePages"] == "0 kB":
            pytest.skip("no huge page free to back the block")
        with KernelTracker(block) as tracker:
            tracker.start()
            _writes_are_reported_exactly(block, tracker)


def _writes_are_reported_exactly(block: RAMBlock, tracker: KernelTracker) -> None:
    rng = np.random.default_rng(7)
    for round_ in range(3):
        pages = np.unique(rng.integers(0, block.pages, 40))
        write_pages(block, pages)
        assert tracker.collect().indices().tolist() == pages.tolist(), f"round {round_}"


def test_scans_larger_than_the_region_vector_go_on_from_walk_end(
    make_block: BlockMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_module, "_REGIONS_PER_SCAN", 5)
    block = make_block("memfd", MiB)
    with KernelTracker(block) as tracker:
        tracker.start()
        every_third = np.arange(0, block.pages, 3)  # 86 separate regions
        write_pages(block, every_third)
        assert np.array_equal(tracker.collect().indices(), every_third)
        write_pages(block, np.arange(block.pages))  # one region covering everything
        assert tracker.collect().count() == block.pages


def test_a_block_cannot_be_tracked_twice(make_block: BlockMaker) -> None:
    block = make_block("anonymous", MiB, name="pc.ram")
    with KernelTracker(block), pytest.raises(TrackerUnavailable) as failure:
        KernelTracker(block)
    assert failure.value.errno == errno.EBUSY
    assert str(failure.value).startswith(
        "RAMBlock 'pc.ram': kernel dirty tracking: UFFDIO_REGISTER"
    )
    with KernelTracker(block) as tracker:  # free again once the first one closed
        tracker.start()


def test_closing_after_the_block_is_gone_is_fine(make_block: BlockMaker) -> None:
    block = make_block("anonymous", MiB)
    tracker = KernelTracker(block)
    tracker.start()
    block.close()
    tracker.close()


@pytest.mark.parametrize("kind", ["anonymous", "memfd"])
def test_lazy_start_tracks_each_range_once_covered(
    make_block: BlockMaker, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After start(lazy=True) a range is tracked from its cover() on: a write
    before that is not reported (the round reads the page afterwards), one after
    it is; whatever no cover() reached counts as written at the next collect,
    and from then on the whole block is tracked. (No helper covering ahead
    here: the next test has it.)"""
    monkeypatch.setattr(kernel_module, "_COVER_AHEAD", 0)
    block = make_block(kind, MiB)  # 256 pages
    with KernelTracker(block) as tracker:
        tracker.start(lazy=True)
        write_pages(block, [3, 200])  # before any cover: the round will read them
        tracker.cover(0, 100)
        write_pages(block, [5, 99])  # covered: tracked
        tracker.cover(50, 100)  # overlapping and out of order: extends to page 150
        write_pages(block, [120])
        first = tracker.collect().indices()
        assert first.tolist() == [5, 99, 120, *range(150, block.pages)]
        write_pages(block, [7, 250])
        assert tracker.collect().indices().tolist() == [7, 250]
        tracker.cover(0, block.pages)  # nothing left to do
        assert tracker.collect().indices().tolist() == []


def _helpers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("tracker-")]


def test_a_helper_covers_ahead_of_the_round(
    make_block: BlockMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cover() also starts a helper thread that sets up the next range, so that
    the round does not wait for it: those pages are then tracked, not counted
    as written; the helper is joined by the next cover, collect or close."""
    monkeypatch.setattr(kernel_module, "_COVER_AHEAD", 64 * PAGE_SIZE)
    block = make_block("anonymous", MiB)  # 256 pages
    with KernelTracker(block) as tracker:
        tracker.start(lazy=True)
        tracker.cover(0, 10)  # pages 0-9 now, 10-73 by the helper
        assert tracker.collect().indices().tolist() == list(range(74, block.pages))
        assert _helpers() == []
        write_pages(block, [5, 40, 73, 200])
        assert tracker.collect().indices().tolist() == [5, 40, 73, 200]
    with KernelTracker(block) as tracker:
        tracker.start(lazy=True)
        tracker.cover(0, 1)
    assert _helpers() == []  # close() joined it


def test_what_the_helper_raises_comes_out_of_the_next_call(
    make_block: BlockMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kernel_module, "_COVER_AHEAD", 64 * PAGE_SIZE)
    protect = KernelTracker._protect

    def failing_in_the_helper(self: KernelTracker, base: int, end: int) -> None:
        if threading.current_thread().name.startswith("tracker-"):
            raise OSError(errno.ENOMEM, "RAMBlock 'ram': UFFDIO_WRITEPROTECT: out of memory")
        protect(self, base, end)

    monkeypatch.setattr(KernelTracker, "_protect", failing_in_the_helper)
    block = make_block("anonymous", MiB)
    with KernelTracker(block) as tracker:
        tracker.start(lazy=True)
        tracker.cover(0, 10)
        with pytest.raises(OSError, match="UFFDIO_WRITEPROTECT: out of memory"):
            tracker.cover(0, 200)
    assert _helpers() == []


@pytest.mark.parametrize("kind", ["memfd", "shm-file"])
def test_file_and_memfd_blocks_are_read_through_an_alias(make_block: BlockMaker, kind: str) -> None:
    """Under uffd-wp a first read faults a page at a time: the pages are read
    through an alias instead, and the tracker neither maps in the block's
    pages nor needs them mapped to see every write."""
    block = make_block(kind, MiB)
    with KernelTracker(block) as tracker:
        reader = tracker.reader
        assert reader is not block and reader.address != block.address
        tracker.start()
        assert present_pages(block) == 0
        assert int(reader.page_rows(np.uint64)[:, 0].sum()) == 0  # read it all
        assert present_pages(block) == 0
        write_pages(block, PATTERN)
        assert np.array_equal(tracker.collect().indices(), PATTERN)
        assert np.array_equal(reader.page_rows()[PATTERN, 0], block.page_rows()[PATTERN, 0])
    assert reader.closed and not block.closed


@pytest.mark.parametrize("kind", ["memfd", "shm-file"])
def test_pages_this_process_has_mapped_are_read_in_place(make_block: BlockMaker, kind: str) -> None:
    """A workload in this process has its pages mapped already: reading them
    in place costs no fault, where the alias would map each of them again."""
    block = make_block(kind, MiB)  # 256 pages
    block.page_rows()[:128, 0] = 1  # the first half written, so mapped in
    with KernelTracker(block) as tracker:
        tracker.start()
        assert tracker.reader_for(0, 128) is block
        assert tracker.reader_for(8, 16) is block
        # Mapped but for one page in 16: in place still; any fewer: the alias.
        assert tracker.reader_for(113, 16) is block
        assert tracker.reader_for(112, 32) is tracker.reader is not block
        assert tracker.reader_for(128, 128) is tracker.reader
        before = present_pages(tracker.reader)
        int(tracker.reader_for(0, 128).page_rows(np.uint64)[:128, 0].sum())
        assert present_pages(tracker.reader) == before  # nothing mapped twice
        write_pages(block, PATTERN)
        assert np.array_equal(tracker.collect().indices(), PATTERN)


@pytest.mark.parametrize("kind", ["anonymous", "shared-anonymous"])
def test_other_blocks_are_read_in_place_mapped_in_first(make_block: BlockMaker, kind: str) -> None:
    block = make_block(kind, MiB)
    with KernelTracker(block) as tracker:
        assert tracker.reader is block
        tracker.start()
        assert present_pages(block) == block.pages
        assert tracker.reader_for(0, block.pages) is block
        write_pages(block, PATTERN)
        assert np.array_equal(tracker.collect().indices(), PATTERN)
