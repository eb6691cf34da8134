"""Every tracker against a known write pattern, a concurrent writer (a shadow copy
kept from collected pages must equal memory), marks, lifecycle, fds, and choosing."""

from __future__ import annotations

import threading
import time

import numpy as np
import numpy.typing as npt
import pytest
from memory_support import ALL_KINDS, KERNEL_KINDS, PATTERN, BlockMaker, MiB, open_fds, write_pages

from multifd.memory import (
    PAGE_SIZE,
    DirtyTracker,
    ExplicitTracker,
    HashTracker,
    KernelTracker,
    RAMBlock,
    TrackerBase,
    TrackerUnavailable,
    choose_tracker,
    page_hashes,
    verify_keys,
)
from multifd.memory.tracking import hashing

TRACKERS = {"kernel": KernelTracker, "hash": HashTracker, "explicit": ExplicitTracker}
CASES = [
    *[("kernel", kind) for kind in (*KERNEL_KINDS, "mmap")],
    *[("hash", kind) for kind in ALL_KINDS],
    *[("explicit", kind) for kind in ("anonymous", "bytearray")],
]


def make_tracker(request: pytest.FixtureRequest, name: str, block: RAMBlock) -> TrackerBase:
    if name == "kernel":
        request.getfixturevalue("kernel_tracking")
    tracker = TRACKERS[name](block)
    request.addfinalizer(tracker.close)
    return tracker


def write(tracker: TrackerBase, pages: npt.ArrayLike) -> None:
    write_pages(tracker.block, pages)
    if tracker.name == "explicit":
        for page in np.asarray(pages):
            tracker.block.mark_dirty(int(page) * PAGE_SIZE, 1)


@pytest.mark.parametrize(("tracker_name", "kind"), CASES)
def test_known_pattern_is_reported_exactly(
    request: pytest.FixtureRequest, make_block: BlockMaker, tracker_name: str, kind: str
) -> None:
    block = make_block(kind, 2 * MiB)
    tracker = make_tracker(request, tracker_name, block)
    assert isinstance(tracker, DirtyTracker) and tracker.name == tracker_name
    write_pages(block, [1, 2, 200])  # before start(): forgotten
    tracker.start()
    assert tracker.collect().count() == 0
    write(tracker, PATTERN)
    dirty = tracker.collect()
    assert dirty.pages == block.pages
    assert dirty.indices().tolist() == PATTERN.tolist()
    assert tracker.collect().count() == 0  # nothing new since the last collect
    write(tracker, PATTERN[::4])
    assert tracker.collect().indices().tolist() == PATTERN[::4].tolist()  # rewrites seen again
    write(tracker, [0, 511])
    tracker.start()  # a new start forgets everything, marks included
    assert tracker.collect().count() == 0


@pytest.mark.parametrize("tracker_name", ["kernel", "hash"])
def test_marks_are_added_to_what_a_tracker_sees(
    request: pytest.FixtureRequest, make_block: BlockMaker, tracker_name: str
) -> None:
    block = make_block("memfd", MiB)
    tracker = make_tracker(request, tracker_name, block)
    block.mark_dirty(0, 1)  # before start(): forgotten
    tracker.start()
    write_pages(block, [9])
    # A write the tracker cannot see (say, by another process), reported by hand.
    block.mark_dirty(20 * PAGE_SIZE + 100, PAGE_SIZE)  # straddles pages 20 and 21
    assert tracker.collect().indices().tolist() == [9, 20, 21]
    assert tracker.collect().count() == 0


