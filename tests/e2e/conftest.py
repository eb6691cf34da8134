"""Fixtures for the end-to-end tests: a leak check after every test (threads,
file descriptors) and a maker of migrations that are torn down afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_support import Migration

import leakcheck


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After every test: no thread and no file descriptor it started is left."""
    with leakcheck.no_leaks():
        yield


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
