"""The `multifd incoming` and `multifd migrate` daemons: RAM blocks, an endpoint, its
QMP server, and when to stop (completion, `quit`, or a signal that cancels cleanly)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from ..channels import MigrationURI, TcpURI, UnixURI, parse_uri
from ..memory import RAMBlock
from ..migration.destination import MigrationDestination
from ..migration.source import MigrationSource
from ..migration.state import MigrationStatus
from .commands import MigrationCommands
from .options import BlockSpec, FilesBefore, OptionError, open_blocks
from .server import QMPServer, SocketAddress, parse_qmp_address

POLL_INTERVAL = 0.1  # seconds between looks at the endpoint, the server and signals
DEFER = "defer"  # QEMU's `-incoming defer`: wait for migrate-incoming


class Role(Enum):
    INCOMING = "incoming"
    MIGRATE = "migrate"


@dataclass
class DaemonOptions:
    blocks: list[BlockSpec]
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    uri: str | None = None  # None (or "defer" when incoming): wait for a QMP command
    qmp: str | None = None
    uuid: bytes = bytes(16)  # QEMU's -uuid; all zeros is QEMU's unset one


class Daemon:
    """One endpoint, served over QMP if asked, until it is done.

    It is done on `quit`, on a signal (`request_stop`, which cancels a running
    migration), or, when there is no QMP to ask it anything more, as soon as
    the migration ends. With QMP both ends stay until `quit`, as QEMU's do
    (its source in `postmigrate`, its destination running the VM): tools ask
    `query-migrate` once they have seen the `completed` event.
    """

    def __init__(self, role: Role, options: DaemonOptions) -> None:
        self.role = role
        self.uri = None if options.uri == DEFER and role is Role.INCOMING else options.uri
        if self.uri is None and options.qmp is None:
            raise OptionError(
                "without a migration URI the daemon waits for QMP commands: give --qmp SOCKET"
            )
        if not options.blocks:
            raise OptionError("at least one --block NAME=SIZE[@PATH] is needed")
        # Checked before a block file is created or extended.
        target = None if self.uri is None else parse_uri(self.uri)
        self.qmp = None if options.qmp is None else parse_qmp_address(options.qmp)
        _check_apart(target, self.qmp)
        create = role is Role.INCOMING
        # Kept until start() succeeds: a daemon that never served puts its files back.
        self._files_before: FilesBefore | None = FilesBefore.of(options.blocks) if create else None
        try:
            self.blocks: list[RAMBlock] = open_blocks(options.blocks, create=create)
        except BaseException:
            self._restore_files()
            raise
        self.endpoint: MigrationSource | MigrationDestination
        try:
            kind = MigrationDestination if role is Role.INCOMING else MigrationSource
            self.endpoint = kind(
                self.blocks,
                capabilities=options.capabilities,
                parameters=options.parameters,
                uuid=options.uuid,
            )
        except BaseException:
            self._close_blocks()
            raise
        self.server: QMPServer | None = None
        self.listening: str | None = None  # the incoming address actually bound
        self.stop_signal: int | None = None

    def start(self) -> None:
        """Open the QMP socket, then start the migration if a URI was given."""
        try:
            if self.qmp is not None:
                self.server = QMPServer(self.qmp, MigrationCommands(self.endpoint))
                self.server.start()
            if self.uri is not None:
                if isinstance(self.endpoint, MigrationDestination):
                    self.listening = self.endpoint.incoming(self.uri)
                else:
                    self.endpoint.migrate(self.uri)
        except BaseException:
            self.close()
            raise
        self._files_before = None

    def request_stop(self, signum: int) -> None:
        """From a signal handler: only records it; `run` does the rest."""
        self.stop_signal = signum

    def run(self, progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Wait until done; then cancel what still runs and return the last query-migrate."""
        while not self._done():
            if progress is not None and self.endpoint.state.status is not MigrationStatus.NONE:
                progress(self.endpoint.query())
            time.sleep(POLL_INTERVAL)
        if self.endpoint.state.status.live:
            self.endpoint.cancel()
        return self.endpoint.wait()

    def _done(self) -> bool:
        if self.stop_signal is not None:
            return True
        if self.server is not None and self.server.quit_requested.is_set():
            return True
        return self.server is None and self.endpoint.state.status.finished

    def close(self) -> None:
        """Cancel a running migration, close the QMP socket and the blocks."""
        self.endpoint.cancel()
        if self.server is not None:
            self.server.close()
        self.endpoint.wait()
        self._close_blocks()

    def _close_blocks(self) -> None:
        for block in self.blocks:
            block.close()
        self._restore_files()

    def _restore_files(self) -> None:
        if self._files_before is not None:
            self._files_before.restore()
            self._files_before = None

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _check_apart(migration: MigrationURI | None, qmp: SocketAddress | None) -> None:
    """One socket cannot be both: the migration's listener would replace the QMP
    socket (or a source would send its stream to its own QMP server)."""
    if migration is None or qmp is None:
        return
    if isinstance(migration, UnixURI) and isinstance(qmp, UnixURI):
        same = os.path.realpath(migration.path) == os.path.realpath(qmp.path)
    else:
        same = migration == qmp and isinstance(qmp, TcpURI) and qmp.port != 0
    if same:
        raise OptionError(
            f"--qmp {qmp} and the migration URI {migration} are the same socket: give each its own"
        )


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stoppable(Protocol):
    def request_stop(self, signum: int) -> None:
        """From a signal handler: record it only, for the owner to act on."""


class StopRequest:
    """For a command that is not a daemon (the demo, save, restore): a signal
    handler may only record the signal; the command looks at it where it
    waits, cancels what runs and cleans up."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def request_stop(self, signum: int) -> None:
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None


@contextlib.contextmanager
def stop_on_signals(target: Stoppable) -> Iterator[None]:
    """SIGINT and SIGTERM stop a daemon (or the demo) cleanly (main thread only)."""
    previous = {
        s: signal.signal(s, lambda signum, _frame: target.request_stop(signum))
        for s in STOP_SIGNALS
    }
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
