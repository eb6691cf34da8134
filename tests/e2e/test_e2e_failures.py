"""A multifd channel killed mid-migration, on either side: the migration fails
once, its error names the channel, every thread and socket is released, the
source's workload keeps (or goes back to) running, and the next migration on
the same address succeeds."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from e2e_support import (
    FINISH_TIMEOUT,
    TRANSPORTS,
    MiB,
    Migration,
    destination_channel,
    sever,
    source_threads,
    wait_until,
    write_pages,
)

from multifd.demo.workload import fill
from multifd.memory import RAMBlock
from multifd.migration import source as source_module
from multifd.migration.destination import MigrationDestination
from multifd.migration.source import MigrationSource
from multifd.wire import Configuration

LIVE_RATE = 32 * MiB
KILLED = 1  # the channel that dies
# downtime-limit 0 and pages written at every pass: the migration never
# switches over on its own, so a channel killed between rounds dies while the
# workload runs, not at a switchover the source may start meanwhile. The hash
# tracker counts the writes of pass 1 (before round 1), which the kernel
# tracker's lazy start rightly does not: round 2 then always has pages.
EAGER_TRACKER = {"x-dirty-tracker": "hash"}
NO_SWITCHOVER = {"multifd-channels": 4, "downtime-limit": 0, **EAGER_TRACKER}
EVERY_OTHER_PAGE = range(0, 2048, 2)


def _failed_once(events: list[tuple[str, dict]]) -> bool:
    statuses = [data["status"] for name, data in events if name == "MIGRATION"]
    return statuses.count("failed") == 1 and statuses[-1] == "failed"


def _check_failed(m: Migration, side: str, stops: int = 0) -> tuple[dict, dict]:
    """Both ends failed; the killing `side` names the channel, in error-desc and
    in that channel's own figures."""
    src, dst = m.finish()
    assert src["status"] == "failed", src
    assert dst["status"] == "failed", dst
    assert _failed_once(m.source_events) and _failed_once(m.dst_events)
    killer = src if side == "source" else dst
    # Channel, packet and stream offset, as the issue asks of every error.
    where = rf"channel {KILLED}: packet \d+: .*offset 0x[0-9a-f]+"
    assert re.match(where, killer["error-desc"]), killer["error-desc"]
    channel = killer["x-multifd-channels"][KILLED]
    assert channel["error"] == killer["error-desc"]
    for other in killer["x-multifd-channels"]:
        if other["id"] != KILLED:
            assert other["error"] is None, other
    assert source_threads() == []
    # The source is still running: never stopped, or resumed after switchover.
    assert m.stops == m.source_resumes == stops
    assert not m.workload.paused
    assert m.resumed == []
    return src, dst


def _migrate_again(m: Migration) -> None:
    m.clear_hooks()
    m.source.set_parameters({"downtime-limit": 300})  # converge with a live workload
    m.assert_completed()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_source_channel_killed_between_rounds(
    migration: Callable[..., Migration], transport: str
) -> None:
    """The source's channel is cut after round 1: its next write fails."""
    m = migration(transport=transport, parameters=NO_SWITCHOVER, workload_rate=LIVE_RATE)

    def on_pass(n: int) -> None:
        write_pages(m.src_blocks[0], EVERY_OTHER_PAGE)
        if n == 2:
            sever(m.source._sender.channels[KILLED].channel)

    m.on_pass = on_pass
    m.start()
    src, _ = _check_failed(m, "source")
    assert "write failed" in src["error-desc"]
    _migrate_again(m)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_source_channel_killed_at_switchover(
    migration: Callable[..., Migration], transport: str
) -> None:
    """Cut while the workload is stopped: it is resumed, as QEMU restarts the VM."""
    m = migration(transport=transport, parameters={"multifd-channels": 2}, workload_rate=LIVE_RATE)
    m.stop_hook = lambda: sever(m.source._sender.channels[KILLED].channel)
    m.start()
    _check_failed(m, "source", stops=1)
    _migrate_again(m)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_destination_channel_killed(migration: Callable[..., Migration], transport: str) -> None:
    """The destination's channel is shut down after round 1. The source waits in
    its pass callback until the destination has failed, so the destination
    finds the dead channel itself (not through the source's reaction)."""
    m = migration(transport=transport, parameters=NO_SWITCHOVER, workload_rate=LIVE_RATE)

    def on_pass(n: int) -> None:
        write_pages(m.src_blocks[0], EVERY_OTHER_PAGE)
        if n == 2:
            destination_channel(m, KILLED).shutdown()
            assert m.destination.state.wait_finished(FINISH_TIMEOUT)

    m.on_pass = on_pass
    m.start()
    _check_failed(m, "destination")
    _migrate_again(m)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_destination_channel_cut_by_the_network(
    migration: Callable[..., Migration], transport: str
) -> None:
    """The destination's connection is cut under it while the source goes on:
    whichever end notices first, both fail, and only once each."""
    m = migration(transport=transport, parameters=NO_SWITCHOVER, workload_rate=LIVE_RATE)

    def on_pass(n: int) -> None:
        write_pages(m.src_blocks[0], EVERY_OTHER_PAGE)
        if n == 2:
            sever(destination_channel(m, KILLED))

    m.on_pass = on_pass
    m.start()
    src, dst = m.finish()
    assert src["status"] == dst["status"] == "failed", (src, dst)
    assert _failed_once(m.source_events) and _failed_once(m.dst_events)
    assert f"channel {KILLED}" in src["error-desc"] + dst["error-desc"], (src, dst)
    assert m.stops == m.source_resumes
    assert not m.workload.paused
    _migrate_again(m)


