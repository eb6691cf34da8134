"""Whole migrations driven over QMP with `qemu.qmp`, both endpoints in this process:
events in order, queries on both sides, refusals while running, cancel and restart."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from control_support import (
    TIMEOUT,
    Served,
    ask,
    configure,
    connect,
    events_until,
    next_event,
    random_fill,
    run,
    statuses_until,
)
from qemu.qmp import ExecuteError, QMPClient

from multifd.channels import socket_address_uri
from multifd.control import MigrationCommands, QMPServer
from multifd.memory import RAMBlock
from multifd.migration.source import MigrationSource

IN_PROGRESS = "There's a migration process in progress"


def test_migration_over_tcp_with_events_in_order(serve: Callable[..., Served]) -> None:
    source, destination = serve("source", seed=3), serve("destination")

    async def scenario() -> None:
        src = await connect(source.path, name="src")
        dst = await connect(destination.path, name="dst")
        try:
            for qmp in (src, dst):
                await configure(qmp, multifd_channels=3, downtime_limit=500)
                # As QEMU's before any migration: no status at all.
                assert await ask(qmp, "query-migrate") == {}
            assert await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"}) == {}
            # Listening, no source yet: QEMU's incoming state is still none.
            incoming = await ask(dst, "query-migrate")
            [address] = incoming.pop("socket-address")
            assert incoming == {}
            assert address == {
                "type": "inet",
                "host": "127.0.0.1",
                "port": address["port"],
                "ipv4": True,
            }
            assert address["port"].isdigit() and address["port"] != "0"
            assert (await next_event(dst, "MIGRATION"))["data"] == {"status": "setup"}

            uri = str(socket_address_uri(address))
            assert await src.execute("migrate", {"uri": uri}) == {}
            seen = await events_until(src, ("completed", "failed"))
            # QEMU 7.2's order: no `device` status (that needs
            # pause-before-switchover); STOP once the workload stopped, then
            # the last dirty sync's pass.
            assert seen[:3] == ["setup", "pass 1", "active"]
            assert seen[-3:] == ["STOP", f"pass {len(seen) - 4}", "completed"]
            passes = [int(e.removeprefix("pass ")) for e in seen if e.startswith("pass ")]
            assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 3
            assert seen.count("active") == 1 and "device" not in seen
            assert await events_until(dst, ("completed", "failed")) == [
                "active",
                "RESUME",
                "completed",
            ]

            info = await ask(src, "query-migrate")
            assert info["status"] == "completed"
            assert {k for k in info if not k.startswith("x-")} == {
                "status",
                "setup-time",
                "total-time",
                "downtime",
                "ram",
            }
            ram = info["ram"]
            assert ram["total"] == source.block.used_length
            assert ram["remaining"] == 0
            assert ram["normal"] + ram["duplicate"] >= source.block.pages
            assert ram["dirty-sync-count"] >= 2
            assert len(info["x-multifd-channels"]) == 3
            # The listener is gone: only the status, and our own figures.
            done = await ask(dst, "query-migrate")
            assert {k for k in done if not k.startswith("x-")} == {"status"}
            assert done["status"] == "completed"
            assert done["x-ram"]["total"] == destination.block.used_length
            assert await src.execute("query-status") == {
                "status": "postmigrate",
                "running": False,
                "singlestep": False,
            }
            assert await dst.execute("query-status") == {
                "status": "running",
                "running": True,
                "singlestep": False,
            }
        finally:
            await src.disconnect()
            await dst.disconnect()

    run(scenario())
    assert destination.block.sha256() == source.block.sha256()


def test_passes_are_announced_when_events_are_on(serve: Callable[..., Served]) -> None:
    source, destination = serve("source"), serve("destination")

    async def scenario() -> None:
        src = await connect(source.path)
        try:
            await configure(src)
            destination.destination.set_capabilities({"multifd": True})
            uri = destination.destination.incoming("tcp:127.0.0.1:0")
            await src.execute("migrate", {"uri": uri})
            seen = await events_until(src, ("completed", "failed"))
            assert seen[-1] == "completed"
            passes = [int(e.removeprefix("pass ")) for e in seen if e.startswith("pass ")]
            assert passes == list(range(1, len(passes) + 1))
        finally:
            await src.disconnect()

    run(scenario())


def test_cancel_then_restart(serve: Callable[..., Served], sock_dir: Path) -> None:
    source, destination = serve("source", seed=5, size=8 << 20), serve("destination", size=8 << 20)
    uri = f"unix:{sock_dir / 'migration.sock'}"

    async def scenario() -> None:
        src = await connect(source.path, name="src")
        dst = await connect(destination.path, name="dst")
        try:
            # Slow enough (about 4 s) to be caught running.
            await configure(src, max_bandwidth=2 << 20)
            await configure(dst)
            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            assert await statuses_until(src, ("active",)) == ["setup", "active"]

            for command, arguments in (
                ("migrate", {"uri": uri}),
                (
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "multifd", "state": False}]},
                ),
            ):
                with pytest.raises(ExecuteError) as refused:
                    await src.execute(command, arguments)
                assert refused.value.error_class == "GenericError"
                assert str(refused.value) == IN_PROGRESS
            with pytest.raises(ExecuteError, match=IN_PROGRESS):
                await dst.execute("migrate-incoming", {"uri": uri})

            assert await src.execute("migrate_cancel") == {}
            assert await statuses_until(src, ("cancelled", "failed")) == ["cancelling", "cancelled"]
            assert (await ask(src, "query-migrate"))["status"] == "cancelled"
            assert await src.execute("query-status") == {
                "status": "running",
                "running": True,
                "singlestep": False,
            }
            # The destination sees the streams end early.
            assert (await statuses_until(dst, ("completed", "failed", "cancelled")))[-1] == "failed"
            failed = await ask(dst, "query-migrate")
            assert failed["status"] == "failed"
            assert failed["error-desc"]

            # And again, at full speed this time.
            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
            await src.execute("migrate", {"uri": uri})
            assert (await statuses_until(src, ("completed", "failed", "cancelled")))[-1] == (
                "completed"
            )
            assert (await statuses_until(dst, ("completed", "failed", "cancelled")))[-1] == (
                "completed"
            )
        finally:
            await src.disconnect()
            await dst.disconnect()

    run(scenario(), timeout=2 * TIMEOUT)
    assert destination.block.sha256() == source.block.sha256()


def _fixed(name: str) -> str:
    return (
        f"Parameter '{name}' cannot be changed while a migration is in progress: "
        "it takes effect only between migrations"
    )


def test_parameters_while_migrating(serve: Callable[..., Served], sock_dir: Path) -> None:
    """As QEMU 7.2: max-bandwidth raised during a migration applies to it at
    once; what a running migration read at its start may only be set to its
    current value, on either side; capabilities stay refused."""
    size = 16 << 20
    slow = 256 << 10  # the 12 MiB after the first chunk would take 48 s
    source = serve("source", seed=9, size=size)
    destination = serve("destination", size=size)
    uri = f"unix:{sock_dir / 'migration.sock'}"

    async def scenario() -> None:
        src = await connect(source.path, name="src")
        dst = await connect(destination.path, name="dst")
        try:
            await configure(src, max_bandwidth=slow)
            await configure(dst)
            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            assert await statuses_until(src, ("active",)) == ["setup", "active"]

            for qmp in (src, dst):
                # Profile scripts set everything: the current values are fine.
                assert await qmp.execute("migrate-set-parameters", {"multifd-channels": 2}) == {}
                for change in ({"multifd-channels": 5}, {"tls-creds": "tls0"}):
                    with pytest.raises(ExecuteError) as refused:
                        await qmp.execute("migrate-set-parameters", change)
                    assert refused.value.error_class == "GenericError"
                    assert str(refused.value) == _fixed(next(iter(change)))
            # All or nothing: the good value of a refused request is not kept.
            with pytest.raises(ExecuteError, match=_fixed("multifd-zlib-level")):
                await src.execute(
                    "migrate-set-parameters", {"downtime-limit": 1000, "multifd-zlib-level": 9}
                )
            assert (await ask(src, "query-migrate-parameters"))["downtime-limit"] == 300
            # The destination receives with the zlib level the source chose.
            assert await dst.execute("migrate-set-parameters", {"multifd-zlib-level": 9}) == {}
            with pytest.raises(ExecuteError, match=IN_PROGRESS):
                await src.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": "auto-converge", "state": True}]},
                )

            assert (await ask(src, "query-migrate"))["ram"]["transferred"] < size // 2
            assert await src.execute("migrate-set-parameters", {"max-bandwidth": 0}) == {}
            assert (await ask(src, "query-migrate-parameters"))["max-bandwidth"] == 0
            assert (await statuses_until(src, ("completed", "failed", "cancelled")))[-1] == (
                "completed"
            )
            assert (await statuses_until(dst, ("completed", "failed", "cancelled")))[-1] == (
                "completed"
            )
            info = await ask(src, "query-migrate")
            # At the old limit the whole would have come to about `slow` per second.
            assert info["ram"]["transferred"] / (info["total-time"] / 1000) > 4 * slow
        finally:
            await src.disconnect()
            await dst.disconnect()

    run(scenario(), timeout=2 * TIMEOUT)
    assert destination.block.sha256() == source.block.sha256()


def test_a_waiting_destination_can_be_cancelled(
    serve: Callable[..., Served], sock_dir: Path
) -> None:
    destination = serve("destination")

    async def scenario() -> None:
        dst = await connect(destination.path)
        try:
            # With `events` off QEMU still announces the incoming side's setup.
            await dst.execute("migrate-incoming", {"uri": f"unix:{sock_dir / 'm.sock'}"})
            assert (await next_event(dst, "MIGRATION"))["data"] == {"status": "setup"}
            with pytest.raises(ExecuteError) as refused:
                await dst.execute("migrate", {"uri": "unix:/nowhere"})
            assert str(refused.value).startswith("Guest is waiting for an incoming migration")
            assert await dst.execute("migrate_cancel") == {}
            assert (await ask(dst, "query-migrate"))["status"] == "cancelled"
            assert not (sock_dir / "m.sock").exists()
        finally:
            await dst.disconnect()

    run(scenario())


def test_return_path_over_qmp(serve: Callable[..., Served]) -> None:
    """return-path set with migrate-set-capabilities: listed, and the source's
    query-migrate shows the destination's answers."""
    source, destination = serve("source", seed=5), serve("destination")

    async def scenario() -> None:
        src = await connect(source.path, name="src")
        dst = await connect(destination.path, name="dst")
        try:
            for qmp in (src, dst):
                await configure(qmp)
            on = [{"capability": "return-path", "state": True}]
            assert await src.execute("migrate-set-capabilities", {"capabilities": on}) == {}
            listed = await ask(src, "query-migrate-capabilities")
            assert {"capability": "return-path", "state": True} in listed
            await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            [address] = (await ask(dst, "query-migrate"))["socket-address"]
            await src.execute("migrate", {"uri": str(socket_address_uri(address))})
            assert (await statuses_until(src, ("completed", "failed")))[-1] == "completed"
            info = await ask(src, "query-migrate")
            assert info["x-return-path"] == {"pongs": [1], "shut": 0}
        finally:
            await src.disconnect()
            await dst.disconnect()

    run(scenario())
    assert destination.block.sha256() == source.block.sha256()


