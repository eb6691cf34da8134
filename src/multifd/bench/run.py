"""Runs the chosen scenarios in one go and returns one JSON-ready dict, every
ratio taken against a baseline measured in the same run."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

from . import tracker
from .bulk import TIMING, Bulk
from .content import make_content
from .live import Live
from .loopback import Loopback
from .options import BenchOptions
from .system import machine_info

FORMAT = 1
# Bytes alive at once, in RAM sizes: the content file, a destination (QEMU's
# file or a Python process), and either the loopback receiver's buffer (kept
# through the bulk runs it is interleaved with) or the live source's private
# copy; and the processes.
_COPIES_AT_ONCE = 3.2


def _check_memory(options: BenchOptions) -> None:
    available = _mem_available()
    needed = int(options.size * _COPIES_AT_ONCE)
    if available and needed > available:
        # A size this machine cannot hold is a bad option, not an out-of-memory.
        raise ValueError(
            f"--size {options.size >> 20} MiB needs about {needed >> 20} MiB of free memory "
            f"(the content, a source and a destination copy); {available >> 20} MiB "
            "is available"
        )


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_bench(options: BenchOptions) -> dict[str, Any]:
    """Measure every scenario in `options.scenarios`; see benchmarks/README.md for
    the meaning of each figure."""
    result: dict[str, Any] = {
        "format": FORMAT,
        "machine": machine_info(),
        "options": options.to_json(),
        "timing": TIMING,
        "bulk": [],
        "live": [],
        "loopback": [],
        "floor": [],
        "tracker": [],
    }
    scenarios = options.scenarios
    if "tracker" in scenarios:
        options.say(f"tracker: {options.tracked_size >> 20} MiB block")
        result["tracker"] = tracker.measure(options)
    if {"bulk", "live", "loopback"} & set(scenarios):
        _check_memory(options)
        with tempfile.TemporaryDirectory(dir=options.workdir, prefix="multifd-bench-") as tmp:
            workdir = Path(tmp)
            options.say(f"filling {options.size >> 20} MiB of RAM content in {workdir}")
            content = make_content(workdir, options.size)
            loopback: Loopback | None = None
            if "bulk" in scenarios:
                with contextlib.ExitStack() as stack:
                    if "loopback" in scenarios:
                        loopback = stack.enter_context(Loopback(options, content, workdir))
                    bulk = Bulk(options, content, workdir, loopback=loopback)
                    stack.callback(bulk.close)
                    result["bulk"] = bulk.measure()
            elif "loopback" in scenarios:
                loopback = Loopback(options, content, workdir)
                loopback.measure()
            if loopback is not None:  # its figures outlive its session
                result["loopback"] = loopback.entries()
                result["floor"] = loopback.floor_entries()
            if "live" in scenarios:
                result["live"] = Live(options, content, workdir).measure()
    _relate_to_loopback(result)
    # Other work on a shared host shows here; read the figures with it.
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    return result


def _relate_to_loopback(result: dict[str, Any]) -> None:
    """Python→Python bulk as a fraction of raw loopback, and of the floor, at
    the same channel count and transport. Loopback carries the whole RAM, so
    `fraction` compares RAM moved per second; `wire_fraction` compares bytes on
    the wire per second.

    The ceiling is the fastest loopback run, not the median: one connection's
    loopback swings between 1 and 5 GB/s on a 2-CPU machine, by whether the
    scheduler puts its sender and receiver on the same CPU (the slow runs leave
    a CPU idle), so one run in a few sits far below what the machine carries.
    """
    ceiling = {(e["channels"], e["transport"]): e for e in result["loopback"] if e["gbps"]}
    floor = {(e["channels"], e["transport"]): e for e in result["floor"] if e["gbps"]}
    for entry in result["bulk"]:
        if entry["pairing"] != "python-python" or not entry["gbps"]:
            continue
        key = (entry["channels"], entry["transport"])
        loop = ceiling.get(key)
        if loop is not None:
            entry["fraction_of_loopback"] = entry["gbps"] / loop["best_gbps"]
            entry["wire_fraction_of_loopback"] = entry["wire_gbps"] / loop["best_gbps"]
            loop["python_python_gbps"] = entry["gbps"]
            loop["python_python_fraction"] = entry["fraction_of_loopback"]
            loop["python_python_wire_fraction"] = entry["wire_fraction_of_loopback"]
        lent = floor.get(key)
        if lent is not None:
            # RAM moved per second against RAM moved per second: the floor's
            # fastest time divided by the migration's median time.
            entry["fraction_of_floor"] = entry["gbps"] / lent["best_gbps"]
            lent["python_python_gbps"] = entry["gbps"]
            lent["python_python_fraction"] = entry["fraction_of_floor"]


def failures(result: dict[str, Any]) -> list[str]:
    """Every figure that could not be measured because a run failed."""
    found = []
    for scenario in ("bulk", "live", "loopback", "floor"):
        for entry in result[scenario]:
            if entry.get("error"):
                found.append(f"{scenario}: {entry['error']}")
    for entry in result["tracker"]:
        if entry.get("exact") is False:
            found.append(f"tracker {entry['tracker']}: collect missed or invented pages")
    return found
