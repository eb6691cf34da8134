"""What a benchmark records about where it ran, and how it reads memory figures:
machine and versions, peak and CPU samplers (each in a process of its own,
see _sampling.py), medians."""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__

GB = 1e9  # throughput figures are in GB/s of 1e9 bytes, as QEMU's mbps is decimal


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


_SAMPLING_SCRIPT = Path(__file__).with_name("_sampling.py")


class _Sampling:
    """One /proc figure sampled every `every` seconds by `_sampling.py` in a
    child process (see there why not a thread), from `start()` to `stop()`."""

    def __init__(self, what: str, every: float) -> None:
        self._what = f"{what} every {every:g} s"
        self._args = [sys.executable, "-I", str(_SAMPLING_SCRIPT), repr(every), what]
        self._process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        process = subprocess.Popen(
            self._args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        if process.stdout.readline() != "ready\n":
            process.kill()
            _, err = process.communicate()
            raise RuntimeError(f"the sampler {self._what} did not start: {err.strip()}")
        self._process = process

    def stop(self) -> list[tuple[float, float]]:
        """Every sample, (time.time(), value), the last one taken now."""
        if self._process is None:
            return []
        process, self._process = self._process, None
        try:
            out, err = process.communicate(timeout=10)  # closes its stdin: the end
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise RuntimeError(f"the sampler {self._what} did not stop") from None
        try:
            return [(float(t), float(v)) for t, v in json.loads(out)]
        except (ValueError, TypeError):
            reason = err.strip() or f"exit status {process.returncode}, no samples"
            raise RuntimeError(f"the sampler {self._what} failed: {reason}") from None


class PeakSampler:
    """Samples one /proc status field of a process from `__enter__` to
    `__exit__` and keeps the first value and the peak: the kernel keeps a peak
    (VmHWM) only for the whole RSS, not per kind."""

    def __init__(self, field: str = "RssAnon", pid: int | str = "self", every: float = 0.02):
        pid = os.getpid() if pid == "self" else pid
        self._sampling = _Sampling(f"status:{pid}:{field}", every)
        # Both from the sampler, the first taken as the window opens: a value
        # read here, before the sampler started, may be from another moment
        # (a QEMU just started was seen 5 MiB larger here than 40 ms later).
        self.before = 0
        self.peak = 0

    def __enter__(self) -> PeakSampler:
        self._sampling.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        values = [int(v) for _, v in self._sampling.stop()]
        if values:
            self.before, self.peak = values[0], max(values)

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.before)


# The shortest window whose busy CPU time /proc/stat resolves within 5 % of
# the machine: each end may be off by a tick (1/CLK_TCK s) on every CPU.
CPU_WINDOW_MIN = 2 / os.sysconf("SC_CLK_TCK") / 0.05


class CpuSampler:
    """The machine's busy CPU time (/proc/stat), sampled from `__enter__` to
    `__exit__`, so that the CPU-seconds of any window inside the sampling can
    be read afterwards: a run whose CPU-seconds come close to CPUs × seconds
    was bound by CPU.

    The kernel counts in ticks (1/CLK_TCK s per CPU), so each end of a window
    may be off by a tick on every CPU; a window shorter than `shortest` would
    be off by more than 5 % of the machine, and is not measured at all."""

    def __init__(self, every: float = 0.01) -> None:
        self._sampling = _Sampling("stat", every)
        self.shortest = CPU_WINDOW_MIN
        self.samples: list[tuple[float, float]] = []  # (time.time(), busy seconds)

    def __enter__(self) -> CpuSampler:
        self._sampling.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.samples = self._sampling.stop()

    def busy_between(self, start: float, end: float) -> float | None:
        """CPU-seconds the machine was busy from `start` to `end` (time.time()),
        interpolated between samples; None outside the sampled time, or for a
        window too short for the tick counters to resolve."""
        if not self.samples or start < self.samples[0][0] or end > self.samples[-1][0]:
            return None
        if end - start < self.shortest:
            return None
        times = [t for t, _ in self.samples]
        busy = [b for _, b in self.samples]

        def at(moment: float) -> float:
            i = max(1, bisect.bisect_left(times, moment))
            (t0, b0), (t1, b1) = (times[i - 1], busy[i - 1]), (times[i], busy[i])
            return b0 if t1 == t0 else b0 + (b1 - b0) * (moment - t0) / (t1 - t0)

        return max(0.0, at(end) - at(start))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def qemu_version() -> str | None:
    from ..qemu.launch import qemu_binary

    binary = qemu_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out else None


_QUIET: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 10, "check": False}


def code_identity() -> dict[str, Any]:
    """Which engine was measured: a digest of the package's sources, and the git
    commit (with the files changed since) when they come from a checkout."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    identity: dict[str, Any] = {"package_sha256": digest.hexdigest()[:16]}
    try:
        git = ["git", "-C", str(package)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], **_QUIET)
        if commit.returncode == 0:
            changed = subprocess.run([*git, "status", "--porcelain", "--", "."], **_QUIET)
            identity.update(
                git_commit=commit.stdout.strip(),
                git_changed_files=len(changed.stdout.splitlines()),
            )
    except (OSError, subprocess.TimeoutExpired):
        pass
    return identity


def machine_info() -> dict[str, Any]:
    """The machine, date, load and versions, as RESULTS.md reports them."""
    import zstandard

    return {
        "loadavg_start": list(os.getloadavg()),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "hostname": platform.node(),
        "cpu_model": _cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zstandard": zstandard.__version__,
        "multifd": __version__,
        "qemu": qemu_version(),
        "code": code_identity(),
    }
