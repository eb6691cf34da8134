"""What a source and a destination share: capabilities changed only between
migrations, parameters also during one when the migration reads them as it goes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from .params import MigrationConfigError, MigrationSettings
from .state import MigrationState


class Endpoint:
    """One end of a migration: its capabilities, parameters and state."""

    settings: MigrationSettings
    state: MigrationState
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

    def _refuse_while_running(self) -> None:
        if self.state.status.live:
            raise MigrationConfigError("There's a migration process in progress")
