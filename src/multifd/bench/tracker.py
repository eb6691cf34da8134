"""Tracker cost scenario: how long collect-and-reprotect takes per GiB when 1 %,
10 % or 100 % of the pages were written, and what the writer pays per page."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..memory import HashTracker, KernelTracker, RAMBlock, TrackerBase
from .options import TRACKER_FRACTIONS, BenchOptions
from .system import median

GIB = 1 << 30
TRACKERS = ("kernel", "hash")


def _one(tracker: TrackerBase, rows: np.ndarray, pages: np.ndarray, stamp: int) -> dict[str, Any]:
    tracker.collect()  # everything clean and protected again
    started = time.perf_counter()
    rows[pages, 0] = stamp
    first = time.perf_counter() - started
    started = time.perf_counter()
    rows[pages, 0] = stamp + 1
    second = time.perf_counter() - started
    started = time.perf_counter()
    dirty = tracker.collect()
    collect = time.perf_counter() - started
    seen = dirty.indices()
    return {
        "first": first,
        "second": second,
        "collect": collect,
        "exact": len(seen) == len(pages) and bool(np.array_equal(seen, pages)),
    }


def _measure_one(kind: str, options: BenchOptions) -> list[dict[str, Any]]:
    size = options.tracked_size
    base = {"tracker": kind, "block_bytes": size}
    if kind == "kernel" and (reason := KernelTracker.probe()) is not None:
        return [{**base, "written_percent": None, "skipped": reason}]
    rng = np.random.default_rng(3)
    entries = []
    with RAMBlock.anonymous("tracked", size) as block:
        block.prefault()  # populated memory: the case a running application is in
        rows = block.page_rows(np.uint64)
        make = KernelTracker if kind == "kernel" else HashTracker
        with make(block) as tracker:
            tracker.start()
            stamp = 1
            for fraction in TRACKER_FRACTIONS:
                count = max(1, round(block.pages * fraction))
                samples = []
                for index in range(options.warmup + options.runs):
                    pages = np.sort(rng.choice(block.pages, size=count, replace=False))
                    sample = _one(tracker, rows, pages, stamp)
                    stamp += 2
                    if index >= options.warmup:
                        samples.append(sample)
                collect = median([s["collect"] for s in samples])
                first = median([s["first"] for s in samples])
                second = median([s["second"] for s in samples])
                entries.append(
                    {
                        **base,
                        "written_percent": fraction * 100,
                        "dirty_pages": count,
                        "collect_ms": collect * 1000,
                        "collect_ms_per_gib": collect * 1000 / (size / GIB),
                        "first_write_us_per_page": first / count * 1e6,
                        "second_write_us_per_page": second / count * 1e6,
                        "write_extra_us_per_page": (first - second) / count * 1e6,
                        "exact": all(s["exact"] for s in samples),
                        "skipped": None,
                    }
                )
                options.say(
                    f"tracker {kind} {fraction:.0%}: collect {collect * 1000:.2f} ms, "
                    f"writer +{(first - second) / count * 1e6:.2f} µs/page"
                )
    return entries


def measure(options: BenchOptions) -> list[dict[str, Any]]:
    """Both trackers at each fraction. The writer's extra cost is the first write
    to each page after protection minus a second write to the same pages (which
    no longer faults), per page. Pages are picked at random: the worst case for
    the kernel tracker, one region per page."""
    return [entry for kind in TRACKERS for entry in _measure_one(kind, options)]
