"""Hostile connections to a destination's listening address, while it waits for
a source and while a migration runs: junk, wrong magic, truncated or foreign
multifd inits, a channel id twice, peers that send nothing, peers that leave at
once, a flood. Each is refused with a warning naming what was wrong; the
destination keeps waiting (or migrating); a real source then completes."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from e2e_support import FINISH_TIMEOUT, Migration, wait_until

from multifd.channels import Listener
from multifd.channels.listener import MAX_PENDING_HANDSHAKES
from multifd.wire import MultiFDInit

MiB = 1 << 20
CHANNELS = 2
# The destination's x-io-timeout, which also bounds a connection's handshake:
# long enough for a real migration to run while half-open peers still wait.
IO_TIMEOUT = 2
LISTENER_LOG = "multifd.channels.listener"
QEVM = b"QEVM"
MULTIFD = struct.pack(">I", 0x11223344)
OTHER_UUID = bytes.fromhex("0badc0de" * 4)


@dataclass
class Peer:
    """One hostile connection and the refusal it must get (a substring)."""

    sock: socket.socket
    reason: str

    @property
    def label(self) -> str:
        return f"from 127.0.0.1:{self.sock.getsockname()[1]}: "


class Hostile:
    """Opens hostile connections to `uri` and remembers the refusal each must get."""

    def __init__(self, uri: str) -> None:
        host, port = uri.removeprefix("tcp:").rsplit(":", 1)
        self.address = (host, int(port))
        self.peers: list[Peer] = []
        self.silent: list[socket.socket] = []  # left open, refused by no one yet
        self.rng = random.Random(11)

    def connect(self, first_bytes: bytes, reason: str, *, then_close: bool = False) -> Peer:
        sock = socket.create_connection(self.address, timeout=5)
        if first_bytes:
            sock.sendall(first_bytes)
        if then_close:
            # The peer is gone; the listener sees EOF. It may have refused the
            # connection already (junk is judged on its first 4 bytes): then
            # the socket is reset and there is nothing left to shut down.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
        peer = Peer(sock, reason)
        self.peers.append(peer)
        return peer

    def hold_open(self, count: int) -> list[socket.socket]:
        """Peers that connect, send nothing and stay."""
        socks = [socket.create_connection(self.address, timeout=5) for _ in range(count)]
        self.silent += socks
        return socks

    def junk(self, count: int) -> None:
        """Random first bytes that are neither magic, from peers that then leave."""
        for _ in range(count):
            data = self.rng.randbytes(self.rng.randint(4, 200))
            if data[:4] in (QEVM, MULTIFD):
                continue
            value = int.from_bytes(data[:4], "big")
            self.connect(data, f"unknown channel magic {value:#010x}", then_close=True)

    def close(self) -> None:
        for sock in [*(p.sock for p in self.peers), *self.silent]:
            sock.close()


@pytest.fixture
def hostile() -> Iterator[Callable[[str], Hostile]]:
    made: list[Hostile] = []

    def make(uri: str) -> Hostile:
        made.append(Hostile(uri))
        return made[-1]

    yield make
    for h in made:
        h.close()


def init(channel_id: int, uuid: bytes = bytes(16), version: int = 1) -> bytes:
    return MultiFDInit(uuid, channel_id, version=version).pack()


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == LISTENER_LOG and r.levelno == logging.WARNING
    ]


def assert_each_refused(caplog: pytest.LogCaptureFixture, peers: list[Peer]) -> None:
    """Every peer got exactly one warning, naming its address and its reason."""
    wait_until(
        lambda: len(refusals(caplog)) >= len(peers),
        timeout=IO_TIMEOUT + 10,
        what=f"{len(peers)} refusals",
    )
    logged = refusals(caplog)
    assert len(logged) == len(peers), logged
    for peer in peers:
        matching = [m for m in logged if peer.label in m]
        assert len(matching) == 1, (peer.label, matching)
        (message,) = matching
        assert peer.reason in message, (peer.reason, message)


def assert_closed_by_listener(socks: list[socket.socket]) -> None:
    """The listener ended these connections (its handshakes ended with it)."""
    for sock in socks:
        assert sock.recv(1) == b"", "a silent peer's connection is still open"


def assert_port_free(uri: str) -> None:
    """A new listener takes the address at once: nothing holds the port."""
    Listener(uri).close()


def test_hostile_connections_while_waiting_then_a_real_migration(
    migration: Callable[..., Migration],
    hostile: Callable[[str], Hostile],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LISTENER_LOG)
    m = migration(
        sizes=(8 * MiB,),
        parameters={"multifd-channels": CHANNELS},
        dst_parameters={"x-io-timeout": IO_TIMEOUT},
    )
    m.uri = m.destination.incoming(m.listen_uri)
    h = hostile(m.uri)
    h.junk(30)
    h.connect(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "unknown channel magic 0x47455420")
    h.connect(b"\x16\x03\x01\x02\x00\x01", "this is a TLS handshake: set tls-creds")
    h.connect(b"", "peer closed the stream 4 bytes short: got 0 of 4", then_close=True)
    h.connect(b"QE", "peer closed the stream 2 bytes short: got 2 of 4", then_close=True)
    h.connect(init(0)[:30], "peer closed the stream 34 bytes short", then_close=True)
    h.connect(init(1)[:20], "multifd init packet not received within the handshake timeout")
    h.connect(init(0, version=2), "multifd init version 2, expected 1")
    h.connect(init(0, OTHER_UUID), "multifd: received uuid '0badc0de-0bad-c0de-0bad-c0de0badc0de'")
    for _ in range(5):  # connected, silent, open
        h.connect(b"", "channel magic not received within the handshake timeout (2 s)")
    flood = [0.0] * 200  # a flood of peers that leave at once
    for i in range(len(flood)):
        started = time.monotonic()
        h.connect(b"", "peer closed the stream 4 bytes short", then_close=True)
        flood[i] = time.monotonic() - started
    # Each connect is queued at once: none waits for a dropped SYN's
    # retransmission (1 s), as with an accept queue the size of the channels.
    assert max(flood) < 0.5, f"a connect took {max(flood):.2f} s"
    assert_each_refused(caplog, h.peers)
    # Still waiting for its source, as if nothing had happened.
    assert m.destination.state.status.value == "setup"
    assert m.destination._listener is not None
    assert not m.destination._listener.has_any_channel()
    assert m.destination._listener.mismatches == []

    # Silent peers that hold their connections during the real migration:
    # each has its own handshake, so none delays the source's channels.
    silent = h.hold_open(20)
    started = time.monotonic()
    m.assert_completed(listen=False)
    assert time.monotonic() - started < IO_TIMEOUT, "the source waited for the silent peers"
    assert_closed_by_listener(silent)
    # Closing is the listener's own doing, not the peers' fault: no warning.
    assert len(refusals(caplog)) == len(h.peers)
    m.close()
    assert_port_free(m.uri)


def test_hostile_connections_during_a_migration_leave_it_alone(
    migration: Callable[..., Migration],
    hostile: Callable[[str], Hostile],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LISTENER_LOG)
    m = migration(
        sizes=(16 * MiB,),
        workload_rate=2_000,
        parameters={"multifd-channels": CHANNELS},
        dst_parameters={"x-io-timeout": IO_TIMEOUT},
    )
    # Hold the source after its first round (every channel in, pages landed)
    # while the hostile peers arrive, so they meet a migration in progress.
    first_round_sent, hostile_done = threading.Event(), threading.Event()

    def hold(number: int) -> None:
        # Pass 1 is the bitmap sync at setup (as QEMU counts); pass 2 follows round 0.
        if number >= 2 and not first_round_sent.is_set():
            first_round_sent.set()
            hostile_done.wait(FINISH_TIMEOUT)

    m.on_pass = hold
    m.uri = m.destination.incoming(m.listen_uri)
    m.start(listen=False)
    assert first_round_sent.wait(FINISH_TIMEOUT)
    h = hostile(m.uri)
    try:
        # Past the last channel the listener reads a multifd init only.
        extra = "Extra incoming migration connection; ignoring"
        for _ in range(10):
            h.connect(h.rng.randbytes(h.rng.randint(4, 200)), extra, then_close=True)
        h.connect(QEVM + b"\x00\x00\x00\x03", extra)
        h.connect(init(0), "multifd: received id '0' already setup")
        h.connect(init(1, OTHER_UUID), "multifd: received uuid '0badc0de-")
        h.connect(init(0)[:30], "peer closed the stream 34 bytes short", then_close=True)
        h.connect(init(0, version=7), "multifd init version 7, expected 1")
        for _ in range(50):
            h.connect(b"", "peer closed the stream 4 bytes short", then_close=True)
        silent = h.hold_open(5)
        assert_each_refused(caplog, h.peers)
        assert m.destination.query()["status"] == "active"
    finally:
        hostile_done.set()
    src, dst = m.finish()
    assert src["status"] == "completed", src
    assert dst["status"] == "completed", dst
    m.assert_identical()
    assert_closed_by_listener(silent)
    assert len(refusals(caplog)) == len(h.peers)
    # And the next migration, to the same address, completes as well.
    m.clear_hooks()
    m.workload.resume()
    m.assert_completed()
    m.close()
    assert_port_free(m.uri)


def test_a_source_with_another_uuid_fails_within_the_io_timeout(
    migration: Callable[..., Migration],
) -> None:
    """Channels with another UUID are another source's, so they no longer end a
    migration at once; a source really set up with another UUID still fails
    it, once its channels stay missing for x-io-timeout, naming the UUIDs."""
    m = migration(
        sizes=(4 * MiB,),
        parameters={"multifd-channels": CHANNELS},
        dst_parameters={"x-io-timeout": IO_TIMEOUT},
    )
    m.source.uuid = OTHER_UUID
    src, dst = m.run()
    # With no return path the source may have written everything into the
    # socket buffers before its refused channels were closed (as a QEMU 7.2
    # source may): what matters is that the destination never resumes.
    assert src["status"] in ("failed", "completed"), src
    assert dst["status"] == "failed", dst
    assert m.resumed == []
    assert f"timed out after {IO_TIMEOUT} s waiting for channels" in dst["error-desc"]
    assert "multifd: received uuid '0badc0de-0bad-c0de-0bad-c0de0badc0de'" in dst["error-desc"]
    assert dst["x-total-time"] < (IO_TIMEOUT + 5) * 1000, dst
    m.source.uuid = bytes(16)
    m.assert_completed()


class HandshakeThreads:
    """Counts the listener's handshake threads alive, every millisecond, in a
    thread the test owns, and keeps the most seen at once."""

    def __init__(self) -> None:
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="test-handshake-count")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            alive = sum(t.name.startswith("multifd-handshake-") for t in threading.enumerate())
            self.most = max(self.most, alive)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.most


EVICTED = "handshakes pending, the most at once: closed to make room for a new connection"


def test_a_flood_of_silent_peers_holds_at_most_the_cap_then_a_source_completes(
    migration: Callable[..., Migration],
    hostile: Callable[[str], Hostile],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """300 peers connect and say nothing: at most MAX_PENDING_HANDSHAKES of them
    hold a thread; each older one is closed, with one warning, as newer ones
    arrive. The real source then evicts silent peers in turn, and completes
    without waiting for any handshake to time out."""
    caplog.set_level(logging.WARNING, logger=LISTENER_LOG)
    m = migration(
        sizes=(8 * MiB,),
        parameters={"multifd-channels": CHANNELS},
        dst_parameters={"x-io-timeout": IO_TIMEOUT},
    )
    m.uri = m.destination.incoming(m.listen_uri)
    h = hostile(m.uri)
    counter = HandshakeThreads()
    try:
        silent = h.hold_open(300)
        evicted, kept = silent[:-MAX_PENDING_HANDSHAKES], silent[-MAX_PENDING_HANDSHAKES:]
        # The oldest go first: each is closed as soon as the cap is reached.
        assert_closed_by_listener(evicted)
    finally:
        most = counter.stop()
    assert most <= MAX_PENDING_HANDSHAKES, f"{most} handshake threads at once"
    logged = refusals(caplog)
    assert len(logged) == len(evicted), logged[-3:]
    for sock, message in zip(evicted, logged, strict=True):
        assert f"from 127.0.0.1:{sock.getsockname()[1]}: " in message, message
        assert f"{MAX_PENDING_HANDSHAKES} {EVICTED} (the oldest silent one" in message
    assert m.destination.state.status.value == "setup"

    started = time.monotonic()
    m.assert_completed(listen=False)
    assert time.monotonic() - started < IO_TIMEOUT, "the source waited for the silent peers"
    # Silent peers made room for the source's first connections (later ones may
    # find the room its placed channels left).
    assert len(evicted) < len(refusals(caplog)) <= len(evicted) + 1 + CHANNELS
    assert all(EVICTED in message for message in refusals(caplog))
    assert_closed_by_listener(kept)
    m.close()
    assert_port_free(m.uri)


def test_a_source_wins_against_a_running_flood_of_silent_peers(
    migration: Callable[..., Migration],
    hostile: Callable[[str], Hostile],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Silent peers keep arriving while the source connects: the source's
    channels have their first bytes waiting, so the silent ones make room."""
    caplog.set_level(logging.WARNING, logger=LISTENER_LOG)
    m = migration(
        sizes=(8 * MiB,),
        parameters={"multifd-channels": CHANNELS},
        dst_parameters={"x-io-timeout": IO_TIMEOUT},
    )
    m.uri = m.destination.incoming(m.listen_uri)
    h = hostile(m.uri)
    h.hold_open(MAX_PENDING_HANDSHAKES)  # the listener is at its cap from the start
    stop = threading.Event()
    flooded: list[socket.socket] = []

    failed: list[BaseException] = []

    def flood() -> None:
        try:
            while not stop.is_set() and len(flooded) < 1000:
                flooded.extend(h.hold_open(1))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody listens any more: the destination has all its channels
        except BaseException as exc:  # failed here, not as a stray thread's warning
            failed.append(exc)

    flooder = threading.Thread(target=flood, name="test-flood")
    flooder.start()
    try:
        wait_until(lambda: len(flooded) > 20, what="the flood to start")
        m.assert_completed(listen=False)
    finally:
        stop.set()
        flooder.join()
    assert not failed, f"a flood connection failed otherwise than refused: {failed[0]!r}"
    assert m.destination._listener is None or not m.destination._listener.mismatches
    logged = refusals(caplog)
    assert logged and all(EVICTED in message for message in logged), logged[:3]
    m.close()
    assert_port_free(m.uri)
