"""cancel() at every moment: setup, mid-round, switchover; on the source or the
destination. The state becomes `cancelled`, every thread and socket of the
migration is gone, a stopped workload runs again, and a new migration with the
same blocks, on the same address, succeeds at once."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from e2e_support import (
    FINISH_TIMEOUT,
    TRANSPORTS,
    MiB,
    Migration,
    source_threads,
    wait_until,
    write_pages,
)

LIVE_RATE = 32 * MiB


def _after_cancel(m: Migration, stops: int = 0) -> None:
    """The cancelled migration left nothing behind (the workload was stopped
    `stops` times, and resumed as often); the next migration succeeds."""
    src, dst = m.finish()
    assert src["status"] == "cancelled", src
    assert "error-desc" not in src
    assert m.statuses("source")[-2:] == ["cancelling", "cancelled"]
    assert source_threads() == []
    # The destination saw the source go away mid-stream (or never come).
    assert dst["status"] == "failed", dst
    assert m.stops == m.source_resumes == stops  # a stopped workload was resumed
    # Announced as QEMU does, RESUME before `cancelled` (and whatever the
    # `events` capability says: QEMU's run state events are not gated).
    run_state = [n if n != "MIGRATION" else d["status"] for n, d in m.source_events]
    run_state = [e for e in run_state if e in ("STOP", "RESUME", "cancelled")]
    assert run_state == ["STOP", "RESUME"] * stops + ["cancelled"]
    assert m.workload is None or not m.workload.paused
    assert m.throttles[-1:] in ([], [0])
    m.clear_hooks()
    m.assert_completed()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_as_setup_begins(migration: Callable[..., Migration], transport: str) -> None:
    """Cancel from the 'setup' event, before the migration thread exists: the
    source never connects, and the destination, still listening, takes the
    next migration."""
    m = migration(transport=transport, workload_rate=LIVE_RATE)
    m.on_status = lambda status: m.source.cancel() if status == "setup" else None
    m.start()
    src = m.source.wait(FINISH_TIMEOUT)
    assert src["status"] == "cancelled", src
    assert source_threads() == []
    assert m.destination.state.status.value == "setup"
    assert m.stops == m.source_resumes == 0
    m.clear_hooks()
    m.assert_completed(listen=False)


def test_cancel_while_connecting(migration: Callable[..., Migration], tmp_path: Path) -> None:
    """The destination accepts the connection but never answers the TLS
    handshake: cancel() ends the wait at once (not at the connect timeout)."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca-cert.pem")
    m = migration(parameters={"tls-creds": str(tmp_path)}, dst_parameters={"tls-creds": ""})
    with socket.create_server(("127.0.0.1", 0)) as silent:
        m.source.migrate(f"tcp:127.0.0.1:{silent.getsockname()[1]}")
        connection, _ = silent.accept()  # the source now waits for the handshake
        with connection:
            canceller = threading.Thread(target=m.source.cancel, name="test-cancel")
            canceller.start()
            canceller.join(FINISH_TIMEOUT / 3)
            assert not canceller.is_alive(), "cancel() waited for the connect timeout"
    assert m.source.query()["status"] == "cancelled"
    assert source_threads() == []
    m.source.set_parameters({"tls-creds": ""})
    m.assert_completed()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_in_setup_with_channels_open(
    migration: Callable[..., Migration], transport: str
) -> None:
    """Pass 1 comes in setup, once every channel is connected and its thread runs."""
    m = migration(transport=transport, parameters={"multifd-channels": 4})

    def on_pass(n: int) -> None:
        assert m.source.query()["status"] == "setup"
        m.source.cancel()

    m.on_pass = on_pass
    m.start()
    _after_cancel(m)
    assert m.source.query()["x-rounds"] >= 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_mid_round(migration: Callable[..., Migration], transport: str) -> None:
    """A bandwidth limit keeps round 1 going for about half a second; cancel from
    another thread once part of it is sent (cancel wakes the rate limiter)."""
    m = migration(
        transport=transport,
        sizes=(16 * MiB,),
        parameters={"multifd-channels": 2, "max-bandwidth": 32 * MiB},
        workload_rate=LIVE_RATE,
    )
    m.start()
    wait_until(
        lambda: m.source.query().get("ram", {}).get("transferred", 0) > 2 * MiB,
        what="part of round 1",
    )
    m.source.cancel()
    # cancel() returns with every source thread joined and every socket closed.
    assert m.source.query()["status"] == "cancelled"
    assert source_threads() == []
    m.source.set_parameters({"max-bandwidth": 0})
    _after_cancel(m)