def test_a_completed_migration_is_not_started_again_until_cont(
    serve: Callable[..., Served], sock_dir: Path
) -> None:
    """As QEMU in postmigrate: the workload was handed over, so neither end
    takes a second migration of it; `cont` on the source runs the workload
    there again (on_resume, then RESUME), and then it may migrate again.
    `cont` on a running destination has nothing to do."""
    source, destination = serve("source", seed=7), serve("destination")
    second = serve("destination")
    resumed: list[str] = []
    source.source._on_resume = lambda: resumed.append("resumed")
    uri = f"unix:{sock_dir / 'again.sock'}"

    async def scenario() -> None:
        src = await connect(source.path, name="src")
        dst = await connect(destination.path, name="dst")
        dst2 = await connect(second.path, name="dst2")
        try:
            for qmp in (src, dst, dst2):
                await configure(qmp)
            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            assert (await statuses_until(src, ("completed", "failed")))[-1] == "completed"
            assert (await statuses_until(dst, ("completed", "failed")))[-1] == "completed"
            for qmp, command, message in (
                (src, "migrate", "Can't migrate the vm that was paused due to previous migration"),
                (dst, "migrate-incoming", "The incoming migration has already completed"),
            ):
                with pytest.raises(ExecuteError) as refused:
                    await qmp.execute(command, {"uri": uri})
                assert refused.value.error_class == "GenericError"
                assert str(refused.value) == message
                assert (await ask(qmp, "query-migrate"))["status"] == "completed"

            assert await dst.execute("cont") == {}
            assert (await ask(dst, "query-status"))["status"] == "running"
            assert await src.execute("cont") == {}
            assert await next_event(src, "RESUME")
            assert resumed == ["resumed"]
            assert (await ask(src, "query-status"))["status"] == "running"
            assert await src.execute("cont") == {}  # running already: nothing to do
            assert resumed == ["resumed"]

            again = f"unix:{sock_dir / 'again2.sock'}"
            await dst2.execute("migrate-incoming", {"uri": again})
            await src.execute("migrate", {"uri": again})
            assert (await statuses_until(src, ("completed", "failed")))[-1] == "completed"
            assert (await statuses_until(dst2, ("completed", "failed")))[-1] == "completed"
        finally:
            await src.disconnect()
            await dst.disconnect()
            await dst2.disconnect()

    run(scenario())
    assert destination.block.sha256() == source.block.sha256()
    assert second.block.sha256() == source.block.sha256()


