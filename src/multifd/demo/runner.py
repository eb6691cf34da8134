"""Runs the demo: a destination process, a source with a live workload, a check.

The destination runs in a process of its own (as it would on another host),
reports the address it bound, and after the migration a hash of each block;
the source compares them with its own blocks, frozen since switchover.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing as mp
import os
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any

from ..control.daemon import STOP_SIGNALS, StopRequest
from ..memory import RAMBlock, validate_size
from ..migration.destination import MigrationDestination
from ..migration.params import MigrationSettings
from ..migration.source import MigrationSource
from ..progress import human
from .workload import Workload, fill

BLOCK_NAME = "pc.ram"
DESTINATION_TIMEOUT = 600.0  # the longest wait for an answer from the destination
STOP_TIMEOUT = 10.0  # how long a destination told to stop may take before it is killed
POLL_INTERVAL = 0.2  # seconds between looks at a stop request


class DemoError(RuntimeError):
    """The demo could not run to its end: the destination process failed or went away."""


class DemoStopped(Exception):
    """The demo was stopped on request; it cancelled what ran and cleaned up first."""


def check_size(size: int) -> int:
    """`size` if the demo can hold a block of it twice on this host, as it must:
    the source and the destination process each write all of their copy."""
    validate_size(BLOCK_NAME, size)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 2 * size > memory:
        raise ValueError(
            f"{human(size)} is too large: the source and the destination each hold a copy, "
            f"so at most {human(memory // 2)} fits in this host's {human(memory)} of memory"
        )
    return size


@dataclass
class DemoOptions:
    size: int = 1 << 30
    channels: int = 4
    dirty_rate: int = 128 << 20
    compression: str = "none"
    multifd: bool = True
    transport: str = "unix"
    downtime_limit: int = 300
    max_bandwidth: int = 0  # unlimited on one host
    auto_converge: bool = True
    extra_parameters: dict[str, Any] = field(default_factory=dict)

    def capabilities(self) -> dict[str, bool]:
        # return-path: the source's final status is the destination's verdict.
        return {
            "multifd": self.multifd,
            "auto-converge": self.auto_converge,
            "events": True,
            "return-path": True,
        }

    def parameters(self) -> dict[str, Any]:
        return {
            "multifd-channels": self.channels,
            "multifd-compression": self.compression,
            "downtime-limit": self.downtime_limit,
            "max-bandwidth": self.max_bandwidth,
            **self.extra_parameters,
        }


def block_digest(block: RAMBlock) -> str:
    return hashlib.sha256(block.buffer).hexdigest()


def _destination_main(options: DemoOptions, uri: str, conn: Connection) -> None:
    """The destination process: receive, then report the status and a hash."""
    # The parent owns this process: a Ctrl-C or SIGTERM sent to the whole
    # process group is the parent's to act on, and it stops this one by closing
    # the pipe, as its death would. The signals came blocked (see
    # _start_destination) so that none could interrupt the start-up.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    block: RAMBlock | None = None
    destination: MigrationDestination | None = None
    try:
        block = RAMBlock.anonymous(BLOCK_NAME, options.size)
        block.prefault()
        resumed: dict[str, Any] = {}
        destination = MigrationDestination(
            [block],
            capabilities=options.capabilities(),
            parameters=options.parameters(),
            on_resume=lambda state: resumed.update(state=state, at=time.time()),
        )
        conn.send({"uri": destination.incoming(uri)})
        while not destination.state.wait_finished(POLL_INTERVAL):
            if conn.poll():  # the parent closed the pipe: it gave up
                destination.cancel()
        info = destination.wait()
        digest = block_digest(block) if info["status"] == "completed" else None
        conn.send({"query": info, "digest": digest, "state": resumed.get("state")})
    except Exception as exc:
        # The parent may be gone already: then there is no one to tell.
        with contextlib.suppress(OSError):
            conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        if destination is not None:
            destination.cancel()
        if block is not None:
            block.close()
        conn.close()


def _start_destination(
    ctx: SpawnContext, options: DemoOptions, uri: str, conn: Connection
) -> SpawnProcess:
    process = ctx.Process(target=_destination_main, args=(options, uri, conn), daemon=True)
    # The child inherits the blocked signals, so a Ctrl-C for the process
    # group cannot break into its start-up with a traceback before it has set
    # them aside; here they are only held back until the mask is restored.
    # Starting the resource tracker, which every spawn needs, unblocks them:
    # it must be running first.
    resource_tracker.ensure_running()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return process


def _answer(parent: Connection, process: SpawnProcess, stop: StopRequest) -> dict[str, Any]:
    """The destination's next message; DemoStopped if a stop comes first."""
    deadline = time.monotonic() + DESTINATION_TIMEOUT
    while True:
        if stop.requested:
            raise DemoStopped
        if parent.poll(POLL_INTERVAL):
            break
        if time.monotonic() > deadline:
            raise DemoError(f"the destination process gave no answer in {DESTINATION_TIMEOUT} s")
    try:
        message: dict[str, Any] = parent.recv()
    except EOFError:
        process.join(STOP_TIMEOUT)
        raise DemoError(
            f"the destination process ended (exit code {process.exitcode}) without an answer"
        ) from None
    if "error" in message:
        raise DemoError(f"destination: {message['error']}")
    return message