@pytest.mark.parametrize("callback", ["save_state", "on_stop", "throttle"])
def test_application_callback_raising(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch, callback: str
) -> None:
    """An application callback that raises fails the migration with its error;
    nothing escapes into the process, and a stopped workload runs again."""
    # Auto-converge steps once two dirty-sync periods (a second each) dirtied
    # too much: shortened, so that the throttle comes soon.
    monkeypatch.setattr(source_module, "DIRTY_RATE_PERIOD", 0.2)
    m = migration(
        capabilities={"auto-converge": True},
        parameters={"multifd-channels": 2, "downtime-limit": 0, **EAGER_TRACKER},
        workload_rate=LIVE_RATE,
    )

    def broken() -> None:
        raise RuntimeError(f"{callback} is broken")

    def on_pass(n: int) -> None:
        if not m.stopped and not m.throttles:  # dirty enough to throttle, then converge
            write_pages(m.src_blocks[0], EVERY_OTHER_PAGE)

    m.on_pass = on_pass
    if callback == "save_state":
        m.state_hook = broken
    elif callback == "on_stop":
        m.stop_hook = broken
    else:
        m.source._throttle = lambda percent: broken() if percent else None
    m.start()
    src, dst = m.finish()
    assert src["status"] == "failed", src
    assert src["error-desc"] == f"internal error: RuntimeError: {callback} is broken"
    assert dst["status"] == "failed", dst
    assert _failed_once(m.source_events)
    assert m.stops == m.source_resumes
    assert not m.workload.paused
    assert source_threads() == []
    m.source._throttle = m._throttle
    _migrate_again(m)


def test_event_listeners_raising_change_nothing(
    migration: Callable[..., Migration], caplog: pytest.LogCaptureFixture
) -> None:
    """An on_event listener is told, not asked: one that raises on every event
    is logged, and both ends migrate, cancel and migrate again as without it."""
    m = migration(parameters={"multifd-channels": 2, "max-bandwidth": 8 * MiB})

    def raising(record: Callable[[str, Any], None]) -> Callable[[str, Any], None]:
        def listener(name: str, data: Any) -> None:
            record(name, data)
            raise RuntimeError(f"listener broken on {name}")

        return listener

    m.source.on_event = raising(m._on_source_event)
    m.destination.on_event = raising(m._on_dst_event)
    m.start()
    wait_until(
        lambda: m.source.query().get("ram", {}).get("transferred", 0) > MiB,
        what="part of round 1 sent",
    )
    m.source.cancel()
    src, dst = m.finish()
    assert src["status"] == "cancelled", src
    assert dst["status"] == "failed", dst
    assert m.statuses("source")[-2:] == ["cancelling", "cancelled"]
    m.source.set_parameters({"max-bandwidth": 0})
    m.assert_completed()
    logged = [r.getMessage() for r in caplog.records if r.name == "multifd.migration.endpoint"]
    assert "the on_event listener raised on MIGRATION {'status': 'setup'}" in logged
    assert "the on_event listener raised on MIGRATION {'status': 'completed'}" in logged


