"""query-migrate's `ram` figures counted as QEMU 7.2 counts them, to the byte:
`transferred` is RAM only (the ram section's records on the main channel and
the multifd packets), split by the workload's run state into precopy-bytes and
downtime-bytes, with the multifd packets only in multifd-bytes; the final mbps
is over the whole migration; rates come from short windows, not whole rounds."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from e2e_support import MiB, Migration, wait_until

from multifd.migration.multifd_send import MultifdSender
from multifd.wire import PACKET_HEADER_SIZE, TARGET_PAGE_SIZE

# A ZERO record that continues the previous record's block: be64 header, fill byte.
ZERO_RECORD = 9
# A PAGE record's header when it continues the block; the first names it.
PAGE_HEADER = 8
EOS = 8
# The block's name, as the first record of a block carries it (counted string).
NAMED = 1 + len("pc.ram")
# Pages zeroed, or rewritten, while the workload is stopped for the switchover.
LATE_PAGES = 5


def _content(m: Migration) -> tuple[int, int]:
    """(normal, zero) pages of the source's one block."""
    rows = m.src_blocks[0].page_rows(np.uint64)
    zero = int(np.count_nonzero(~rows.any(axis=1)))
    return len(rows) - zero, zero


def _rewrite_late_pages(m: Migration, multifd: bool) -> Callable[[], None]:
    """At the stop, change LATE_PAGES data pages: to zero pages with multifd
    (their ZERO records go on main, in downtime), to other data without it."""
    rows = m.src_blocks[0].page_rows(np.uint64)
    late = np.flatnonzero(rows.any(axis=1))[:LATE_PAGES]

    def hook() -> None:
        if multifd:
            rows[late] = 0
        else:
            rows[late, 0] += np.uint64(1)

    return hook


@pytest.mark.parametrize("multifd", [True, False], ids=["multifd", "plain"])
def test_ram_bytes_are_counted_as_qemu_counts_them(
    migration: Callable[..., Migration], multifd: bool
) -> None:
    """A migration with no workload: round 1 sends every page, nothing is dirty
    after it, and the stop rewrites LATE_PAGES pages, sent in downtime. The
    second migration, started at once after a cancelled one, counts from zero."""
    m = migration(
        sizes=(4 * MiB,),
        capabilities={"multifd": multifd},
        parameters={"multifd-channels": 2, "max-bandwidth": 4 * MiB},
    )
    m.start()
    wait_until(lambda: m.source.query().get("ram", {}).get("normal", 0) > 0, what="pages sent")
    m.source.cancel()
    assert m.finish()[0]["status"] == "cancelled"
    m.source.set_parameters({"max-bandwidth": 0})
    normal, zero = _content(m)
    m.stop_hook = _rewrite_late_pages(m, multifd)
    src, dst = m.assert_completed()
    ram = src["ram"]

    assert ram["dirty-sync-count"] == 3  # setup, after round 1, at the stop
    passes = [d["pass"] for name, d in m.source_events if name == "MIGRATION_PASS"]
    assert passes[-3:] == [1, 2, 3]
    if multifd:
        assert (ram["normal"], ram["duplicate"]) == (normal, zero + LATE_PAGES)
        packets = sum(c["packets"] for c in src["x-multifd-channels"])
        assert ram["multifd-bytes"] == packets * PACKET_HEADER_SIZE + normal * TARGET_PAGE_SIZE
        # Main carries only ZERO records, the block named once, and round 1's
        # EOS (not setup's, nor the completion's).
        assert ram["precopy-bytes"] == zero * ZERO_RECORD + NAMED + EOS
        assert ram["downtime-bytes"] == LATE_PAGES * ZERO_RECORD
    else:
        assert (ram["normal"], ram["duplicate"]) == (normal + LATE_PAGES, zero)
        assert ram["multifd-bytes"] == 0
        page = PAGE_HEADER + TARGET_PAGE_SIZE
        assert ram["precopy-bytes"] == zero * ZERO_RECORD + normal * page + NAMED + EOS
        assert ram["downtime-bytes"] == LATE_PAGES * page
    assert ram["transferred"] == ram["precopy-bytes"] + ram["downtime-bytes"] + ram["multifd-bytes"]
    assert dst["x-ram"]["transferred"] == ram["transferred"]
    assert ram["normal-bytes"] == ram["normal"] * TARGET_PAGE_SIZE
    # QEMU leaves these out (zero) once completed.
    assert ram["remaining"] == ram["dirty-pages-rate"] == 0
    # The final mbps is everything sent, all of main and the multifd packets,
    # over the migration but its setup (QEMU's migration_calculate_complete).
    sent = m.source._main.bytes_written + ram["multifd-bytes"]
    transfer_ms = src["total-time"] - src["setup-time"]
    if transfer_ms > 0:
        assert ram["mbps"] == round(sent * 8 / transfer_ms / 1000, 3)
    # The destination's: what arrived over its own total time.
    if dst["x-total-time"] > 0:
        expected = round(ram["transferred"] * 8 / dst["x-total-time"] / 1000, 3)
        assert dst["x-ram"]["mbps"] == expected > 0