@pytest.mark.parametrize("bad", ["tcp:127.0.0.1", "foo:bar", "", "unix:", "fd:name"])
def test_refused_uri_fails_a_source_and_leaves_a_destination_as_it_was(
    serve: Callable[..., Served], sock_dir: Path, bad: str
) -> None:
    """As QEMU 7.2's source: the error, MIGRATION setup then failed, status
    failed with the error, and another migrate works at once. A destination
    refuses and stays as it was (QEMU's stays none, with a setup event that
    nothing follows; we send none), ready for a good URI."""
    source, destination = serve("source", seed=7), serve("destination")
    uri = f"unix:{sock_dir / 'migration.sock'}"

    async def scenario() -> None:
        src = await connect(source.path, name="src")
        dst = await connect(destination.path, name="dst")
        try:
            for qmp in (src, dst):
                await configure(qmp, multifd_channels=2)
            with pytest.raises(ExecuteError) as refused:
                await src.execute("migrate", {"uri": bad})
            assert refused.value.error_class == "GenericError"
            assert await events_until(src, ("failed",)) == ["setup", "failed"]
            assert await ask(src, "query-migrate") == {
                "status": "failed",
                "error-desc": refused.value.error.error.desc,
            }

            with pytest.raises(ExecuteError):
                await dst.execute("migrate-incoming", {"uri": bad})
            assert await ask(dst, "query-migrate") == {}
            assert dst.events.empty()
            await dst.execute("migrate-incoming", {"uri": uri})
            assert await ask(dst, "query-migrate") == {
                "socket-address": [{"type": "unix", "path": uri.removeprefix("unix:")}]
            }
            await src.execute("migrate", {"uri": uri})
            assert (await statuses_until(src, ("completed", "failed")))[-1] == "completed"
        finally:
            await src.disconnect()
            await dst.disconnect()

    run(scenario())
    assert destination.block.sha256() == source.block.sha256()


