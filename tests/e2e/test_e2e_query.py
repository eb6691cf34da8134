"""What the application and a QMP client see: query() shaped like QEMU's
query-migrate on both ends, events, downtime on both sides, and convergence:
the hint when rounds stop shrinking, and auto-converge's throttle."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from e2e_support import FINISH_TIMEOUT, MiB, Migration, wait_until, write_pages

from multifd.memory import TrackerBase
from multifd.migration import source as source_module

QEMU_KEYS = {"status", "total-time", "setup-time", "downtime", "ram"}
RAM_KEYS = {
    "transferred",
    "remaining",
    "total",
    "duplicate",
    "normal",
    "normal-bytes",
    "dirty-pages-rate",
    "mbps",
    "dirty-sync-count",
    "pages-per-second",
    "multifd-bytes",
    "precopy-bytes",
    "downtime-bytes",
}
CHANNEL_KEYS = {"id", "bytes", "packets", "sync-packets", "pages", "busy-ms", "error"}
ALL_PAGES = range(2048)  # of an 8 MiB block
# The writes of pass 1 (setup) must count in round 2: a tracker that starts at
# once. The kernel tracker starts each range as round 1 reaches it, so a page
# written before round 1 read it is rightly not sent again.
EAGER_TRACKER = {"x-dirty-tracker": "hash"}
# Auto-converge weighs dirty-sync periods of at least a second, as QEMU's:
# shortened for the tests that wait for its steps.
SHORT_PERIOD = 0.2


@pytest.fixture
def short_dirty_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source_module, "DIRTY_RATE_PERIOD", SHORT_PERIOD)


def _check_channels(info: dict[str, Any], channels: int) -> None:
    assert [c["id"] for c in info["x-multifd-channels"]] == list(range(channels))
    for channel in info["x-multifd-channels"]:
        assert set(channel) >= CHANNEL_KEYS, channel
    ram = info["ram"] if "ram" in info else info["x-ram"]  # a destination's are ours
    assert sum(c["bytes"] for c in info["x-multifd-channels"]) == ram["multifd-bytes"]


def test_query_while_active_and_when_completed(migration: Callable[..., Migration]) -> None:
    """A bandwidth limit stretches round 1 to about a second: query() shows it
    under way (remaining falls by 4 MiB steps of the round)."""
    m = migration(sizes=(16 * MiB,), parameters={"multifd-channels": 3, "max-bandwidth": 16 * MiB})
    seen: list[dict[str, Any]] = []

    def under_way() -> bool:
        seen.append(m.source.query())
        ram = seen[-1].get("ram", {})
        return seen[-1].get("status") == "active" and 0 < ram["remaining"] < ram["total"]

    m.start()
    wait_until(under_way, what="round 1 under way")
    active = seen[-1]
    src, dst = m.finish()

    assert set(active) >= {"status", "total-time", "setup-time", "expected-downtime", "ram"}
    assert "downtime" not in active and "error-desc" not in active
    assert set(active["ram"]) >= RAM_KEYS
    # Round 1 is under way: what is not yet counted as sent is still remaining.
    sent = active["ram"]["normal"] + active["ram"]["duplicate"]
    assert active["ram"]["remaining"] >= active["ram"]["total"] - sent * 4096
    assert active["x-dirty-tracker"] == {"pc.ram": src["x-dirty-tracker"]["pc.ram"]}
    _check_channels(active, 3)

    assert src["status"] == dst["status"] == "completed"
    assert set(src) >= QEMU_KEYS and "error-desc" not in src
    assert set(src["ram"]) >= RAM_KEYS
    ram = src["ram"]
    assert ram["remaining"] == 0
    assert ram["total"] == 16 * MiB
    assert ram["normal-bytes"] == ram["normal"] * 4096
    assert ram["normal"] + ram["duplicate"] >= 4096  # every page at least once
    assert ram["pages-per-second"] > 0 and ram["mbps"] > 0
    # As QEMU 7.2's: RAM records on main, by run state, and multifd packets.
    split = ram["precopy-bytes"] + ram["downtime-bytes"] + ram["multifd-bytes"]
    assert ram["transferred"] == split
    assert src["setup-time"] <= src["total-time"]
    _check_channels(src, 3)
    for channel in src["x-multifd-channels"]:
        assert channel["packets"] > 0 and channel["error"] is None

    # The destination reports the same transfer, and its own downtime, as
    # ours (x-): QEMU's incoming side shows only its status once it is done.
    assert {k for k in dst if not k.startswith("x-")} == {"status"}
    assert {"x-total-time", "x-downtime", "x-ram"} <= set(dst)
    for key in ("transferred", "normal", "duplicate", "multifd-bytes", "total"):
        assert dst["x-ram"][key] == ram[key], key
    _check_channels(dst, 3)
    assert dst["x-rounds"] == ram["dirty-sync-count"]


@pytest.mark.parametrize("method", ["zlib", "zstd"])
def test_multifd_bytes_count_pages_before_compression(
    migration: Callable[..., Migration], method: str
) -> None:
    """QEMU 7.2 counts a packet in multifd-bytes (and transferred) as its header
    plus its pages uncompressed, whatever goes on the wire; so do both ends.
    The switchover's bandwidth is measured in those bytes too."""
    m = migration(parameters={"multifd-channels": 2, "multifd-compression": method})
    for block in m.src_blocks:
        block.array[:] = 0x5A  # compresses about a thousandfold
    src, dst = m.assert_completed()
    ram = src["ram"]
    channels = src["x-multifd-channels"]
    packets = sum(c["packets"] for c in channels)
    assert ram["multifd-bytes"] == packets * 1344 + ram["normal-bytes"]
    assert sum(c["bytes"] for c in channels) < ram["normal-bytes"] // 100  # compressed
    assert ram["transferred"] == (
        ram["precopy-bytes"] + ram["downtime-bytes"] + ram["multifd-bytes"]
    )
    for key in ("transferred", "multifd-bytes", "normal-bytes"):
        assert dst["x-ram"][key] == ram[key], key


