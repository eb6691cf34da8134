"""A real QEMU for the bulk benchmark: paused before the firmware runs (-S), its
guest RAM a shared file the benchmark filled, configured for multifd over QMP."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..channels import socket_address_uri
from ..qemu.launch import QemuVM
from ..qemu.qmp import QMPConnection
from ..qemu.snapshot import UNLIMITED_BANDWIDTH
from ._sampling import proc_status
from .options import BULK_DOWNTIME_LIMIT_MS

POLL = 0.02
FINISHED = ("completed", "failed", "cancelled")


class RamFileVM:
    """QEMU with `-machine pc,memory-backend=mem` backed by `ram_path` (block "mem").

    `prealloc` (for a destination) has QEMU fault its RAM in before the clock
    starts, as the Python destination does with its blocks.
    """

    def __init__(
        self,
        folder: Path,
        name: str,
        ram_path: Path,
        size: int,
        *,
        incoming: bool,
        prealloc: bool = False,
    ) -> None:
        backend = f"memory-backend-file,id=mem,size={size},mem-path={ram_path},share=on"
        if prealloc:
            backend += ",prealloc=on"
        self.vm = QemuVM(
            folder,
            name,
            memory=f"{size >> 20}M",
            machine="pc,memory-backend=mem",
            incoming=incoming,
            guest=False,
            extra=("-S", "-object", backend),
        )
        # One session for the whole migration: QEMU sends events only to
        # monitors connected when they happen.
        self.qmp: QMPConnection = self.vm.connect()

    @property
    def pid(self) -> int:
        return self.vm.process.pid

    def configure(self, channels: int, *, source: bool) -> None:
        self.qmp.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "multifd", "state": True},
                    {"capability": "events", "state": True},
                ]
            },
        )
        parameters: dict[str, Any] = {
            "multifd-channels": channels,
            "multifd-compression": "none",
        }
        if source:
            parameters["max-bandwidth"] = UNLIMITED_BANDWIDTH
            parameters["downtime-limit"] = BULK_DOWNTIME_LIMIT_MS
        self.qmp.execute("migrate-set-parameters", parameters)

    def listen(self, uri: str) -> str:
        """Start `migrate-incoming`; returns the address bound (tcp port 0 resolved)."""
        self.qmp.execute("migrate-incoming", {"uri": uri})
        if not uri.startswith("tcp:"):
            return uri
        for address in self.qmp.execute("query-migrate").get("socket-address", []):
            if address.get("type") == "inet":
                return str(socket_address_uri(address))
        raise RuntimeError(f"QEMU did not report the address it listens on for {uri}")

    def wait(self, timeout: float, *, source: bool) -> dict[str, Any]:
        """Poll query-migrate until the migration has ended or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.qmp.execute("query-migrate")
            status = info.get("status")
            # A source sets "completed" a moment before it computes total-time:
            # a query in between reads 0, so ask again.
            settled = not source or status != "completed" or info.get("total-time")
            if (status in FINISHED and settled) or time.monotonic() > deadline:
                return info
            time.sleep(POLL)

    def completed_at(self) -> float | None:
        """When QEMU said `completed`, from its MIGRATION event (wall clock, µs)."""
        for event in self.qmp.events:
            if event.get("event") == "MIGRATION" and event["data"].get("status") == "completed":
                stamp = event["timestamp"]
                return stamp["seconds"] + stamp["microseconds"] / 1e6
        return None

    def memory(self) -> dict[str, int]:
        return proc_status(self.pid)

    def close(self) -> None:
        self.qmp.close()
        self.vm.close()

    def __enter__(self) -> RamFileVM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
