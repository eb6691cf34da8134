"""A sampler in a process of its own, run as a script by `system.py`; the
benchmark imports `proc_status` and `process_cpu_seconds` from here too, so
this file may import nothing of the package.

A sampling thread inside the benchmark's process takes the GIL a hundred
times a second from a Python source under test (measured: its user time up
by 0.045 s per GiB, and slow outliers), and not from a QEMU one: the
comparison would lean against Python. So this script, which imports nothing but the standard
library, samples one /proc figure every EVERY seconds until its stdin closes,
then prints every sample as JSON: a list of [time.time(), value].

    python -I _sampling.py EVERY stat               machine busy CPU-seconds
    python -I _sampling.py EVERY status:PID:FIELD   a /proc/PID/status field, bytes

It prints "ready" once the first sample is taken, so that the window the
caller measures starts inside the sampling.
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from collections.abc import Callable


def busy_cpu_seconds(hz: int) -> float:
    """The machine's busy CPU time since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / hz


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """The memory fields of /proc/<pid>/status, in bytes (VmRSS, VmHWM, RssAnon...);
    none once the process is gone."""
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                parts = value.split()
                if len(parts) == 2 and parts[1] == "kB":
                    fields[name] = int(parts[0]) * 1024
    except OSError:
        pass
    return fields


def process_cpu_seconds(pid: int | str = "self") -> float | None:
    """User and system CPU time of a process and all its threads, those that
    have ended included (/proc/<pid>/stat, in ticks); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reader(what: str) -> Callable[[], float]:
    if what == "stat":
        hz = os.sysconf("SC_CLK_TCK")
        return lambda: busy_cpu_seconds(hz)
    kind, _, rest = what.partition(":")
    pid, _, field = rest.partition(":")
    if kind != "status" or not pid or not field:
        raise SystemExit(f"_sampling.py: cannot sample {what!r}")
    return lambda: float(proc_status(pid).get(field, 0))


def main() -> None:
    every, read = float(sys.argv[1]), reader(sys.argv[2])
    samples = [(time.time(), read())]
    print("ready", flush=True)
    # stdin readable means closed (the caller never writes): the end.
    while not select.select([sys.stdin], [], [], every)[0]:
        samples.append((time.time(), read()))
    samples.append((time.time(), read()))
    json.dump(samples, sys.stdout)


if __name__ == "__main__":
    main()
