"""Shared by every test folder: makes tests/ importable (leakcheck.py)."""