def test_rates_are_measured_within_the_first_round(migration: Callable[..., Migration]) -> None:
    """max-bandwidth stretches round 1 to about a second: mbps and
    pages-per-second appear during it (QEMU measures them every 100 ms), and
    until a round has measured a downtime, the expected one is the limit."""
    m = migration(sizes=(16 * MiB,), parameters={"multifd-channels": 2, "max-bandwidth": 16 * MiB})
    seen: list[dict[str, Any]] = []

    def measured_in_round_1() -> bool:
        seen.append(m.source.query())
        ram = seen[-1].get("ram", {})
        return ram.get("dirty-sync-count") == 1 and ram["mbps"] > 0

    m.start()
    wait_until(measured_in_round_1, what="mbps while round 1 is under way")
    m.finish()
    during = seen[-1]
    assert during["status"] == "active"
    assert during["ram"]["pages-per-second"] > 0
    assert during["expected-downtime"] == 300  # the default downtime-limit
    assert all(q["expected-downtime"] == 300 for q in seen if q.get("status") == "active")


def test_destination_total_time_counts_the_migration_not_the_wait(
    migration: Callable[..., Migration],
) -> None:
    """A destination listens long before a source comes: its x-total-time
    starts when the source's channels are here, not when it began to listen."""
    m = migration(parameters={"multifd-channels": 2})
    m.uri = m.destination.incoming(m.listen_uri)
    time.sleep(0.5)
    started = time.monotonic()
    src, dst = m.run(listen=False)
    took_ms = (time.monotonic() - started) * 1000
    assert src["status"] == dst["status"] == "completed"
    assert dst["x-total-time"] <= took_ms


def test_downtime_lasts_until_the_destination_has_read_everything(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch
) -> None:
    """As QEMU's, downtime ends when total-time does: with the destination
    holding every page (here made to take 0.3 s longer), not when the source
    has handed the last bytes to its sockets."""
    wait_read = MultifdSender.wait_read

    def slow_wait_read(self: MultifdSender, timeout: float | None) -> str | None:
        time.sleep(0.3)
        return wait_read(self, timeout)

    monkeypatch.setattr(MultifdSender, "wait_read", slow_wait_read)
    m = migration(parameters={"multifd-channels": 2})
    src, _ = m.assert_completed()
    assert 300 <= src["downtime"] <= src["total-time"]


def test_everything_remains_when_the_migration_becomes_active(
    migration: Callable[..., Migration],
) -> None:
    """At `active`, before round 1 sends a page, every byte is still to send."""
    m = migration(parameters={"multifd-channels": 2})
    seen: list[dict[str, Any]] = []
    m.on_status = lambda status: seen.append(m.source.query()) if status == "active" else None
    m.assert_completed()
    assert seen[0]["ram"]["remaining"] == seen[0]["ram"]["total"] == 8 * MiB