def test_switchover_is_active_with_the_workload_stopped(
    serve: Callable[..., Served], sock_dir: Path
) -> None:
    """While the source's workload is stopped the status stays active and
    query-status says finish-migrate, as QEMU 7.2's without
    pause-before-switchover. A switchover that fails restarts the workload:
    MIGRATION failed, then RESUME (QEMU's vm_start), and query-status running."""
    destination = serve("destination")
    block = RAMBlock.anonymous("pc.ram", destination.block.used_length)
    random_fill(block, 9)
    release = threading.Event()
    outcomes = iter([RuntimeError("the application could not save"), b"state"])

    def save_state() -> bytes:
        assert release.wait(TIMEOUT)
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    source = MigrationSource([block], save_state=save_state)
    server = QMPServer(str(sock_dir / "held.qmp"), MigrationCommands(source))
    server.start()
    uri = f"unix:{sock_dir / 'migration.sock'}"

    async def scenario() -> None:
        src = await connect(sock_dir / "held.qmp", name="src")
        dst = await connect(destination.path, name="dst")
        try:
            for qmp in (src, dst):
                await configure(qmp)
            # Failed first: after a completed one neither end takes another.
            for expected in ("failed", "completed"):
                release.clear()
                await dst.execute("migrate-incoming", {"uri": uri})
                await src.execute("migrate", {"uri": uri})
                assert (await events_until(src, ("STOP",)))[-1] == "STOP"
                assert (await ask(src, "query-migrate"))["status"] == "active"
                assert (await ask(src, "query-status"))["status"] == "finish-migrate"
                with pytest.raises(ExecuteError, match="stopped for the switchover"):
                    await src.execute("cont")
                release.set()
                seen = await events_until(src, ("completed", "failed"))
                assert seen[-1] == expected and "device" not in seen
                if expected == "failed":
                    assert await next_event(src, "RESUME", 1.0)
                    assert (await ask(src, "query-status"))["status"] == "running"
                    assert "could not save" in (await ask(src, "query-migrate"))["error-desc"]
                else:
                    assert (await ask(src, "query-status"))["status"] == "postmigrate"
                    assert src.events.empty()  # no RESUME after a completed migration
                assert (await statuses_until(dst, ("completed", "failed")))[-1] == expected
        finally:
            await src.disconnect()
            await dst.disconnect()

    try:
        run(scenario())
    finally:
        server.close()
        source.cancel()
        source.wait()
        block.close()


