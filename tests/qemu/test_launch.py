"""The QEMU launcher's diagnostics: named threads, and where each one waits."""

from __future__ import annotations

import os
import re
from pathlib import Path

from multifd.qemu.launch import QemuVM


def test_threads_are_named_and_say_where_they_wait(tmp_path: Path) -> None:
    with QemuVM(tmp_path, "threads", guest=False) as vm:
        threads = vm.threads()
    # debug-threads=on: the vCPU thread has QEMU's name for it, not the binary's.
    assert any(t.startswith("CPU 0/TCG ") for t in threads), threads
    for thread in threads:
        assert re.fullmatch(r".+ [RSDTtZXIPW]: .+", thread), thread
    if os.geteuid() == 0:  # the kernel stacks are root's to read
        assert any("futex" in t or "poll" in t for t in threads), threads
    assert vm.threads() == []  # quit and reaped: nothing left to show