def test_blocks_that_differ_fail_at_the_destination(tmp_path: Path) -> None:
    """A destination whose block has another size, or another name, refuses
    the migration with QEMU's message; the source, told over the return path,
    fails too (without one it may have finished writing into the sockets)."""
    source_block = RAMBlock.anonymous("pc.ram", 8 * MiB)
    fill(source_block.array)
    cases = [
        (RAMBlock.anonymous("pc.ram", 4 * MiB), "Length mismatch: pc.ram: 0x800000 in != 0x400000"),
        (
            RAMBlock.anonymous("other", 8 * MiB),
            'Unknown ramblock "pc.ram", cannot accept migration',
        ),
    ]
    source = MigrationSource(
        [source_block],
        capabilities={"multifd": True, "return-path": True},
        parameters={"multifd-channels": 2, "max-bandwidth": 0},
    )
    try:
        for block, message in cases:
            destination = MigrationDestination(
                [block], capabilities={"multifd": True}, parameters={"multifd-channels": 2}
            )
            source.migrate(destination.incoming(f"unix:{tmp_path / 'm.sock'}"))
            src, dst = source.wait(FINISH_TIMEOUT), destination.wait(FINISH_TIMEOUT)
            assert dst["status"] == "failed"
            assert message in dst["error-desc"], dst["error-desc"]
            assert src["status"] == "failed", src
    finally:
        for block, _ in cases:
            block.close()
        source_block.close()


def test_validate_uuid_goes_into_a_given_configuration(tmp_path: Path) -> None:
    """A source given a configuration (a QEMU VM's, restoring a snapshot) with
    validate-uuid on sends its UUID in it: the destination compares it."""
    source_block = RAMBlock.anonymous("pc.ram", 1 * MiB)
    block = RAMBlock.anonymous("pc.ram", 1 * MiB)
    source = MigrationSource(
        [source_block],
        capabilities={"validate-uuid": True},
        uuid=b"\1" * 16,
        configuration=Configuration.build("pc-i440fx-7.2"),
    )
    destination = MigrationDestination(
        [block], capabilities={"validate-uuid": True}, uuid=b"\2" * 16
    )
    try:
        source.migrate(destination.incoming(f"unix:{tmp_path / 'm.sock'}"))
        source.wait(FINISH_TIMEOUT)
        dst = destination.wait(FINISH_TIMEOUT)
        assert dst["status"] == "failed", dst
        assert "UUID received is 01010101-0101-0101-0101-010101010101" in dst["error-desc"], dst
    finally:
        destination.cancel()
        block.close()
        source_block.close()


def test_source_resume_raising_still_ends_the_migration(
    migration: Callable[..., Migration],
) -> None:
    """on_resume raising after a failed switchover: the source still reaches
    `failed` (keeping the first error), so it can migrate again."""
    m = migration(parameters={"multifd-channels": 2}, workload_rate=LIVE_RATE)

    def resume_then_raise() -> None:
        m._on_source_resume()
        raise RuntimeError("on_resume is broken")

    m.source._on_resume = resume_then_raise
    m.stop_hook = lambda: sever(m.source._sender.channels[KILLED].channel)
    m.start()
    _check_failed(m, "source", stops=1)
    m.source._on_resume = m._on_source_resume
    _migrate_again(m)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_more_source_channels_than_destination_fails_not_corrupts(
    transport: str, tmp_path: Path
) -> None:
    """The refused channel's pages would be lost: the destination must fail with
    the refusal's message, never resume with incomplete memory."""
    source_block = RAMBlock.anonymous("pc.ram", 8 << 20)
    destination_block = RAMBlock.anonymous("pc.ram", 8 << 20)
    try:
        fill(source_block.array)
        destination = MigrationDestination(
            [destination_block],
            capabilities={"multifd": True},
            parameters={"multifd-channels": 2},
        )
        uri = "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{tmp_path}/m.sock"
        uri = destination.incoming(uri)
        source = MigrationSource(
            [source_block],
            capabilities={"multifd": True},
            parameters={"multifd-channels": 3, "max-bandwidth": 0},
        )
        source.migrate(uri)
        source.wait(60)
        result = destination.wait(60)
        assert result["status"] == "failed"
        assert "the source is set up differently" in result["error-desc"]
        assert "channel id 2, expected below multifd-channels (2)" in result["error-desc"]
    finally:
        source_block.close()
        destination_block.close()


def test_destination_exec_command_that_fails_names_its_exit_status() -> None:
    with RAMBlock.anonymous("pc.ram", 1 * MiB) as block:
        destination = MigrationDestination(
            [block], capabilities={"multifd": False}, parameters={"x-io-timeout": 5}
        )
        destination.incoming("exec:exit 3")
        info = destination.wait(FINISH_TIMEOUT)
    assert info["status"] == "failed"
    assert info["error-desc"].endswith("(exec: command exited with status 3))")
