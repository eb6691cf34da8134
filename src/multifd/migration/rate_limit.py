"""max-bandwidth for a round's pages: how long the migration thread waits so
the bytes it has queued keep to the limit, which may change as it runs."""

from __future__ import annotations

import time
from collections.abc import Callable

# The longest single wait: a limit raised meanwhile applies within this long
# (QEMU's migration thread likewise waits in 100 ms steps, BUFFER_DELAY).
STEP_SECONDS = 0.1


class RateLimit:
    """`limit()` gives the bytes per second allowed (0: no limit), `queued()`
    the bytes queued so far; both are read at every step."""

    def __init__(
        self,
        limit: Callable[[], int],
        queued: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limit = limit
        self._queued = queued
        self._clock = clock
        self._restart(limit())

    def _restart(self, rate: int) -> None:
        self._rate = rate
        self._since = self._clock()
        self._base = self._queued()

    def delay(self) -> float:
        """Seconds to wait before queuing more, at most STEP_SECONDS: ask again
        after waiting them."""
        rate = self._limit()
        if rate != self._rate:
            # A new limit counts from now: what was queued kept to the old one,
            # and a limit raised must not be owed the old one's backlog.
            self._restart(rate)
        if not rate:
            return 0.0
        ahead = (self._queued() - self._base) / rate - (self._clock() - self._since)
        if ahead < -STEP_SECONDS:
            # Behind the limit for more than a step (the link or the channels
            # were slower meanwhile): the time lost is not owed, or catching
            # up would go at full speed for as long. QEMU likewise forgets
            # every 100 ms window once it has passed.
            self._restart(rate)
            return 0.0
        return min(max(ahead, 0.0), STEP_SECONDS)

    def step_bytes(self) -> int | None:
        """What the limit allows in one step, None without a limit: queuing
        no more between two waits keeps every window near the limit, not
        only the average (a 4 MiB chunk at 1 MiB/s went in one burst, then
        nothing for 4 s)."""
        rate = self._limit()
        return int(rate * STEP_SECONDS) if rate else None
