"""Fixtures for the fault-injection tests: the end-to-end helpers (tests/e2e), a
leak check after every test (threads, file descriptors) and a migration maker."""

from __future__ import annotations

import sys
from pathlib import Path

# The Migration helper, its checks and fixtures are the end-to-end tests'; share, not copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from e2e_support import migration, no_leaks

__all__ = ["migration", "no_leaks"]
