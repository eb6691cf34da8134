"""What a source and a destination share: settings changed only between migrations."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .params import MigrationConfigError, MigrationSettings
from .state import MigrationState


class Endpoint:
    """One end of a migration: its capabilities, parameters and state."""

    settings: MigrationSettings
    state: MigrationState

    def set_capabilities(self, states: Mapping[str, bool] | Sequence[Mapping[str, Any]]) -> None:
        self._refuse_while_running()
        self.settings.set_capabilities(states)

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        self._refuse_while_running()
        self.settings.set_parameters(values)

    def _refuse_while_running(self) -> None:
        if self.state.status.live:
            raise MigrationConfigError("There's a migration process in progress")
