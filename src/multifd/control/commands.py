"""The QMP migration commands, mapped onto one MigrationSource or MigrationDestination:
argument checks and answer shapes as in QEMU's qapi/migration.json, no migration logic."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from .. import __version__
from ..channels import ChannelError, URIError
from ..migration.destination import MigrationDestination
from ..migration.params import MigrationConfigError
from ..migration.source import MigrationSource
from ..migration.state import MigrationStatus
from .protocol import QMPError

Endpoint = MigrationSource | MigrationDestination
Emit = Callable[[str, dict[str, Any] | None], None]
# An argument's JSON type and whether it is required.
Schema = Mapping[str, tuple[type, bool]]

_TYPE_NAMES = {str: "string", bool: "boolean", int: "integer", list: "array", dict: "object"}


# The QEMU release whose migration stream and QMP we speak, reported as our version in
# the greeting and query-version: clients decide from it what they may ask (libvirt
# refuses anything older than 4.2, tools gate multifd on it), so multifd's own 0.x
# would turn them away. Our name and version go in `package`, QEMU's free-form field.
QEMU_PROTOCOL_VERSION = (7, 2, 0)  # major, minor, micro


def check_arguments(arguments: Mapping[str, Any], schema: Schema, prefix: str = "") -> None:
    """Refuse unknown, missing and mistyped arguments, in QEMU's words."""
    for name, value in arguments.items():
        if name not in schema:
            raise QMPError(f"Parameter '{prefix}{name}' is unexpected")
        kind = schema[name][0]
        # JSON true is not an integer, although Python's bool is an int.
        mistyped = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if mistyped:
            raise QMPError(
                f"Invalid parameter type for '{prefix}{name}', expected: {_TYPE_NAMES[kind]}"
            )
    for name, (_, required) in schema.items():
        if required and name not in arguments:
            raise QMPError(f"Parameter '{prefix}{name}' is missing")


