"""Cancel in random states, many times in a row: nothing of any migration is left
(threads, descriptors), and a migration afterwards completes."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from e2e_support import FINISH_TIMEOUT, Migration

from leakcheck import leaks, open_fds

MiB = 1 << 20
CYCLES = 100


def test_cancel_in_random_states_many_times(migration: Callable[..., Migration]) -> None:
    """Each cycle cancels the source (or the destination) after a random delay:
    in setup, mid-round, at switchover, or after completion (a no-op)."""
    m = migration(
        sizes=(2 * MiB,),
        workload_rate=5_000,
        parameters={"max-bandwidth": 64 * MiB, "x-io-timeout": 5},
    )
    m.start()
    m.finish()  # the first run creates the long-lived workload thread
    _carry_on(m)
    threads_before = set(threading.enumerate())
    fds_before = open_fds()
    rng = random.Random(8)
    ends: dict[str, int] = {}
    for _ in range(CYCLES):
        m.start()
        time.sleep(rng.choice((0.0, 0.0005, 0.002, 0.01, 0.03)))
        (m.source if rng.random() < 0.7 else m.destination).cancel()
        src = m.source.wait(FINISH_TIMEOUT)
        if m.destination.state.status.value == "setup":
            # The source was cancelled before its channels were all in: the
            # destination rightly waits for a source; the application cancels.
            m.destination.cancel()
        dst = m.destination.wait(FINISH_TIMEOUT)
        assert dst["status"] in ("cancelled", "failed", "completed"), dst
        ends[src["status"]] = ends.get(src["status"], 0) + 1
        assert src["status"] in ("cancelled", "failed", "completed"), src
        # The source always ends with its workload running (on_resume undid any stop).
        assert not m.stopped or src["status"] == "completed"
        if src["status"] == "completed":
            _carry_on(m)
    threads, fds = leaks(threads_before, fds_before)
    assert not threads, f"threads left after {CYCLES} cancels: {threads}"
    assert not fds, f"descriptors left after {CYCLES} cancels: {fds}"
    assert ends.get("cancelled", 0) > 0, ends
    m.assert_completed()


def _carry_on(m: Migration) -> None:
    """After a completed cycle the source application runs on (the workload was
    paused by on_stop, as a migrated VM is), so the next cycle starts live."""
    assert m.workload is not None
    m.workload.resume()
    m.stopped = False
