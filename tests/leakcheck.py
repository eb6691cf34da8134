"""The leak check every I/O test folder runs after each test: threads and file
descriptors it started must be gone (after a bounded grace for joins)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

LEAK_GRACE = 2.0  # seconds a finished owner may take to let its threads go


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        # The directory listing's own descriptor is gone by the time it is read.
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def leaks(
    threads_before: set[threading.Thread], fds_before: dict[int, str]
) -> tuple[list[str], dict[int, str]]:
    """Threads and descriptors not there before, after the grace period."""
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        threads = [t.name for t in threading.enumerate() if t not in threads_before]
        fds = {fd: target for fd, target in open_fds().items() if fds_before.get(fd) != target}
        if (not threads and not fds) or time.monotonic() > deadline:
            return threads, fds
        time.sleep(0.01)


@contextlib.contextmanager
def no_leaks() -> Iterator[None]:
    """Fail if the body leaves a thread or a file descriptor behind."""
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    yield
    threads, fds = leaks(threads_before, fds_before)
    assert not threads, f"threads left running: {threads}"
    assert not fds, f"file descriptors left open: {fds}"
