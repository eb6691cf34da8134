"""Live scenario: Python→Python while a workload rewrites pages at a set rate;
total time, rounds, and the downtime the destination saw against the limit."""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..demo.workload import Workload
from ..memory import RAMBlock
from ..migration.source import MigrationSource
from .content import BLOCK_NAME, Content
from .endpoint import DestinationProcess, DestinationSpec
from .options import BenchOptions
from .system import GB, PeakSampler, median


@dataclass
class LiveRun:
    seconds: float | None = None
    error: str | None = None
    rounds: int = 0
    downtime_ms: float = 0.0  # stop on the source to resume on the destination
    source_downtime_ms: float = 0.0  # stop to the last byte sent, as the source sees it
    max_throttle: int = 0
    pages_written: int = 0
    transferred: int = 0
    tracker: str | None = None
    dest_hwm: int = 0
    dest_ready_rss: int = 0
    source_overhead: int = 0


@dataclass
class Live:
    options: BenchOptions
    content: Content
    workdir: Path
    _names: itertools.count = field(default_factory=itertools.count)
    _block: RAMBlock | None = None

    def _fresh_block(self) -> RAMBlock:
        """The source's private anonymous block, refilled from the content so that
        the workload's writes do not leak into the next run. One block serves every
        run: a block per run would stay mapped until the garbage collector frees
        the objects still viewing it, and a few of those at 4 GiB exhaust memory."""
        if self._block is None:
            self._block = RAMBlock.anonymous(BLOCK_NAME, self.content.size)
        with self.content.block() as pristine:
            np.copyto(self._block.array, pristine.array)
        return self._block

    def close(self) -> None:
        if self._block is not None:
            self._block.close()
            self._block = None
            # A MigrationSource is part of a reference cycle and keeps the workload,
            # hence a view of the block, alive: collect now, so the memory goes now.
            gc.collect()

    def _uri(self) -> str:
        if self.options.transport == "tcp":
            return "tcp:127.0.0.1:0"
        return f"unix:{self.workdir}/live-{next(self._names)}.sock"

    def run(self, dirty_rate: int, channels: int) -> LiveRun:
        options = self.options
        result = LiveRun()
        workload: Workload | None = None
        try:
            block = self._fresh_block()
            workload = Workload(block.array, dirty_rate)
            throttles = [0]

            def throttle(percent: int) -> None:
                throttles.append(percent)
                workload.throttle(percent)

            spec = DestinationSpec(
                blocks=((BLOCK_NAME, self.content.size),),
                uri=self._uri(),
                channels=channels,
                timeout=options.migration_timeout,
            )
            with DestinationProcess(spec) as dst:
                source = MigrationSource(
                    [block],
                    capabilities={"multifd": True, "auto-converge": True},
                    parameters={
                        "multifd-channels": channels,
                        "multifd-compression": "none",
                        "max-bandwidth": 0,
                        "downtime-limit": options.downtime_limit,
                    },
                    on_stop=workload.pause,
                    on_resume=workload.resume,
                    throttle=throttle,
                )
                workload.start()
                try:
                    with PeakSampler() as sampler:
                        started = time.time()
                        source.migrate(dst.uri)
                        info = source.wait(options.migration_timeout)
                finally:
                    source.cancel()
                # The workload stays stopped after a completed migration: this is
                # the memory at switchover, which the destination must hold.
                digest = block.sha256() if info["status"] == "completed" else None
                report = dst.result()
            result.pages_written = workload.pages_written
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
            return result
        finally:
            if workload is not None:
                workload.stop()
        if info["status"] != "completed":
            result.error = f"source {info['status']}: {info.get('error-desc', '?')}"
        elif "error" in report:
            result.error = f"destination: {report['error']}"
        elif report["query"]["status"] != "completed":
            query = report["query"]
            result.error = f"destination {query['status']}: {query.get('error-desc', '?')}"
        elif report["digests"].get(BLOCK_NAME) != digest:
            result.error = "destination memory differs from the source's at switchover"
        elif report.get("completed_at") is None:
            result.error = "the destination reported no completion time"
        if result.error is not None:
            return result
        result.seconds = report["completed_at"] - started
        result.rounds = info.get("x-rounds", 0)
        result.downtime_ms = report["query"].get("x-downtime", 0)
        result.source_downtime_ms = info.get("downtime", 0)
        result.max_throttle = max(throttles)
        result.transferred = info["ram"]["transferred"]
        result.tracker = ",".join(sorted(set(info.get("x-dirty-tracker", {}).values())))
        result.dest_hwm = report["vm_hwm"]
        result.dest_ready_rss = dst.rss_ready
        result.source_overhead = sampler.growth
        return result

    def measure(self) -> list[dict[str, Any]]:
        options = self.options
        results: dict[tuple[int, int], list[LiveRun]] = {}
        try:
            for _ in range(options.warmup):
                warm = self.run(options.dirty_rates[0], options.channels[0])
                options.say(f"live warm-up: {_brief(warm)}")
            for channels in options.channels:
                for index in range(options.runs):
                    for rate in options.dirty_rates:
                        run = self.run(rate, channels)
                        results.setdefault((rate, channels), []).append(run)
                        options.say(
                            f"live {rate >> 20} MiB/s x{channels} run "
                            f"{index + 1}/{options.runs}: {_brief(run)}"
                        )
        finally:
            self.close()
        return [
            _entry(rate, channels, options, results[(rate, channels)])
            for channels in options.channels
            for rate in options.dirty_rates
        ]


def _brief(run: LiveRun) -> str:
    if run.seconds is None:
        return f"FAILED: {run.error}"
    return f"{run.seconds:.3f} s, {run.rounds} rounds, downtime {run.downtime_ms:.0f} ms"


def _entry(rate: int, channels: int, options: BenchOptions, runs: list[LiveRun]) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "dirty_rate": rate,
        "channels": channels,
        "transport": options.transport,
        "ram_bytes": options.size,
        "downtime_limit_ms": options.downtime_limit,
        "seconds": None,
        "rounds": None,
        "downtime_ms": None,
        "error": None,
    }
    errors = [r.error for r in runs if r.error]
    if errors:
        entry["error"] = f"{len(errors)} of {len(runs)} runs failed: {errors[0]}"
        return entry
    seconds = median([r.seconds for r in runs if r.seconds is not None])
    entry.update(
        seconds=seconds,
        rounds=median([r.rounds for r in runs]),
        downtime_ms=median([r.downtime_ms for r in runs]),
        source_downtime_ms=median([r.source_downtime_ms for r in runs]),
        runs_downtime_ms=[r.downtime_ms for r in runs],
        runs_within_limit=sum(r.downtime_ms <= options.downtime_limit for r in runs),
        runs=len(runs),
        max_throttle_percent=max(r.max_throttle for r in runs),
        wire_gbps=median([r.transferred for r in runs]) / seconds / GB,
        pages_written=int(median([r.pages_written for r in runs])),
        tracker=runs[0].tracker,
        dest_hwm_bytes=max(r.dest_hwm for r in runs),
        dest_ready_rss_bytes=max(r.dest_ready_rss for r in runs),
        source_overhead_bytes=max(r.source_overhead for r in runs),
    )
    return entry
