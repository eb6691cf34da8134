"""Stalled peers: a destination that stops reading and a source that stops
writing (or never opens its channels) end in a clear failure after x-io-timeout."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from e2e_support import FINISH_TIMEOUT, Migration

from multifd.channels import Listener, parse_uri
from multifd.demo.workload import fill
from multifd.memory import RAMBlock
from multifd.migration.source import MigrationSource
from multifd.wire import Configuration, FileHeader, MultiFDInit

MiB = 1 << 20


class SilentPeer:
    """Accepts every connection and never reads from it (a hung destination);
    small receive buffers make the source's writes block quickly."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.uri = f"tcp:127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, name="silent-peer")
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed by close()
            self.accepted.append(conn)

    def close(self) -> None:
        socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(FINISH_TIMEOUT)
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def silent_peer() -> Iterator[SilentPeer]:
    peer = SilentPeer()
    yield peer
    peer.close()


def test_destination_that_stops_reading(silent_peer: SilentPeer) -> None:
    """The source's writes block in a full window: after x-io-timeout it fails,
    naming the channel and the timeout, and its workload runs on."""
    block = RAMBlock.anonymous("pc.ram", 32 * MiB)
    fill(block.array, seed=3)
    before = block.sha256()
    resumes: list[bool] = []
    source = MigrationSource(
        [block],
        capabilities={"multifd": True},
        parameters={"x-io-timeout": 1, "max-bandwidth": 0, "downtime-limit": 1},
        on_resume=lambda: resumes.append(True),
    )
    try:
        source.migrate(silent_peer.uri)
        info = source.wait(FINISH_TIMEOUT)
        assert info["status"] == "failed", info
        assert "could not write for 1 s" in info["error-desc"], info
        assert "channel" in info["error-desc"], info
        assert block.sha256() == before  # migration never touches the source's memory
        assert resumes == []  # never stopped: the workload just runs on
    finally:
        source.cancel()
        block.close()


def _connect(uri: str) -> socket.socket:
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=FINISH_TIMEOUT)


@pytest.mark.parametrize("stall", ["after the header", "before the multifd channels"])
def test_source_that_stops_writing(migration: Callable[..., Migration], stall: str) -> None:
    """A source that connects and then goes silent: the destination fails after
    x-io-timeout naming what it waited for, frees its port, and then accepts a
    real migration."""
    m = migration(parameters={"x-io-timeout": 1})
    uri = m.destination.incoming(m.listen_uri)
    m.uri = uri
    peers = [_connect(uri)]
    try:
        peers[0].sendall(FileHeader().pack() + Configuration.build("multifd-python").pack())
        if stall == "after the header":
            for channel_id in range(2):
                peers.append(_connect(uri))
                peers[-1].sendall(MultiFDInit(bytes(16), channel_id).pack())
        dst = m.destination.wait(FINISH_TIMEOUT)
    finally:
        for peer in peers:
            peer.close()
    assert dst["status"] == "failed", dst
    error = dst["error-desc"]
    if stall == "after the header":
        # The multifd channels owe nothing until the main stream asks for
        # their SYNC: the main channel is the one that stalled.
        assert error.startswith("main channel: ") and "no data for 1 s" in error, error
    else:
        assert "timed out after 1 s waiting for channels" in error, error
        assert "missing channels 0, 1" in error, error
    assert m.resumed == []
    Listener(parse_uri(uri)).close()  # the port is free at once
    m.assert_completed()


def test_no_source_at_all_waits_unbounded(migration: Callable[..., Migration]) -> None:
    """x-io-timeout bounds a stalled source, not the wait for one to come."""
    m = migration(parameters={"x-io-timeout": 1})
    m.uri = m.destination.incoming(m.listen_uri)
    # Still listening: as QEMU's, query-migrate shows the address, no status.
    assert set(m.destination.wait(1.5)) == {"socket-address"}
    assert m.destination.state.status.value == "setup"
    m.assert_completed(listen=False)


def test_refused_channel_ends_the_wait_for_the_others(migration: Callable[..., Migration]) -> None:
    """A source with more channels than ours (its channel 2 is refused) gives up,
    as QEMU does: the destination fails at once, not after x-io-timeout (60 s,
    beyond the test's bounded wait), naming the refused channel."""
    m = migration(parameters={"x-io-timeout": 60})
    uri = m.destination.incoming(m.listen_uri)
    m.uri = uri
    peers = [_connect(uri)]
    try:
        peers[0].sendall(FileHeader().pack() + Configuration.build("multifd-python").pack())
        for channel_id in (0, 2):
            peers.append(_connect(uri))
            peers[-1].sendall(MultiFDInit(bytes(16), channel_id).pack())
        dst = m.destination.wait(FINISH_TIMEOUT)
    finally:
        for peer in peers:
            peer.close()
    assert dst["status"] == "failed", dst
    error = dst["error-desc"]
    assert "set up differently" in error and "channel id 2" in error, error
    Listener(parse_uri(uri)).close()
    m.assert_completed()
