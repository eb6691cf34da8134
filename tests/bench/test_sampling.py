"""The benchmark's samplers run in a process of their own: nothing in the
benchmark's process (where a Python source under test runs) wakes to sample,
and they still see what happens in it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from multifd.bench.system import CpuSampler, PeakSampler

MiB = 1 << 20


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
        memory = np.ones(64 * MiB, dtype=np.uint8)  # resident, anonymous
        time.sleep(0.1)
        del memory
    assert sampler.growth >= 60 * MiB


def test_growth_counts_from_when_sampling_starts() -> None:
    """Memory freed between making the sampler and entering it (a QEMU just
    started does that) must not hide the growth inside the window."""
    before = np.ones(64 * MiB, dtype=np.uint8)
    sampler = PeakSampler(every=0.005)
    del before
    with sampler:
        during = np.ones(16 * MiB, dtype=np.uint8)
        time.sleep(0.05)
        del during
    assert 15 * MiB <= sampler.growth < 32 * MiB


def test_a_process_that_exits_while_sampled_reads_as_nothing_more() -> None:
    pid = os.fork()
    if pid == 0:
        time.sleep(0.05)
        os._exit(0)
    with PeakSampler(pid=pid, field="VmRSS", every=0.005) as sampler:
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
