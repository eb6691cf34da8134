"""A sampler in a process of its own, run as a script by `system.py`.

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


def status_bytes(pid: str, field: str) -> float:
    """A kB field of /proc/PID/status in bytes; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == field:
                    return float(int(value.split()[0]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def reader(what: str) -> Callable[[], float]:
    if what == "stat":
        hz = os.sysconf("SC_CLK_TCK")
        return lambda: busy_cpu_seconds(hz)
    kind, _, rest = what.partition(":")
    pid, _, field = rest.partition(":")
    if kind != "status" or not pid or not field:
        raise SystemExit(f"_sampling.py: cannot sample {what!r}")
    return lambda: status_bytes(pid, field)


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
