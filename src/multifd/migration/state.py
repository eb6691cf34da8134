"""The migration state machine, with QEMU's status names and the first error.

Transitions are a table, not flags: a migration goes setup → active → completed,
or to failed / cancelled from any live state, and never back. There is no
`device` status: QEMU 7.2 enters it only with `pause-before-switchover`, which
we do not implement, so a switchover stays `active` (the stopped workload shows
in query-status, as QEMU's run state `finish-migrate`).
"""

from __future__ import annotations

import inspect
import threading
import time
import weakref
from collections.abc import Callable
from enum import Enum


class MigrationStatus(Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (
            MigrationStatus.COMPLETED,
            MigrationStatus.FAILED,
            MigrationStatus.CANCELLED,
        )

    @property
    def live(self) -> bool:
        return self in (
            MigrationStatus.SETUP,
            MigrationStatus.ACTIVE,
            MigrationStatus.CANCELLING,
        )


_S = MigrationStatus
_FINISHED = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED})
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    _S.NONE: frozenset({_S.SETUP}),
    _S.SETUP: frozenset({_S.ACTIVE, _S.CANCELLING, _S.FAILED}),
    _S.ACTIVE: frozenset({_S.COMPLETED, _S.CANCELLING, _S.FAILED}),
    _S.CANCELLING: frozenset({_S.CANCELLED, _S.FAILED}),
    # A finished migration may be started again.
    _S.COMPLETED: frozenset({_S.SETUP}),
    _S.FAILED: frozenset({_S.SETUP}),
    _S.CANCELLED: frozenset({_S.SETUP}),
}


class MigrationState:
    """Thread-safe status, the first error, and a listener for status events."""

    def __init__(self, on_change: Callable[[MigrationStatus], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.status = MigrationStatus.NONE
        self.error: str | None = None
        self.times: dict[MigrationStatus, float] = {}
        # The endpoint that owns this state listens with one of its methods:
        # held strongly, it would keep the endpoint (and its views of RAM)
        # alive in a cycle until the garbage collector runs.
        self._on_change: Callable[[], Callable[[MigrationStatus], None] | None] | None = None
        if inspect.ismethod(on_change):
            self._on_change = weakref.WeakMethod(on_change)
        elif on_change is not None:
            self._on_change = lambda: on_change

    def set(self, new: MigrationStatus) -> bool:
        """Move to `new` if the table allows it from the current status."""
        with self._lock:
            if new not in TRANSITIONS[self.status]:
                return False
            self.status = new
            self.times[new] = time.monotonic()
            if new is MigrationStatus.SETUP:
                self.error = None
            self._changed.notify_all()
        on_change = self._on_change() if self._on_change is not None else None
        if on_change is not None:
            on_change(new)
        return True

    def fail(self, message: str) -> bool:
        """Record the first error; later ones are consequences and are dropped."""
        with self._lock:
            if self.error is None and not self.status.finished:
                self.error = message
                first = True
            else:
                first = False
        return first

    def wait_finished(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._changed.wait_for(lambda: self.status.finished, timeout)