@pytest.mark.parametrize(("method", "levels"), [("zlib", (0, 9)), ("zstd", (1, 19))])
def test_compression_level_reaches_the_wire(
    migration: Callable[..., Migration], method: str, levels: tuple[int, int]
) -> None:
    """multifd-zlib-level and multifd-zstd-level are the compressors' levels:
    the higher one puts fewer bytes on the wire (zlib 0 stores the pages)."""
    wire = []
    for level in levels:
        parameters = {"multifd-compression": method, f"multifd-{method}-level": level}
        m = migration(sizes=(MiB,), parameters={"multifd-channels": 1, **parameters})
        rng = np.random.default_rng(7)  # a few bits of entropy a byte: every level differs
        data = m.src_blocks[0].array
        data[:] = rng.integers(0, 2, len(data)) * rng.integers(0, 50, len(data))
        src, _ = m.assert_completed()
        wire.append(src["x-multifd-channels"][0]["bytes"])
    assert wire[0] > wire[1] * 1.04, wire
    if levels[0] == 0:
        assert wire[0] > MiB  # stored, not compressed


def test_events_and_downtime(migration: Callable[..., Migration]) -> None:
    """MIGRATION events in QEMU's order on both ends, MIGRATION_PASS numbered
    from 1 by dirty-sync-count, and a downtime on both sides."""
    m = migration(parameters={"multifd-channels": 2}, workload_rate=16 * MiB)
    src, dst = m.assert_completed()
    passes = [data["pass"] for name, data in m.source_events if name == "MIGRATION_PASS"]
    assert passes == list(range(1, src["ram"]["dirty-sync-count"] + 1))
    assert m.statuses("source") == ["setup", "active", "completed"]
    assert m.statuses("destination") == ["setup", "active", "completed"]
    # QEMU's run state events: STOP before the last pass, RESUME before completed.
    names = [name for name, _ in m.source_events]
    assert names[-3:] == ["STOP", "MIGRATION_PASS", "MIGRATION"]
    assert names.count("STOP") == 1 and "RESUME" not in names
    assert [name for name, _ in m.dst_events][-2:] == ["RESUME", "MIGRATION"]
    assert src["downtime"] >= 0 and dst["x-downtime"] >= 0
    assert "expected-downtime" not in src


def test_not_converging_is_reported(migration: Callable[..., Migration]) -> None:
    """Every page rewritten at every pass and no auto-converge: rounds stop
    shrinking, query() says so, and the migration goes on until cancelled."""
    m = migration(parameters={"multifd-channels": 2, "downtime-limit": 0, **EAGER_TRACKER})
    seen: list[dict[str, Any]] = []

    def on_pass(n: int) -> None:
        write_pages(m.src_blocks[0], ALL_PAGES)
        seen.append(m.source.query())
        if n == 5:
            m.source.cancel()

    m.on_pass = on_pass
    m.start()
    src, _ = m.finish()
    assert src["status"] == "cancelled"
    assert m.stops == 0 and m.throttles == []
    last = seen[-1]
    assert last["status"] == "active"
    assert last["x-converging"] is False
    assert last["expected-downtime"] > 0
    assert last["ram"]["remaining"] == 8 * MiB
    assert "cpu-throttle-percentage" not in last
    m.clear_hooks()
    m.source.set_parameters({"downtime-limit": 300})
    m.assert_completed()


def _auto_converging(
    migration: Callable[..., Migration],
    *,
    initial: int,
    increment: int,
    parameters: dict[str, Any] | None = None,
) -> Migration:
    """A migration with auto-converge on that never converges by itself
    (downtime-limit 0): only the throttle can end it."""
    return migration(
        capabilities={"auto-converge": True},
        parameters={
            "multifd-channels": 2,
            "downtime-limit": 0,
            "cpu-throttle-initial": initial,
            "cpu-throttle-increment": increment,
            **(parameters or {}),
            **EAGER_TRACKER,
        },
    )


