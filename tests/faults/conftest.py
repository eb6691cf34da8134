"""Fixtures for the fault-injection tests: the end-to-end helpers (tests/e2e), a
leak check after every test (threads, file descriptors) and a migration maker."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The Migration helper and its checks are the end-to-end tests'; share, not copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from e2e_support import Migration

LEAK_GRACE = 2.0  # seconds a finished owner may take to let its threads go


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        # The directory listing's own descriptor is gone by the time it is read.
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


def leaks(threads_before: set[threading.Thread], fds_before: dict[int, str]) -> tuple[list, dict]:
    """Threads and descriptors not there before, after a bounded grace period."""
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        threads = [t.name for t in threading.enumerate() if t not in threads_before]
        fds = {fd: target for fd, target in open_fds().items() if fds_before.get(fd) != target}
        if (not threads and not fds) or time.monotonic() > deadline:
            return threads, fds
        time.sleep(0.01)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After every test: no thread and no file descriptor it started is left."""
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    yield
    threads, fds = leaks(threads_before, fds_before)
    assert not threads, f"threads left running: {threads}"
    assert not fds, f"file descriptors left open: {fds}"


@pytest.fixture
def migration(tmp_path: Path) -> Iterator[Callable[..., Migration]]:
    """Make `Migration`s (see e2e_support); each is cancelled and closed at teardown."""
    made: list[Migration] = []

    def make(**options: Any) -> Migration:
        m = Migration(tmp_path, **options)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()