def test_cancel_mid_round_from_a_pass(migration: Callable[..., Migration]) -> None:
    """Cancel from the migration thread between rounds of a live workload (with
    downtime-limit 0 and pages written at every pass, it never switches over;
    the hash tracker counts the writes of pass 1, made before round 1, where the
    kernel tracker's lazy start rightly does not)."""
    m = migration(
        parameters={"multifd-channels": 4, "downtime-limit": 0, "x-dirty-tracker": "hash"},
        workload_rate=LIVE_RATE,
    )

    def on_pass(n: int) -> None:
        write_pages(m.src_blocks[0], range(0, 2048, 3))
        if n == 3:
            assert m.source.query()["status"] == "active"
            m.source.cancel()

    m.on_pass = on_pass
    m.start()
    _after_cancel(m)


@pytest.mark.parametrize("moment", ["on_stop", "last pass", "save_state"])
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_cancel_during_switchover(
    migration: Callable[..., Migration], transport: str, moment: str
) -> None:
    """Cancel while the workload is stopped: when it has just stopped, while the
    last round goes out, while its state is saved. The workload runs again."""
    m = migration(transport=transport, parameters={"multifd-channels": 2}, workload_rate=LIVE_RATE)
    if moment == "on_stop":
        m.stop_hook = m.source.cancel
    elif moment == "last pass":

        def on_pass(n: int) -> None:
            if m.stopped:
                # No `device` status (QEMU 7.2 has it only with
                # pause-before-switchover): active, with the workload stopped.
                assert m.source.query()["status"] == "active"
                assert m.source.stopped
                m.source.cancel()

        m.on_pass = on_pass
    else:
        m.state_hook = m.source.cancel
    m.start()
    assert m.resumed == []  # the destination never resumed
    _after_cancel(m, stops=1)


def test_cancel_switchover_from_another_thread(migration: Callable[..., Migration]) -> None:
    """The application's thread cancels while the source waits in on_stop."""
    m = migration(parameters={"multifd-channels": 2}, workload_rate=LIVE_RATE)
    stopping = threading.Event()

    def stop_hook() -> None:
        stopping.set()
        wait_until(lambda: m.source.state.status.value == "cancelling", what="cancel()")

    m.stop_hook = stop_hook
    m.start()
    assert stopping.wait(FINISH_TIMEOUT)
    m.source.cancel()
    assert m.source.query()["status"] == "cancelled"
    _after_cancel(m, stops=1)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_destination_cancel_mid_round(migration: Callable[..., Migration], transport: str) -> None:
    """The destination cancels: it is `cancelled`, the source `failed` and still
    running, and both can migrate again at once on the same address."""
    m = migration(
        transport=transport,
        sizes=(16 * MiB,),
        parameters={"multifd-channels": 2, "max-bandwidth": 32 * MiB},
        workload_rate=LIVE_RATE,
    )
    m.start()
    wait_until(
        lambda: m.destination.query().get("x-ram", {}).get("transferred", 0) > 2 * MiB,
        what="part of round 1 received",
    )
    m.destination.cancel()
    assert m.destination.query()["status"] == "cancelled"
    assert not [t for t in threading.enumerate() if t.name.startswith("multifdrecv_")]
    src, dst = m.finish()
    assert dst["status"] == "cancelled"
    assert "error-desc" not in dst
    assert src["status"] == "failed", src
    assert m.stops == m.source_resumes
    assert not m.workload.paused
    m.source.set_parameters({"max-bandwidth": 0})
    m.assert_completed()


def test_destination_cancel_while_waiting_for_channels(
    migration: Callable[..., Migration],
) -> None:
    """Before any source connects: the listener goes, the port is free at once."""
    m = migration(parameters={"multifd-channels": 4})
    m.uri = m.destination.incoming(m.listen_uri)
    assert m.destination.state.status.value == "setup"
    m.destination.cancel()
    assert m.destination.query()["status"] == "cancelled"
    m.assert_completed()
