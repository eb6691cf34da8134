"""Fixtures for the end-to-end tests: a leak check after every test (threads,
file descriptors) and a maker of migrations that are torn down afterwards."""

from __future__ import annotations

from e2e_support import migration, no_leaks

__all__ = ["migration", "no_leaks"]  # fixtures defined in e2e_support, shared with tests/faults