def test_auto_converge_throttles_until_it_converges(
    migration: Callable[..., Migration], short_dirty_period: None
) -> None:
    """The same writer, which obeys the throttle (it stops once throttled):
    auto-converge throttles after two periods dirtier than the threshold, the
    migration then converges, and the throttle is lifted at the end."""
    m = _auto_converging(migration, initial=30, increment=15)
    seen: list[dict[str, Any]] = []

    def on_pass(n: int) -> None:
        seen.append(m.source.query())
        if not m.throttles and not m.stopped:
            write_pages(m.src_blocks[0], ALL_PAGES)

    m.on_pass = on_pass
    src, _ = m.assert_completed()
    assert m.throttles == [30, 0]
    # Pass 1 comes in setup, whose answer is only the status.
    assert any(q.get("x-converging") is False for q in seen)
    throttled = [q for q in seen if "cpu-throttle-percentage" in q]
    assert throttled and all(q["cpu-throttle-percentage"] == 30 for q in throttled)
    assert "cpu-throttle-percentage" not in src  # lifted
    assert src["ram"]["dirty-sync-count"] >= 4


def test_auto_converge_steps_two_periods_apart_not_two_rounds(
    migration: Callable[..., Migration], short_dirty_period: None
) -> None:
    """As QEMU's migration_trigger_throttle: the dirtied bytes are weighed
    against the transferred ones once per dirty-sync period (at least
    DIRTY_RATE_PERIOD, however many rounds it holds), and the throttle steps
    at the second period over the threshold. Stepping every two rounds, short
    ones here, would throttle the workload to the cap within a second."""
    m = _auto_converging(migration, initial=10, increment=10)
    steps: list[tuple[float, int]] = []
    throttle = m.source._throttle
    assert throttle is not None

    def timed_throttle(percent: int) -> None:
        steps.append((time.monotonic(), percent))
        throttle(percent)

    m.source._throttle = timed_throttle

    def on_pass(n: int) -> None:
        if len(m.throttles) < 3 and not m.stopped:
            write_pages(m.src_blocks[0], ALL_PAGES)

    m.on_pass = on_pass
    started = time.monotonic()
    src, _ = m.assert_completed()
    assert m.throttles == [10, 20, 30, 0]
    times = [started] + [t for t, _ in steps[:3]]
    # A period lasts SHORT_PERIOD at least, and a step takes two of them
    # (the first period starts after setup, later than `started`).
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert all(gap >= 2 * SHORT_PERIOD for gap in gaps), gaps
    # Rounds went on meanwhile, several per step.
    assert src["ram"]["dirty-sync-count"] > 6


def test_downtime_limit_raised_mid_migration_lets_it_converge(
    migration: Callable[..., Migration],
) -> None:
    """Every page rewritten at every pass cannot fit downtime-limit 0; raised
    while the migration runs, the next round's check reads the new limit (as
    QEMU's does) and the migration completes."""
    m = migration(parameters={"multifd-channels": 2, "downtime-limit": 0, **EAGER_TRACKER})
    stuck = threading.Event()

    def on_pass(n: int) -> None:
        if not m.stopped:
            write_pages(m.src_blocks[0], ALL_PAGES)
        if n >= 4:
            stuck.set()

    m.on_pass = on_pass
    m.start()
    assert stuck.wait(FINISH_TIMEOUT)
    info = m.source.query()
    assert info["status"] == "active" and info["x-converging"] is False
    m.source.set_parameters({"downtime-limit": 2_000_000})
    src, dst = m.finish()
    assert src["status"] == "completed", src
    assert dst["status"] == "completed", dst
    m.assert_identical()


@pytest.mark.parametrize("tailslow", [False, True])
def test_tailslow_steps_only_as_far_as_needed(
    migration: Callable[..., Migration], short_dirty_period: None, tailslow: bool
) -> None:
    """A writer that stops once throttled twice. The second step is the whole
    increment, or with cpu-throttle-tailslow only what brings the dirty rate
    to the threshold: all pages dirtied against a threshold of half of them
    sent asks for about half the CPU the workload still has (QEMU's rule)."""
    m = _auto_converging(
        migration, initial=30, increment=60, parameters={"cpu-throttle-tailslow": tailslow}
    )

    def on_pass(n: int) -> None:
        if len(m.throttles) < 2 and not m.stopped:
            write_pages(m.src_blocks[0], ALL_PAGES)

    m.on_pass = on_pass
    m.assert_completed()
    first, second, lifted = m.throttles
    assert (first, lifted) == (30, 0)
    if tailslow:
        # 70 % still runs; about half of it is the ideal: a step of about 35.
        assert 60 <= second <= 70, m.throttles
    else:
        assert second == 90


def test_total_time_ends_at_completion_not_after_the_teardown(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As QEMU's: closing channels and undoing dirty tracking afterwards (here
    made to take 1.5 s) is not part of the migration's total-time."""
    close = TrackerBase.close

    def slow_close(self: TrackerBase) -> None:
        time.sleep(1.5)
        close(self)

    monkeypatch.setattr(TrackerBase, "close", slow_close)
    m = migration(parameters={"multifd-channels": 2})
    started = time.monotonic()
    src, _ = m.assert_completed()
    assert time.monotonic() - started >= 1.5  # the teardown did take that long
    assert src["total-time"] < 1500, src["total-time"]
