"""What a benchmark run measures: the scenarios, pairings, sizes and repetitions,
with the defaults of issue 7 (`multifd bench --size 4G --channels 1,2,4,8`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..migration.params import check_parameter

SCENARIOS = ("bulk", "live", "loopback", "tracker")
PAIRINGS = ("qemu-qemu", "qemu-python", "python-qemu", "python-python")
TRANSPORTS = ("unix", "tcp")
SEED = 1  # every pairing migrates the same content
DATA_FRACTION = 0.75  # 75 % random pages, 25 % zero pages
# Bulk migrations must be one round: nobody writes, and a limit this large lets
# both engines switch over as soon as they like instead of looping.
BULK_DOWNTIME_LIMIT_MS = 60_000
TRACKER_MAX_SIZE = 1 << 30
TRACKER_FRACTIONS = (0.01, 0.10, 1.0)

Progress = Callable[[str], None]


@dataclass
class BenchOptions:
    """One benchmark run. `channels` are the multifd channel counts to measure;
    `runs` timed repetitions per figure (medians reported) after `warmup`
    discarded ones; QEMU pairings only with `with_qemu`."""

    size: int = 4 << 30
    channels: tuple[int, ...] = (1, 2, 4, 8)
    scenarios: tuple[str, ...] = SCENARIOS
    pairings: tuple[str, ...] = PAIRINGS
    runs: int = 3
    warmup: int = 1
    with_qemu: bool = False
    # QEMU destinations fault their RAM file in before the clock starts
    # (prealloc=on), as the Python destination prefaults its blocks.
    qemu_prealloc: bool = True
    transport: str = "unix"
    dirty_rates: tuple[int, ...] = (128 << 20, 512 << 20)
    downtime_limit: int = 300  # milliseconds, for the live scenario
    tracker_size: int | None = None  # default min(size, 1 GiB)
    workdir: str = "/dev/shm"  # RAM files must live in memory, not on disk
    timeout: float | None = None  # seconds per migration; default grows with size
    progress: Progress | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % 4096:
            raise ValueError(f"size must be a positive multiple of 4096, got {self.size}")
        if not self.channels or any(not 1 <= c <= 255 for c in self.channels):
            raise ValueError(f"channel counts must be 1-255, got {self.channels}")
        for name, chosen, known in (
            ("scenario", self.scenarios, SCENARIOS),
            ("pairing", self.pairings, PAIRINGS),
        ):
            unknown = [c for c in chosen if c not in known]
            if unknown:
                raise ValueError(f"unknown {name} {unknown}; choose from {', '.join(known)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.runs < 1 or self.warmup < 0:
            raise ValueError("runs must be at least 1 and warmup at least 0")
        if not self.dirty_rates or any(r <= 0 for r in self.dirty_rates):
            raise ValueError(f"dirty rates must be positive bytes/s, got {self.dirty_rates}")
        # The live scenario hands it to the source as its parameter: refused
        # here, before any scenario runs, by the same check.
        check_parameter("downtime-limit", self.downtime_limit)
        if self.tracker_size is not None and (self.tracker_size <= 0 or self.tracker_size % 4096):
            raise ValueError(
                f"tracker size must be a positive multiple of 4096, got {self.tracker_size}"
            )
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, got {self.timeout}")
        if not os.path.isdir(self.workdir) or not os.access(self.workdir, os.W_OK | os.X_OK):
            raise ValueError(f"workdir {self.workdir} is not a writable folder")

    @property
    def migration_timeout(self) -> float:
        # Generous: 20 MB/s is far below anything measured here, plus startup.
        if self.timeout is not None:
            return self.timeout
        return 60.0 + self.size / 20e6

    @property
    def tracked_size(self) -> int:
        if self.tracker_size is not None:
            return self.tracker_size
        return min(self.size, TRACKER_MAX_SIZE)

    def to_json(self) -> dict:
        return {
            "size": self.size,
            "channels": list(self.channels),
            "scenarios": list(self.scenarios),
            "pairings": list(self.pairings),
            "runs": self.runs,
            "warmup": self.warmup,
            "with_qemu": self.with_qemu,
            "qemu_prealloc": self.qemu_prealloc,
            "transport": self.transport,
            "dirty_rates": list(self.dirty_rates),
            "downtime_limit_ms": self.downtime_limit,
            "tracker_size": self.tracked_size,
        }

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
