"""Fixtures for the memory tests: a block maker that cleans up after itself, and
the kernel tracker's availability (tests needing it skip with its reason)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from memory_support import BlockMaker

from multifd.memory import KernelTracker


@pytest.fixture
def make_block(tmp_path: Path) -> Iterator[BlockMaker]:
    maker = BlockMaker(tmp_path)
    yield maker
    maker.close()


@pytest.fixture
def kernel_tracking() -> None:
    """Skip, with the probe's reason, where the kernel tracker cannot work."""
    reason = KernelTracker.probe()
    if reason is not None:
        pytest.skip(f"kernel dirty tracking unavailable: {reason}")
