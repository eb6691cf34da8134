"""Shared helpers for the control-plane tests: QMP clients with bounded waits,
endpoints served in this process, and `multifd` daemons run as subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from qemu.qmp import QMPClient

from multifd.control import QMPServer
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.source import MigrationSource

TIMEOUT = 20.0  # the bound on any one wait in these tests
BLOCK_SIZE = 4 << 20
T = TypeVar("T")


def run(coroutine: Awaitable[T], timeout: float = TIMEOUT) -> T:
    """Run a client coroutine to its end, bounded."""

    async def bounded() -> T:
        return await asyncio.wait_for(coroutine, timeout)

    return asyncio.run(bounded())


def random_fill(block: RAMBlock, seed: int) -> None:
    """Pseudo-random pages with some zero pages among them."""
    rows = block.page_rows(np.uint64)
    rows[:] = np.random.default_rng(seed).integers(0, 2**63, size=rows.shape, dtype=np.uint64)
    rows[::7] = 0


@dataclass
class Served:
    """An endpoint with its QMP server, as a daemon has them."""

    endpoint: MigrationSource | MigrationDestination
    server: QMPServer
    block: RAMBlock

    @property
    def source(self) -> MigrationSource:
        assert isinstance(self.endpoint, MigrationSource)
        return self.endpoint

    @property
    def destination(self) -> MigrationDestination:
        assert isinstance(self.endpoint, MigrationDestination)
        return self.endpoint

    @property
    def path(self) -> str:
        assert self.server.address is not None
        return self.server.address.removeprefix("unix:")


async def connect(path: str | Path, *, negotiate: bool = True, name: str = "test") -> QMPClient:
    client = QMPClient(name)
    client.negotiate = negotiate
    await client.connect(str(path))
    return client


async def ask(client: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """`client.execute`, its answer typed for indexing."""
    return await client.execute(command, arguments)


async def next_event(client: QMPClient, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The next event called `name`, skipping others."""

    async def wait() -> dict[str, Any]:
        while True:
            message = await client.events.get()
            if message["event"] == name:
                return dict(message)

    return await asyncio.wait_for(wait(), timeout)


async def statuses_until(
    client: QMPClient, final: tuple[str, ...], timeout: float = TIMEOUT
) -> list[str]:
    """Every MIGRATION status from now until one of `final`, in order."""
    seen: list[str] = []
    while not seen or seen[-1] not in final:
        seen.append((await next_event(client, "MIGRATION", timeout))["data"]["status"])
    return seen


async def events_until(
    client: QMPClient, final: tuple[str, ...], timeout: float = TIMEOUT
) -> list[str]:
    """Every event from now until a MIGRATION status in `final`, in order: a
    MIGRATION event as its status, MIGRATION_PASS as "pass N", others by name."""
    seen: list[str] = []
    while not seen or seen[-1] not in final:
        message = await asyncio.wait_for(client.events.get(), timeout)
        data = message.get("data", {})
        if message["event"] == "MIGRATION":
            seen.append(data["status"])
        elif message["event"] == "MIGRATION_PASS":
            seen.append(f"pass {data['pass']}")
        else:
            seen.append(message["event"])
    return seen


CAPABILITIES = [
    {"capability": "multifd", "state": True},
    {"capability": "events", "state": True},
]


async def configure(client: QMPClient, **parameters: Any) -> None:
    """multifd and events on, and the parameters given (keys with `_` for `-`)."""
    await client.execute("migrate-set-capabilities", {"capabilities": CAPABILITIES})
    await client.execute(
        "migrate-set-parameters", {k.replace("_", "-"): v for k, v in parameters.items()}
    )


# ---- daemons as subprocesses ---------------------------------------------------


class DaemonProcess:
    """`python -m multifd ARGS`, its output in files; killed at teardown if still up."""

    def __init__(self, args: list[str], workdir: Path, label: str) -> None:
        self.stdout_path = workdir / f"{label}.out"
        self.stderr_path = workdir / f"{label}.err"
        self.args = args
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "multifd", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(
                f"multifd {' '.join(self.args)} did not exit in {timeout} s\n"
                f"stdout: {self.stdout}\nstderr: {self.stderr}"
            ) from None

    def wait_for_path(self, path: Path, timeout: float = TIMEOUT) -> None:
        """Until `path` exists (a socket the daemon binds), or fail if it exits."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited {self.process.returncode}: {self.stderr}")
            assert time.monotonic() < deadline, f"{path} did not appear: {self.stderr}"
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def connect_when_up(
    path: Path, proc: DaemonProcess, timeout: float = TIMEOUT, name: str = "test"
) -> QMPClient:
    """Connect to a daemon's QMP socket once it listens."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.process.poll() is not None:
            raise AssertionError(f"daemon exited {proc.process.returncode}: {proc.stderr}")
        if path.exists():
            try:
                return await connect(path, name=name)
            except Exception:
                if time.monotonic() > deadline:
                    raise
        assert time.monotonic() < deadline, f"QMP socket {path} never answered"
        await asyncio.sleep(0.05)


async def hang_up(client: QMPClient) -> None:
    """Disconnect, accepting that a daemon that exited has hung up first."""
    with contextlib.suppress(EOFError, ConnectionResetError):
        await client.disconnect()
