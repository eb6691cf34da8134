"""Fixtures for the control-plane tests: a leak check after every test, short socket
paths, endpoints served over QMP in this process, and daemons run as subprocesses."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from control_support import BLOCK_SIZE, DaemonProcess, Served, random_fill

import leakcheck
from multifd.control import MigrationCommands, QMPServer
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.source import MigrationSource


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After every test: no thread and no file descriptor it started is left."""
    with leakcheck.no_leaks():
        yield


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can pass sun_path's 107)."""
    path = Path(tempfile.mkdtemp(prefix="qmp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(sock_dir: Path) -> Iterator[Callable[..., Served]]:
    """Make a source or destination served on a unix QMP socket; all are closed,
    their migrations cancelled and their threads joined at teardown."""
    made: list[Served] = []

    def make(kind: str, *, seed: int = 1, size: int = BLOCK_SIZE, **server_options: Any) -> Served:
        block = RAMBlock.anonymous("pc.ram", size)
        endpoint: MigrationSource | MigrationDestination
        if kind == "source":
            random_fill(block, seed)
            endpoint = MigrationSource([block])
        else:
            endpoint = MigrationDestination([block])
        server = QMPServer(
            str(sock_dir / f"{kind}{len(made)}.qmp"), MigrationCommands(endpoint), **server_options
        )
        server.start()
        served = Served(endpoint, server, block)
        made.append(served)
        return served

    yield make
    for served in made:
        served.server.close()
        served.endpoint.cancel()
        served.endpoint.wait()
        served.block.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(*args: str, label: str = "daemon") -> DaemonProcess:
        proc = DaemonProcess(list(args), tmp_path, f"{label}{len(started)}")
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
