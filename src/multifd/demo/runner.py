"""Runs the demo: a destination process, a source with a live workload, a check.

The destination runs in a process of its own (as it would on another host),
reports the address it bound, and after the migration a hash of each block;
the source compares them with its own blocks, frozen since switchover.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from ..memory import RAMBlock
from ..migration.destination import MigrationDestination
from ..migration.source import MigrationSource
from .workload import Workload, fill

BLOCK_NAME = "pc.ram"
DESTINATION_TIMEOUT = 600.0


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
    block = RAMBlock.anonymous(BLOCK_NAME, options.size)
    block.prefault()
    resumed: dict[str, Any] = {}
    destination = MigrationDestination(
        [block],
        capabilities=options.capabilities(),
        parameters=options.parameters(),
        on_resume=lambda state: resumed.update(state=state, at=time.time()),
    )
    try:
        conn.send({"uri": destination.incoming(uri)})
        info = destination.wait(DESTINATION_TIMEOUT)
        if not destination.state.status.finished:
            destination.cancel()
            info = destination.query()
        digest = block_digest(block) if info["status"] == "completed" else None
        conn.send({"query": info, "digest": digest, "state": resumed.get("state")})
    except Exception as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        block.close()
        conn.close()


def run_demo(
    options: DemoOptions,
    progress: Callable[[dict[str, Any]], None] | None = None,
    events: Callable[[str, dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Migrate a live block to a destination process; returns the source's query()
    plus the destination's figures and `memory_identical`."""
    with tempfile.TemporaryDirectory(prefix="multifd-demo-") as tmp:
        uri = (
            f"unix:{os.path.join(tmp, 'migration.sock')}"
            if options.transport == "unix"
            else ("tcp:127.0.0.1:0")
        )
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_destination_main, args=(options, uri, child), daemon=True)
        process.start()
        child.close()
        block = RAMBlock.anonymous(BLOCK_NAME, options.size)
        workload: Workload | None = None
        try:
            fill(block.array)
            workload = Workload(block.array, options.dirty_rate)
            hello = parent.recv()
            if "error" in hello:
                raise RuntimeError(f"destination: {hello['error']}")
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
            while not source.state.wait_finished(0.2):
                if progress is not None:
                    progress(source.query())
            result = source.wait()
            if progress is not None:
                progress(result)
            # The workload stays stopped after a completed migration, so this
            # is the memory as it was at switchover.
            source_digest = block_digest(block)
            report = parent.recv() if parent.poll(DESTINATION_TIMEOUT) else {"error": "no answer"}
        finally:
            if workload is not None:
                workload.stop()
            block.close()
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
            parent.close()
    destination = report.get("query", {})
    result["destination"] = {
        "status": destination.get("status"),
        "downtime": destination.get("x-downtime"),
        "error-desc": destination.get("error-desc", report.get("error")),
        "state": (report.get("state") or b"").decode(errors="replace"),
    }
    result["memory_identical"] = (
        result["status"] == "completed" and report.get("digest") == source_digest
    )
    return result
