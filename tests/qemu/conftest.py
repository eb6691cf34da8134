"""Real-QEMU interop tests: they need qemu-system-x86_64 (.ci/run installs it)."""

from __future__ import annotations

import pytest

from multifd.qemu.launch import qemu_binary


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if qemu_binary() is not None:
        return
    skip = pytest.mark.skip(
        reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"
    )
    for item in items:
        if "tests/qemu/" in str(item.fspath):
            item.add_marker(skip)
