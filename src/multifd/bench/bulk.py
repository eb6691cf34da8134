"""Bulk scenario: one RAM block of 75 % random and 25 % zero pages that nobody
writes, migrated QEMU→QEMU, QEMU→Python, Python→QEMU and Python→Python."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..memory import RAMBlock
from ..migration.source import MigrationSource
from ..qemu.launch import qemu_binary
from ..qemu.snapshot import SnapshotError, save
from ..qemu.snapshot_folder import file_sha256
from ..wire import BufferSource, Reader
from ..wire.stream import Configuration, read_configuration
from ._sampling import process_cpu_seconds
from .content import BLOCK_NAME, Content
from .endpoint import DestinationProcess, DestinationSpec
from .loopback import Loopback
from .options import BULK_DOWNTIME_LIMIT_MS, PAIRINGS, BenchOptions
from .qemuvm import RamFileVM
from .system import GB, CpuSampler, PeakSampler, median

TIMING = (
    "seconds from the migrate command to the destination's completion "
    "(QEMU: its MIGRATION completed event; Python: its resume), wall clock"
)
NEEDS_QEMU = frozenset({"qemu-qemu", "qemu-python", "python-qemu"})
# A pairing's run: (start, completion, growth of the source's anonymous memory).
Timed = tuple[float, float | None, int]


@dataclass
class RunResult:
    seconds: float | None = None
    error: str | None = None
    transferred: int = 0  # the source's ram.transferred: RAM records and multifd packets
    source_total_ms: int | None = None  # the source's own total-time
    dest_hwm: int = 0  # peak resident memory of the destination process
    dest_ready_rss: int = 0  # its resident memory before the migration started
    source_overhead: int = 0  # growth of the source's anonymous memory
    tracker: str | None = None
    cpu_seconds: float | None = None  # the machine's busy CPU time while timed
    # Each end's own CPU time (every thread's) from the migrate command to its
    # end of the migration: what one end takes from the other on a shared host.
    source_cpu: float | None = None
    dest_cpu: float | None = None


@dataclass
class QemuLayout:
    """The block list and device state of the prelaunch VM, saved once per run of
    the benchmark, so that a Python endpoint can stand in for either QEMU."""

    folder: Path
    manifest: dict[str, Any]
    configuration: Configuration
    device_state: bytes

    @property
    def blocks(self) -> tuple[tuple[str, int], ...]:
        return tuple((b["name"], b["used_length"]) for b in self.manifest["blocks"])

    @property
    def rom_digests(self) -> dict[str, str]:
        return {b["name"]: b["sha256"] for b in self.manifest["blocks"] if b["name"] != BLOCK_NAME}


@dataclass
class Bulk:
    """The four pairings over the same file with the same channel count.

    The time of a run goes from the migrate command to the moment the destination
    has everything (its MIGRATION "completed" event for QEMU, its resume for
    Python); each run is checked by hashing the destination's "mem" block
    against the source's.
    """

    options: BenchOptions
    content: Content
    workdir: Path
    layout: QemuLayout | None = None
    # An open raw loopback session, run after each round of pairings.
    loopback: Loopback | None = None
    _names: Iterator[int] = field(default_factory=itertools.count)

    # -- setup ----------------------------------------------------------------

    def skipped(self) -> dict[str, str]:
        """Pairings that cannot run here, with the reason."""
        reasons: dict[str, str] = {}
        qemu_reason = None
        if not self.options.with_qemu:
            qemu_reason = "QEMU pairings not requested (--with-qemu)"
        elif qemu_binary() is None:
            qemu_reason = "qemu-system-x86_64 is not installed"
        elif self.content.size % (1 << 20):
            qemu_reason = "QEMU needs a RAM size in whole MiB"
        for pairing in self.options.pairings:
            if pairing in NEEDS_QEMU and qemu_reason:
                reasons[pairing] = qemu_reason
        return reasons

    def save_layout(self) -> None:
        """Save the prelaunch VM once: its ROM blocks, configuration and device
        state are what a Python endpoint must present to talk to QEMU."""
        folder = self.workdir / "vm-layout"
        with RamFileVM(
            self.workdir, "layout", self.content.path, self.content.size, incoming=False
        ) as vm:
            vm.qmp.close()  # save() opens its own session; QEMU serves one at a time
            manifest = save(vm.vm.qmp, folder, channels=2, timeout=self.options.migration_timeout)
            vm.qmp = vm.vm.connect()
        mem = next(b for b in manifest["blocks"] if b["name"] == BLOCK_NAME)
        if mem["sha256"] != self.content.sha256:
            raise SnapshotError(
                "QEMU's RAM as received by a Python destination differs from the file it "
                "was started with (or QEMU wrote to it before running)"
            )
        # The saved "mem" equals the source file: drop it, the file stands in.
        (folder / mem["file"]).unlink()
        raw = (folder / "configuration.bin").read_bytes()
        configuration, _ = read_configuration(Reader(BufferSource(raw[1:])))
        self.layout = QemuLayout(
            folder, manifest, configuration, (folder / "device-state.bin").read_bytes()
        )

    def close(self) -> None:
        if self.layout is not None:
            shutil.rmtree(self.layout.folder, ignore_errors=True)

    # -- pieces of a run --------------------------------------------------------

    def _uri(self, role: str) -> str:
        if self.options.transport == "tcp":
            return "tcp:127.0.0.1:0"
        return f"unix:{self.workdir}/{role}-{next(self._names)}.sock"

    def _block_list(self) -> tuple[tuple[str, int], ...]:
        if self.layout is not None:
            return self.layout.blocks
        return ((BLOCK_NAME, self.content.size),)

    def _python_blocks(self) -> list[RAMBlock]:
        """The source's blocks: the filled file as "mem", the VM's ROMs if known."""
        blocks: list[RAMBlock] = []
        try:
            for name, size in self._block_list():
                if name == BLOCK_NAME:
                    blocks.append(self.content.block())
                else:
                    assert self.layout is not None
                    entry = next(b for b in self.layout.manifest["blocks"] if b["name"] == name)
                    path = self.layout.folder / entry["file"]
                    blocks.append(RAMBlock.from_file(name, path, size))
        except BaseException:
            for block in blocks:
                block.close()
            raise
        return blocks

    def _python_source(self, channels: int, to_qemu: RamFileVM | None) -> MigrationSource:
        blocks = self._python_blocks()
        extra: dict[str, Any] = {}
        if to_qemu is not None:
            assert self.layout is not None
            uuid = to_qemu.qmp.execute("query-uuid")["UUID"]
            extra = {
                "configuration": self.layout.configuration,
                "device_state": self.layout.device_state,
                "ram_section_id": self.layout.manifest["ram-section-id"],
                "uuid": bytes.fromhex(uuid.replace("-", "")),
            }
        return MigrationSource(
            blocks,
            capabilities={"multifd": True},
            parameters={
                "multifd-channels": channels,
                "multifd-compression": "none",
                "max-bandwidth": 0,  # unlimited
                "downtime-limit": BULK_DOWNTIME_LIMIT_MS,
                # Nobody writes the content file during a bulk run: "auto" would
                # hash every page of it, since another process could.
                "x-dirty-tracker": "kernel",
            },
            **extra,
        )

    @contextlib.contextmanager
    def _qemu_destination(self, channels: int) -> Iterator[tuple[RamFileVM, Path, str]]:
        path = self.workdir / "destination.ram"
        path.unlink(missing_ok=True)  # fresh memory: a stale copy would pass the check
        try:
            with RamFileVM(
                self.workdir,
                "destination",
                path,
                self.content.size,
                incoming=True,
                prealloc=self.options.qemu_prealloc,
            ) as vm:
                vm.configure(channels, source=False)
                yield vm, path, vm.listen(self._uri("qemu-in"))
        finally:
            path.unlink(missing_ok=True)

    def _qemu_source(self, channels: int) -> RamFileVM:
        vm = RamFileVM(self.workdir, "source", self.content.path, self.content.size, incoming=False)
        vm.configure(channels, source=True)
        return vm

    def _python_destination(self, channels: int) -> DestinationProcess:
        return DestinationProcess(
            DestinationSpec(
                blocks=self._block_list(),
                uri=self._uri("python-in"),
                channels=channels,
                timeout=self.options.migration_timeout,
            )
        )

    def _check_python_destination(self, report: dict[str, Any], result: RunResult) -> None:
        if "error" in report:
            result.error = result.error or f"destination: {report['error']}"
            return
        info = report["query"]
        if info["status"] != "completed":
            result.error = result.error or (
                f"destination {info['status']}: {info.get('error-desc', '?')}"
            )
            return
        result.dest_hwm = report["vm_hwm"]
        expected = {BLOCK_NAME: self.content.sha256}
        if self.layout is not None:
            expected.update(self.layout.rom_digests)
        digests = report["digests"]
        wrong = sorted(n for n in set(expected) | set(digests) if digests.get(n) != expected.get(n))
        if wrong:
            result.error = f"destination memory differs from the source's in {wrong}"

    def _check_qemu_destination(self, vm: RamFileVM, path: Path, result: RunResult) -> None:
        info = vm.wait(self.options.migration_timeout, source=False)
        if info.get("status") != "completed":
            result.error = result.error or (
                f"QEMU destination {info.get('status')}: {info.get('error-desc', '?')}"
            )
            return
        result.dest_hwm = vm.memory().get("VmHWM", 0)
        if file_sha256(path) != self.content.sha256:
            result.error = "destination memory differs from the source's"

    @staticmethod
    def _check_qemu_source(info: dict[str, Any], result: RunResult) -> None:
        if info.get("status") != "completed":
            result.error = result.error or (
                f"QEMU source {info.get('status')}: {info.get('error-desc', '?')}"
            )
        result.source_total_ms = info.get("total-time")
        result.transferred = info.get("ram", {}).get("transferred", 0)

    @staticmethod
    def _check_python_source(info: dict[str, Any], result: RunResult) -> None:
        if info["status"] != "completed":
            result.error = result.error or (
                f"source {info['status']}: {info.get('error-desc', '?')}"
            )
        result.source_total_ms = info.get("total-time")
        result.transferred = info.get("ram", {}).get("transferred", 0)
        result.tracker = ",".join(sorted(set(info.get("x-dirty-tracker", {}).values())))

    # -- the four pairings ------------------------------------------------------

    def run(self, pairing: str, channels: int) -> RunResult:
        """One timed migration, checked; a failure is reported, never timed."""
        result = RunResult()
        pairings = {
            "qemu-qemu": self._qemu_to_qemu,
            "qemu-python": self._qemu_to_python,
            "python-qemu": self._python_to_qemu,
            "python-python": self._python_to_python,
        }
        try:
            with CpuSampler() as cpu:
                started, finished, overhead = pairings[pairing](channels, result)
        except Exception as exc:
            result.error = result.error or f"{type(exc).__name__}: {exc}"
            return result
        result.source_overhead = overhead
        if result.error is None:
            if finished is None:
                result.error = "the destination reported no completion time"
            else:
                result.seconds = finished - started
                result.cpu_seconds = cpu.busy_between(started, finished)
        return result

    def _qemu_to_qemu(self, channels: int, result: RunResult) -> Timed:
        timeout = self.options.migration_timeout
        with (
            self._qemu_destination(channels) as (dst, path, uri),
            self._qemu_source(channels) as src,
        ):
            source_cpu, dest_cpu = _CpuOf(src.pid), _CpuOf(dst.pid)
            with PeakSampler(pid=src.pid) as sampler:
                started = time.time()
                src.qmp.execute("migrate", {"uri": uri})
                info = src.wait(timeout, source=True)
            result.source_cpu = source_cpu.used()
            self._check_qemu_source(info, result)
            self._check_qemu_destination(dst, path, result)
            result.dest_cpu = dest_cpu.used()
            return started, dst.completed_at(), sampler.growth

    def _qemu_to_python(self, channels: int, result: RunResult) -> Timed:
        timeout = self.options.migration_timeout
        with self._python_destination(channels) as dst:
            with self._qemu_source(channels) as src:
                source_cpu = _CpuOf(src.pid)
                with PeakSampler(pid=src.pid) as sampler:
                    started = time.time()
                    src.qmp.execute("migrate", {"uri": dst.uri})
                    info = src.wait(timeout, source=True)
                result.source_cpu = source_cpu.used()
                if info.get("status") != "completed":
                    src.qmp.execute("migrate_cancel")
            report = dst.result()
            result.dest_ready_rss = dst.rss_ready
            result.dest_cpu = report.get("cpu_seconds")
        self._check_qemu_source(info, result)
        self._check_python_destination(report, result)
        return started, report.get("completed_at"), sampler.growth

    def _python_to_qemu(self, channels: int, result: RunResult) -> Timed:
        with self._qemu_destination(channels) as (dst, path, uri):
            dest_cpu = _CpuOf(dst.pid)
            info, started, growth = self._run_python_source(channels, uri, dst, result)
            self._check_python_source(info, result)
            self._check_qemu_destination(dst, path, result)
            result.dest_cpu = dest_cpu.used()
            return started, dst.completed_at(), growth

    def _python_to_python(self, channels: int, result: RunResult) -> Timed:
        with self._python_destination(channels) as dst:
            info, started, growth = self._run_python_source(channels, dst.uri, None, result)
            report = dst.result()
            result.dest_ready_rss = dst.rss_ready
            result.dest_cpu = report.get("cpu_seconds")
        self._check_python_source(info, result)
        self._check_python_destination(report, result)
        return started, report.get("completed_at"), growth

    def _run_python_source(
        self, channels: int, uri: str, to_qemu: RamFileVM | None, result: RunResult
    ) -> tuple[dict[str, Any], float, int]:
        source = self._python_source(channels, to_qemu)
        try:
            with PeakSampler() as sampler:
                # This process is the source: its samplers run in processes
                # of their own, so its CPU time is the source's.
                cpu = time.process_time()
                started = time.time()
                source.migrate(uri)
                info = source.wait(self.options.migration_timeout)
                result.source_cpu = time.process_time() - cpu
        finally:
            source.cancel()
            for block in source.blocks:
                block.close()
            # A MigrationSource is part of a reference cycle: free it (and the page
            # tables of its mappings, 8 MiB per 4 GiB) now rather than runs later.
            del source
            gc.collect()
        return info, started, sampler.growth

    # -- the scenario -----------------------------------------------------------

    def measure(self) -> list[dict[str, Any]]:
        options = self.options
        skipped = self.skipped()
        active = [p for p in PAIRINGS if p in options.pairings and p not in skipped]
        failed: dict[str, str] = {}
        if any(p in NEEDS_QEMU for p in active):
            options.say("bulk: saving the prelaunch VM's layout (ROM blocks, device state)")
            try:
                self.save_layout()
            except Exception as exc:
                # Asked for and impossible: a failure to report, not a skip.
                reason = f"saving the prelaunch VM's layout: {type(exc).__name__}: {exc}"
                failed = {p: reason for p in active if p in NEEDS_QEMU}
                active = [p for p in active if p not in failed]
        # Warm-up: the first migration after filling a RAM file runs about 2x slower.
        for pairing in active:
            for _ in range(options.warmup):
                warm = self.run(pairing, options.channels[0])
                options.say(f"bulk {pairing} x{options.channels[0]} warm-up: {_brief(warm)}")
        results: dict[tuple[str, int], list[RunResult]] = {}
        # Pairings, and the loopback ceiling, interleaved run by run: drift on
        # a shared host hits them alike.
        for channels in options.channels:
            for index in range(options.runs):
                for pairing in active:
                    run = self.run(pairing, channels)
                    results.setdefault((pairing, channels), []).append(run)
                    options.say(
                        f"bulk {pairing} x{channels} run {index + 1}/{options.runs}: {_brief(run)}"
                    )
                if self.loopback is not None:
                    self.loopback.run(channels, index)
        entries = [
            _entry(p, c, self.content.size, options.transport, results.get((p, c)), skipped.get(p))
            for c in options.channels
            for p in options.pairings
        ]
        for entry in entries:
            if entry["pairing"] in failed:
                entry.update(skipped=None, error=failed[entry["pairing"]])
        _add_ratios(entries)
        return entries


def _brief(run: RunResult) -> str:
    if run.seconds is None:
        return f"FAILED: {run.error}"
    return f"{run.seconds:.3f} s"


def _entry(
    pairing: str,
    channels: int,
    size: int,
    transport: str,
    runs: list[RunResult] | None,
    skipped: str | None,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "pairing": pairing,
        "channels": channels,
        "transport": transport,
        "ram_bytes": size,
        "seconds": None,
        "gbps": None,
        "wire_gbps": None,
        "ratio_to_qemu": None,
        "skipped": skipped,
        "error": None,
    }
    if skipped or not runs:
        entry["skipped"] = skipped or "not run"
        return entry
    errors = [r.error for r in runs if r.error]
    entry["runs_seconds"] = [r.seconds for r in runs]
    entry["verified"] = not errors
    if errors:
        # A run that failed or delivered wrong memory voids the figure.
        entry["error"] = f"{len(errors)} of {len(runs)} runs failed: {errors[0]}"
        return entry
    seconds = median([r.seconds for r in runs if r.seconds is not None])
    entry.update(
        seconds=seconds,
        gbps=size / seconds / GB,
        wire_gbps=median([r.transferred for r in runs]) / seconds / GB,
        transferred_bytes=int(median([r.transferred for r in runs])),
        source_total_ms=median([r.source_total_ms or 0 for r in runs]),
        dest_hwm_bytes=max(r.dest_hwm for r in runs),
        dest_ready_rss_bytes=max(r.dest_ready_rss for r in runs) or None,
        source_overhead_bytes=max(r.source_overhead for r in runs),
        tracker=runs[0].tracker,
    )
    for key, values in (
        ("source_cpu_seconds", [r.source_cpu for r in runs]),
        ("dest_cpu_seconds", [r.dest_cpu for r in runs]),
    ):
        known = [v for v in values if v is not None]
        if known:
            entry[key] = median(known)
    cpu = [r.cpu_seconds for r in runs if r.cpu_seconds is not None]
    if cpu:
        entry["cpu_seconds"] = median(cpu)
        entry["cpu_busy"] = median(
            [
                r.cpu_seconds / (r.seconds * (os.cpu_count() or 1))
                for r in runs
                if r.cpu_seconds and r.seconds
            ]
        )
    return entry


def _add_ratios(entries: list[dict[str, Any]]) -> None:
    """Each pairing's time over QEMU→QEMU's at the same channel count, this run:
    of the medians, and run by run (`ratio_runs`). The pairings take turns, so
    run i of each met the machine as it was then: the spread of those ratios is
    how far one figure can be trusted, where the spread of each pairing's own
    times also counts the host's swings that hit both."""
    baseline = {
        e["channels"]: e
        for e in entries
        if e["pairing"] == "qemu-qemu" and e["seconds"] is not None
    }
    for entry in entries:
        base = baseline.get(entry["channels"])
        if base is None or entry["seconds"] is None:
            continue
        entry["ratio_to_qemu"] = entry["seconds"] / base["seconds"]
        entry["ratio_runs"] = [
            ours / theirs
            for ours, theirs in zip(entry["runs_seconds"], base["runs_seconds"], strict=True)
        ]


class _CpuOf:
    """The CPU time a process uses from now until `used()`: read once it has
    done its part (a QEMU stays paused, -S, after its migration, so its time
    stops there); None if it is gone by then."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self._start = process_cpu_seconds(pid)

    def used(self) -> float | None:
        end = process_cpu_seconds(self._pid)
        return None if self._start is None or end is None else end - self._start