def _end(process: SpawnProcess) -> None:
    process.join(STOP_TIMEOUT)
    if process.is_alive():
        process.kill()
        process.join()


def run_demo(
    options: DemoOptions,
    progress: Callable[[dict[str, Any]], None] | None = None,
    events: Callable[[str, dict[str, Any]], None] | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Migrate a live block to a destination process; returns the source's query()
    plus the destination's figures and `memory_identical`.

    Bad options raise ValueError (MigrationConfigError for a parameter) before
    anything starts; a destination that fails raises DemoError, and a `stop`
    request DemoStopped. Either way the migration is cancelled, the destination
    process ended and the temporary folder removed first."""
    stop = stop if stop is not None else StopRequest()
    check_size(options.size)
    # The engine's checks of every capability and parameter, before anything starts.
    MigrationSettings(options.capabilities(), options.parameters())
    with tempfile.TemporaryDirectory(prefix="multifd-demo-") as tmp:
        uri = (
            f"unix:{os.path.join(tmp, 'migration.sock')}"
            if options.transport == "unix"
            else ("tcp:127.0.0.1:0")
        )
        block = RAMBlock.anonymous(BLOCK_NAME, options.size)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        process: SpawnProcess | None = None
        workload: Workload | None = None
        source: MigrationSource | None = None
        try:
            process = _start_destination(ctx, options, uri, child)
            child.close()
            fill(block.array, stopped=lambda: stop.requested)
            workload = Workload(block.array, options.dirty_rate)
            hello = _answer(parent, process, stop)
            source = MigrationSource(
                [block],
                capabilities=options.capabilities(),
                parameters=options.parameters(),
                on_stop=workload.pause,
                on_resume=workload.resume,
                throttle=workload.throttle,
                save_state=lambda: f"pages written: {workload.pages_written}".encode(),
                on_event=events,
            )
            workload.start()
            source.migrate(hello["uri"])
            while not source.state.wait_finished(POLL_INTERVAL):
                if stop.requested:
                    source.cancel()
                elif progress is not None:
                    progress(source.query())
            result = source.wait()
            if progress is not None:
                progress(result)
            report = _answer(parent, process, stop)
            # The workload stays stopped after a completed migration, so this
            # is the memory as it was at switchover.
            source_digest = block_digest(block)
        finally:
            if source is not None:
                source.cancel()  # nothing to do unless something failed mid-migration
            if workload is not None:
                workload.stop()
            child.close()
            # A destination still running takes the closed pipe as word to stop.
            parent.close()
            if process is not None:
                _end(process)
            block.close()
    destination = report["query"]
    result["destination"] = {
        "status": destination.get("status"),
        "downtime": destination.get("x-downtime"),
        "error-desc": destination.get("error-desc"),
        "state": (report.get("state") or b"").decode(errors="replace"),
    }
    result["memory_identical"] = (
        result["status"] == "completed" and report.get("digest") == source_digest
    )
    return result
