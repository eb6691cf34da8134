"""What a source and a destination share: capabilities changed only between
migrations, parameters also during one when the migration reads them as it goes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from .params import MigrationConfigError, MigrationSettings
from .state import MigrationState, MigrationStatus

log = logging.getLogger(__name__)

# A QMP-style event: its name and data.
Event = Callable[[str, dict[str, Any] | None], None]


class Endpoint:
    """One end of a migration: its capabilities, parameters and state."""

    settings: MigrationSettings
    state: MigrationState
    on_event: Event | None
    # The parameters this side reads once, as a migration starts.
    setup_parameters: ClassVar[frozenset[str]]

    def set_capabilities(self, states: Mapping[str, bool] | Sequence[Mapping[str, Any]]) -> None:
        self._refuse_while_running()
        self.settings.set_capabilities(states)

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        """As QEMU, during a migration too: it reads the new max-bandwidth,
        downtime-limit and auto-converge values as it goes."""
        fixed = self.setup_parameters if self.state.status.live else frozenset()
        self.settings.set_parameters(values, fixed)

    def _status_changed(self, status: MigrationStatus) -> None:
        if self.settings.capability("events"):
            self._event("MIGRATION", {"status": status.value})

    def _event(self, name: str, data: dict[str, Any] | None) -> None:
        """Tell the application. A listener that raises is logged and left
        there: its exception must not stop a status change halfway, which
        would leave the migration in setup or cancelling for good, and this
        end unable to start another."""
        # Read once: a QMP server may detach it from another thread.
        on_event = self.on_event
        if on_event is None:
            return
        try:
            on_event(name, data)
        except Exception:
            log.exception("the on_event listener raised on %s %s", name, data)

    def _refuse_while_running(self) -> None:
        if self.state.status.live:
            raise MigrationConfigError("There's a migration process in progress")
