"""A workload that keeps writing memory at a set rate, as a guest's vCPUs would.

It fills a block with random data and zero pages, then rewrites random pages
from its own thread. The source stops it at switchover (`pause`), resumes it
if the migration fails (`resume`), and slows it for auto-converge
(`throttle`), the way QEMU stops or throttles vCPUs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from ..wire import TARGET_PAGE_SIZE

TICK = 0.005  # seconds between write bursts


def fill(
    array: np.ndarray,
    data_fraction: float = 0.75,
    seed: int = 1,
    stopped: Callable[[], bool] | None = None,
) -> None:
    """Random data in `data_fraction` of the pages (spread out), zeros elsewhere;
    it returns early, part filled, once `stopped()` says so (a block of some
    GiB takes seconds, too long to keep a Ctrl-C waiting)."""
    pages = array.reshape(-1, TARGET_PAGE_SIZE)
    rng = np.random.default_rng(seed)
    chosen = rng.random(len(pages)) < data_fraction
    step = 4096  # pages per batch: 16 MiB of random bytes at a time
    for first in range(0, len(pages), step):
        if stopped is not None and stopped():
            return
        rows = np.flatnonzero(chosen[first : first + step]) + first
        pages[rows] = rng.integers(0, 256, size=(len(rows), TARGET_PAGE_SIZE), dtype=np.uint8)
        pages[np.flatnonzero(~chosen[first : first + step]) + first] = 0


class Workload:
    """Rewrites `rate` bytes per second of `array`, page by page, until stopped."""

    def __init__(self, array: np.ndarray, rate: int, seed: int = 2) -> None:
        self._pages = array.reshape(-1, TARGET_PAGE_SIZE).view(np.uint64)
        self._rate = rate
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()  # held while writing: pause() waits for it
        self._running = threading.Event()
        self._quit = threading.Event()
        self._throttle = 0
        self._thread: threading.Thread | None = None
        self.pages_written = 0
        self._counter = 0

    def start(self) -> None:
        self._running.set()
        self._thread = threading.Thread(target=self._run, name="workload", daemon=True)
        self._thread.start()

    def pause(self) -> None:
        """Stop writing; returns once no write is in flight (the vm_stop analogue)."""
        self._running.clear()
        with self._lock:
            pass

    def resume(self) -> None:
        self._running.set()

    def throttle(self, percent: int) -> None:
        """Spend only (100 - percent) % of the time writing, as QEMU's CPU throttle."""
        self._throttle = percent

    def stop(self) -> None:
        self._quit.set()
        self._running.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def _run(self) -> None:
        per_tick = max(1, int(self._rate * TICK / TARGET_PAGE_SIZE))
        total = len(self._pages)
        while not self._quit.is_set():
            self._running.wait()
            if self._quit.is_set():
                return
            started = time.monotonic()
            with self._lock:
                if not self._running.is_set():
                    continue
                count = max(1, per_tick * (100 - self._throttle) // 100)
                rows = self._rng.integers(0, total, size=count)
                self._counter += 1
                # One word per page is enough to dirty it and change its hash.
                self._pages[rows, 0] = self._counter
                self.pages_written += count
            spent = time.monotonic() - started
            time.sleep(max(0.0, TICK - spent))
