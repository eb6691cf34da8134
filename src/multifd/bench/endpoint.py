"""The Python destination of a benchmark, in a spawned process of its own so that
source and destination do not share a GIL, and its memory can be measured alone."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..memory import RAMBlock
from ..migration.destination import MigrationDestination
from ._sampling import proc_status


@dataclass(frozen=True)
class DestinationSpec:
    """What the destination process makes and where it listens."""

    blocks: tuple[tuple[str, int], ...]  # (name, size): the source's block list
    uri: str
    channels: int
    timeout: float
    digest: bool = True  # hash every block after a completed migration


def _destination_main(spec: DestinationSpec, conn: Connection) -> None:
    blocks: list[RAMBlock] = []
    destination: MigrationDestination | None = None
    try:
        for name, size in spec.blocks:
            block = RAMBlock.anonymous(name, size)
            # Made and faulted in before the clock starts, as QEMU's prealloc=on:
            # the benchmark measures the data path, not first-touch faults.
            block.prefault()
            blocks.append(block)
        resumed: dict[str, float] = {}

        def on_resume(state: object) -> None:
            # The moment every page has landed: what "completed" means here;
            # and this process's CPU time then (every thread's), before the digests.
            resumed.setdefault("at", time.time())
            resumed.setdefault("cpu", time.process_time())

        destination = MigrationDestination(
            blocks,
            capabilities={"multifd": True},
            parameters={"multifd-channels": spec.channels},
            on_resume=on_resume,
        )
        uri = destination.incoming(spec.uri)
        cpu_ready = time.process_time()
        conn.send({"uri": uri, "rss_ready": proc_status().get("VmRSS", 0)})
        info = destination.wait(spec.timeout)
        if not destination.state.status.finished:
            destination.cancel()
            info = destination.query()
        memory = proc_status()
        completed = info["status"] == "completed"
        digests = {b.name: b.sha256() for b in blocks} if completed and spec.digest else {}
        conn.send(
            {
                "query": info,
                "completed_at": resumed.get("at"),
                "cpu_seconds": resumed["cpu"] - cpu_ready if "cpu" in resumed else None,
                "digests": digests,
                "vm_hwm": memory.get("VmHWM", 0),
                "vm_rss": memory.get("VmRSS", 0),
            }
        )
    except Exception as exc:
        # The benchmark may be gone (that is often why we are here): then
        # there is no one to tell.
        with contextlib.suppress(OSError):
            conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        # The listener's thread is not a daemon: a destination left listening
        # would keep this process alive forever.
        if destination is not None:
            destination.cancel()
        for block in blocks:
            block.close()
        conn.close()


class DestinationProcess:
    """Starts the destination process; `uri` is where it listens once started."""

    def __init__(self, spec: DestinationSpec) -> None:
        self.spec = spec
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_destination_main, args=(spec, child), name="bench-destination", daemon=True
        )
        self._process.start()
        child.close()
        self._reported = False
        hello = self._receive(spec.timeout)
        if "error" in hello:
            self.close()
            raise RuntimeError(f"destination process: {hello['error']}")
        self.uri: str = hello["uri"]
        self.rss_ready: int = hello["rss_ready"]

    def _receive(self, timeout: float) -> dict[str, Any]:
        if not self._conn.poll(timeout):
            return {"error": f"no answer within {timeout:g} s"}
        try:
            return self._conn.recv()
        except EOFError:
            return {"error": f"the process exited ({self._process.exitcode})"}

    def result(self) -> dict[str, Any]:
        """The destination's report once its migration has ended (or an `error`)."""
        report = self._receive(self.spec.timeout + 60)
        self._reported = "error" not in report
        return report

    def close(self) -> None:
        # A process that has reported exits by itself; one that has not is
        # waiting for a migration that will not come.
        self._process.join(30 if self._reported else 0)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def __enter__(self) -> DestinationProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