def test_stop_and_cont_on_a_source(serve: Callable[..., Served], sock_dir: Path) -> None:
    """QEMU's stop and cont pause and resume the source's workload (STOP and
    RESUME, once each). A paused workload may migrate: the switchover has
    nothing to stop, and a migration that fails leaves it paused (QEMU's
    vm_was_running). A destination has nothing to stop."""
    source, destination = serve("source", seed=11), serve("destination")
    calls: list[str] = []
    source.source._on_stop = lambda: calls.append("stop")
    source.source._on_resume = lambda: calls.append("resume")
    uri = f"unix:{sock_dir / 'paused.sock'}"

    async def status(qmp: QMPClient) -> str:
        return str((await ask(qmp, "query-status"))["status"])

    async def scenario() -> None:
        src = await connect(source.path, name="src")
        dst = await connect(destination.path, name="dst")
        try:
            for qmp in (src, dst):
                await configure(qmp)
            assert await src.execute("stop") == {}
            assert await next_event(src, "STOP")
            assert await src.execute("stop") == {}  # paused already
            assert await status(src) == "paused"
            assert await src.execute("cont") == {}
            assert await next_event(src, "RESUME")
            assert await src.execute("cont") == {}  # running already
            assert await status(src) == "running"
            assert calls == ["stop", "resume"]

            await src.execute("stop")
            # Nobody listens there: the connect fails.
            await src.execute("migrate", {"uri": f"unix:{sock_dir / 'nobody.sock'}"})
            assert await events_until(src, ("failed",)) == ["STOP", "setup", "failed"]
            assert await status(src) == "paused"

            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            seen = await events_until(src, ("completed", "failed"))
            assert seen[-1] == "completed" and "STOP" not in seen, seen
            assert await status(src) == "postmigrate"
            assert calls == ["stop", "resume", "stop"]
            assert await src.execute("cont") == {}
            assert await next_event(src, "RESUME")
            assert calls == ["stop", "resume", "stop", "resume"]

            with pytest.raises(ExecuteError) as refused:
                await dst.execute("stop")
            assert str(refused.value).startswith("stop is for a source")
        finally:
            await src.disconnect()
            await dst.disconnect()

    run(scenario())
    assert destination.block.sha256() == source.block.sha256()