def test_explicit_marks_from_many_threads(make_block: BlockMaker) -> None:
    block = make_block("anonymous", 4 * MiB)
    with ExplicitTracker(block) as tracker:
        tracker.start()
        seen: list[np.ndarray] = []

        def marker(first: int) -> None:
            for page in range(first, block.pages, 8):
                block.mark_dirty(page * PAGE_SIZE, PAGE_SIZE)

        threads = [threading.Thread(target=marker, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            seen.append(tracker.collect().indices())
        for thread in threads:
            thread.join()
        seen.append(tracker.collect().indices())
        every = np.concatenate(seen)
        assert np.array_equal(np.unique(every), np.arange(block.pages))


@pytest.mark.parametrize(
    ("tracker_name", "kind"),
    [
        ("kernel", "anonymous"),
        ("kernel", "memfd"),
        ("kernel", "shm-file"),
        ("hash", "anonymous"),
        ("explicit", "anonymous"),
    ],
)
def test_concurrent_writer_shadow_copy_matches(
    request: pytest.FixtureRequest, make_block: BlockMaker, tracker_name: str, kind: str
) -> None:
    """Round 0 copies everything after start(); each later round copies what
    collect() reports while a thread keeps writing. At the end: identical."""
    block = make_block(kind, 4 * MiB)
    tracker = make_tracker(request, tracker_name, block)
    rows = block.page_rows(np.uint64)
    stop = threading.Event()
    writes = 0

    def writer() -> None:
        nonlocal writes
        rng = np.random.default_rng(11)
        while not stop.is_set():
            first = int(rng.integers(0, block.pages - 8))
            count = int(rng.integers(1, 8))
            rows[first : first + count, int(rng.integers(0, 512))] = rng.integers(0, 2**63)
            if tracker_name == "explicit":
                block.mark_dirty(first * PAGE_SIZE, count * PAGE_SIZE)
            writes += 1

    tracker.start()
    shadow = rows.copy()
    thread = threading.Thread(target=writer)
    thread.start()
    rounds = 0
    deadline = time.monotonic() + 0.4
    try:
        while time.monotonic() < deadline:
            pages = tracker.collect().indices()
            shadow[pages] = rows[pages]
            rounds += 1
    finally:
        stop.set()
        thread.join()
    pages = tracker.collect().indices()
    shadow[pages] = rows[pages]
    assert writes > 100 and rounds > 5
    assert np.array_equal(shadow, rows)


@pytest.mark.parametrize("tracker_name", ["kernel", "hash", "explicit"])
def test_lifecycle_errors_and_double_close(
    request: pytest.FixtureRequest, make_block: BlockMaker, tracker_name: str
) -> None:
    block = make_block("anonymous", MiB, name="pc.ram")
    tracker = make_tracker(request, tracker_name, block)
    with pytest.raises(ValueError, match=r"of RAMBlock 'pc.ram'>: collect\(\) before start\(\)"):
        tracker.collect()
    tracker.start()
    tracker.close()
    tracker.close()
    with pytest.raises(ValueError, match=r"collect\(\) after close\(\)"):
        tracker.collect()
    with pytest.raises(ValueError, match=r"start\(\) after close\(\)"):
        tracker.start()
    block.mark_dirty(0, 1)  # a closed tracker no longer listens


def test_hash_tracker_sees_two_doubles_negated_in_a_page(make_block: BlockMaker) -> None:
    # Negating two doubles flips the top bit of two 64-bit words: a sum of 64-bit
    # words times odd keys would not change, the hash over 32-bit words does.
    block = make_block("anonymous", MiB)
    doubles = block.page_rows(np.float64)
    doubles[:] = 1.5
    rng = np.random.default_rng(2)
    with HashTracker(block) as tracker:
        tracker.start()
        for page in range(block.pages):
            doubles[page, rng.choice(512, 2, replace=False)] *= -1
        assert tracker.collect().count() == block.pages


def test_a_closed_block_cannot_be_tracked(make_block: BlockMaker) -> None:
    block = make_block("anonymous", MiB, name="pc.ram")
    block.close()
    for tracker in TRACKERS.values():
        with pytest.raises(ValueError, match=r"RAMBlock 'pc\.ram' is closed: nothing to track"):
            tracker(block)


@pytest.mark.parametrize("tracker_name", ["kernel", "hash", "explicit"])
def test_no_fd_left_after_close(
    request: pytest.FixtureRequest, make_block: BlockMaker, tracker_name: str
) -> None:
    if tracker_name == "kernel":
        request.getfixturevalue("kernel_tracking")
    before = open_fds()
    for kind in ("anonymous", "memfd", "shm-file"):
        block = make_block(kind, MiB)
        with TRACKERS[tracker_name](block) as tracker:
            tracker.start()
            write_pages(block, PATTERN)
            tracker.collect()
        block.close()
    assert open_fds() == before


def test_choose_tracker_prefers_the_kernel(make_block: BlockMaker, kernel_tracking: None) -> None:
    block = make_block("anonymous", MiB)
    with choose_tracker(block) as tracker:
        assert tracker.name == "kernel" and tracker.fallback_reason is None


def test_choose_tracker_falls_back_and_says_why(
    make_block: BlockMaker, kernel_tracking: None
) -> None:
    block = make_block("anonymous", MiB, name="pc.ram")
    with KernelTracker(block):  # the block is taken: a second userfaultfd cannot register it
        with pytest.raises(TrackerUnavailable, match="already tracked by another userfaultfd"):
            choose_tracker(block, "kernel")
        with choose_tracker(block) as tracker:
            assert tracker.name == "hash"
            assert tracker.fallback_reason == (
                "RAMBlock 'pc.ram': kernel dirty tracking: UFFDIO_REGISTER: "
                "Device or resource busy: the range is already tracked by another userfaultfd"
            )


@pytest.mark.parametrize("kind", ["shm-file", "disk-file", "shared-anonymous", "memfd"])
def test_choose_tracker_hashes_a_block_another_process_may_write(
    make_block: BlockMaker, kernel_tracking: None, kind: str
) -> None:
    """The kernel tracker reads this process's page tables: another process's
    writes to a file, to shared memory or to a memfd whose descriptor went
    out are not in them. Hashing sees every writer; naming "kernel" still
    takes it, for a caller that knows nobody else writes."""
    block = make_block(kind, MiB, name="pc.ram")
    if kind == "memfd":
        with choose_tracker(block) as tracker:
            assert tracker.name == "kernel"  # its descriptor has not gone out yet
        assert block.fd is not None
    with choose_tracker(block) as tracker:
        assert tracker.name == "hash"
        assert tracker.fallback_reason == (
            f"RAMBlock 'pc.ram' ({block.kind}) may be written by another process, "
            "whose writes the kernel tracker of this one does not see"
        )
    with choose_tracker(block, "kernel") as tracker:
        assert tracker.name == "kernel"


@pytest.mark.parametrize("preference", ["hash", "explicit"])
def test_choose_tracker_can_be_forced(make_block: BlockMaker, preference: str) -> None:
    with choose_tracker(make_block("anonymous", MiB), preference) as tracker:
        assert tracker.name == preference and tracker.fallback_reason is None


def test_choose_tracker_rejects_unknown_names(make_block: BlockMaker) -> None:
    with pytest.raises(ValueError, match="unknown dirty tracker 'dirty-ring'; choose one of auto"):
        choose_tracker(make_block("anonymous", MiB), "dirty-ring")


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_page_hashes_are_the_same_whatever_the_threads(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """The block is cut into parts hashed side by side; every page, the last
    partial chunk included, gets the hash one thread gives it."""
    block = RAMBlock.anonymous("hashed", 5 * 1024 * PAGE_SIZE + 3 * PAGE_SIZE)  # 5 chunks + 3 pages
    try:
        block.array[::4093] = np.arange(block.array[::4093].size, dtype=np.uint8)
        keys = verify_keys(7)
        monkeypatch.setattr(hashing, "_HASH_THREADS", 1)
        alone = page_hashes(block, keys)
        monkeypatch.setattr(hashing, "_HASH_THREADS", threads)
        assert np.array_equal(page_hashes(block, keys), alone)
        assert len(np.unique(alone)) > block.pages // 2  # the pages really differ
    finally:
        block.close()
