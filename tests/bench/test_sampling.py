"""The benchmark's samplers run in a process of their own: nothing in the
benchmark's process (where a Python source under test runs) wakes to sample,
and they still see what happens in it."""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from multifd.bench.system import CpuSampler, PeakSampler

MiB = 1 << 20


def _resident(size: int) -> mmap.mmap:
    """`size` bytes of private anonymous memory, every page written: RssAnon
    for as long as it is open (malloc might reuse memory already resident)."""
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    for offset in range(0, size, mmap.PAGESIZE):
        memory[offset] = 1
    return memory


def _children() -> set[int]:
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids |= {int(p) for p in (task / "children").read_text().split()}
    return pids


def test_sampling_adds_no_thread_here_and_leaves_no_process() -> None:
    threads, children = threading.active_count(), _children()
    with CpuSampler(every=0.005), PeakSampler(every=0.005):
        assert threading.active_count() == threads
        assert len(_children() - children) == 2
    assert _children() == children


def test_the_peak_of_this_process_is_seen_from_outside() -> None:
    with PeakSampler(every=0.005) as sampler:
        memory = _resident(64 * MiB)
        time.sleep(0.1)
        memory.close()
    assert sampler.growth >= 60 * MiB


def test_growth_counts_from_when_sampling_starts() -> None:
    """Memory freed between making the sampler and entering it (a QEMU just
    started does that) must not hide the growth inside the window."""
    before = _resident(64 * MiB)
    sampler = PeakSampler(every=0.005)
    before.close()
    with sampler:
        during = _resident(16 * MiB)
        time.sleep(0.05)
        during.close()
    assert 15 * MiB <= sampler.growth < 32 * MiB


def test_a_process_that_exits_while_sampled_reads_as_nothing_more() -> None:
    # The child lives until the sampler has started (a loaded machine may take
    # longer than any fixed sleep to start it), then exits while sampled.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(write_end)
        os.read(read_end, 1)
        os._exit(0)
    os.close(read_end)
    with PeakSampler(pid=pid, field="VmRSS", every=0.005) as sampler:
        os.close(write_end)
        os.waitpid(pid, 0)
        time.sleep(0.03)
    assert sampler.peak >= sampler.before > 0


def test_a_sampler_that_cannot_start_says_which(monkeypatch: pytest.MonkeyPatch) -> None:
    children = _children()
    sampler = CpuSampler()
    monkeypatch.setattr(sampler._sampling, "_args", [*sampler._sampling._args[:-1], "bogus"])
    with pytest.raises(
        RuntimeError,
        match=r"the sampler stat every 0\.01 s did not start: _sampling\.py: cannot sample 'bogus'",
    ):
        sampler.__enter__()
    assert _children() == children


def test_a_sampler_that_dies_while_sampling_says_which() -> None:
    sampler = CpuSampler(every=0.005)
    died = r"the sampler stat every 0\.005 s failed: exit status -9, no samples"
    with pytest.raises(RuntimeError, match=died), sampler:
        process = sampler._sampling._process
        assert process is not None
        process.kill()
        process.wait()