class MigrationCommands:
    """Runs QMP commands on `endpoint`.

    A server calls `attach(emit, on_quit)` to receive the endpoint's events (and
    QEMU's one unconditional event) and to hear `quit`; `detach()` stops both.
    """

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self._emit: Emit | None = None
        self._on_quit: Callable[[], None] | None = None
        self._table: dict[str, tuple[Callable[[dict[str, Any]], Any], Schema | None]] = {
            "migrate": (
                self._migrate,
                {
                    "uri": (str, True),
                    "blk": (bool, False),
                    "inc": (bool, False),
                    "detach": (bool, False),
                    "resume": (bool, False),
                },
            ),
            "migrate-incoming": (self._migrate_incoming, {"uri": (str, True)}),
            "migrate_cancel": (self._migrate_cancel, {}),
            "query-migrate": (lambda _: self.endpoint.query(), {}),
            "migrate-set-capabilities": (
                self._set_capabilities,
                {"capabilities": (list, True)},
            ),
            "query-migrate-capabilities": (
                lambda _: self.endpoint.settings.query_capabilities(),
                {},
            ),
            # Boxed: the parameters are the arguments themselves.
            "migrate-set-parameters": (self._set_parameters, None),
            "query-migrate-parameters": (lambda _: self.endpoint.settings.query_parameters(), {}),
            "query-status": (self._query_status, {}),
            "stop": (self._stop, {}),
            "cont": (self._cont, {}),
            "query-version": (lambda _: self.version(), {}),
            "query-commands": (self._query_commands, {}),
            "quit": (self._quit, {}),
        }

    @property
    def names(self) -> list[str]:
        return ["qmp_capabilities", *self._table]

    @staticmethod
    def version() -> dict[str, Any]:
        major, minor, micro = QEMU_PROTOCOL_VERSION
        return {
            "qemu": {"major": major, "minor": minor, "micro": micro},
            "package": f"multifd {__version__}",
        }

    def attach(self, emit: Emit, on_quit: Callable[[], None]) -> None:
        self._emit = emit
        self._on_quit = on_quit
        self.endpoint.on_event = self._forward

    def detach(self) -> None:
        # The endpoint keeps the forwarder: clearing its on_event could race
        # with a migration thread that has just read it.
        self._emit = None
        self._on_quit = None

    def _forward(self, name: str, data: dict[str, Any] | None) -> None:
        emit = self._emit
        if emit is not None:
            emit(name, data)

    def execute(self, command: str, arguments: dict[str, Any]) -> Any:
        entry = self._table.get(command)
        if entry is None:
            raise QMPError(f"The command {command} has not been found", "CommandNotFound")
        handler, schema = entry
        if schema is not None:
            check_arguments(arguments, schema)
        try:
            return handler(arguments)
        except MigrationConfigError as exc:
            raise QMPError(str(exc), exc.qmp_class) from None
        except (URIError, ChannelError) as exc:
            # A bad URI, or an address the destination cannot listen on.
            raise QMPError(str(exc)) from None

    # -- the commands -------------------------------------------------------------

    def _migrate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(self.endpoint, MigrationSource):
            raise QMPError(
                "Guest is waiting for an incoming migration "
                "(this is a destination: 'multifd incoming')"
            )
        if arguments.get("blk") or arguments.get("inc"):
            raise QMPError("Block migration (blk, inc) is not supported: only RAM blocks migrate")
        if arguments.get("resume"):
            raise QMPError("Postcopy recovery (resume) is not supported")
        if self.endpoint.run_state == "postmigrate":
            # The workload was handed over: a second copy of it would be stale
            # (after `cont` it runs here again, and may go once more).
            raise QMPError("Can't migrate the vm that was paused due to previous migration")
        self.endpoint.migrate(arguments["uri"])
        return {}

    def _migrate_incoming(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(self.endpoint, MigrationDestination):
            raise QMPError("For use with '-incoming defer' (this is a source: 'multifd migrate')")
        if self.endpoint.state.status is MigrationStatus.COMPLETED:
            # Another migration would overwrite the workload now running here.
            raise QMPError("The incoming migration has already completed")
        events_on = self.endpoint.settings.capability("events")
        self.endpoint.incoming(arguments["uri"])
        if not events_on:
            # QEMU announces the incoming side's setup even with `events` off.
            self._forward("MIGRATION", {"status": "setup"})
        return {}

    def _migrate_cancel(self, _: dict[str, Any]) -> dict[str, Any]:
        self.endpoint.cancel()
        return {}

    def _set_capabilities(self, arguments: dict[str, Any]) -> dict[str, Any]:
        entries = arguments["capabilities"]
        for entry in entries:
            if not isinstance(entry, dict):
                raise QMPError("Invalid parameter type for 'capabilities[]', expected: object")
            check_arguments(entry, {"capability": (str, True), "state": (bool, True)})
        self.endpoint.set_capabilities(entries)
        return {}

    def _set_parameters(self, arguments: dict[str, Any]) -> dict[str, Any]:
        self.endpoint.set_parameters(arguments)
        return {}

    def _query_status(self, _: dict[str, Any]) -> dict[str, Any]:
        status = self.endpoint.state.status
        if isinstance(self.endpoint, MigrationDestination):
            # The workload lives here only once everything has landed.
            run_state = "running" if status is MigrationStatus.COMPLETED else "inmigrate"
        else:
            run_state = self.endpoint.run_state
        return {"status": run_state, "running": run_state == "running", "singlestep": False}

    def _stop(self, _: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(self.endpoint, MigrationSource):
            # QEMU's would not start the VM once it arrived; ours runs what it
            # received as soon as it has it, and has no workload before.
            raise QMPError("stop is for a source: a destination resumes as soon as it has loaded")
        self._on_workload(self.endpoint.pause)
        return {}

    def _cont(self, _: dict[str, Any]) -> dict[str, Any]:
        """QEMU's `cont`. A destination runs what it received as soon as it
        has it (QEMU's autostart), so there, as for anything already running,
        it has nothing to do."""
        if isinstance(self.endpoint, MigrationSource):
            self._on_workload(self.endpoint.resume)
        return {}

    @staticmethod
    def _on_workload(action: Callable[[], None]) -> None:
        """Pause or resume the application, whose exception is the answer."""
        try:
            action()
        except MigrationConfigError:
            raise
        except Exception as exc:
            raise QMPError(f"internal error: {type(exc).__name__}: {exc}") from None

    def _query_commands(self, _: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": name} for name in self.names]

    def _quit(self, _: dict[str, Any]) -> dict[str, Any]:
        if self._on_quit is not None:
            self._on_quit()
        return {}
