"""Corrupted bytes on a multifd channel, injected by a relay between the ends: the
destination fails naming the channel, packet and field; the source runs on."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

import pytest
from e2e_support import FINISH_TIMEOUT, Migration

from multifd.wire import INIT_SIZE, PACKET_HEADER_SIZE
from multifd.wire.multifd import COMPRESSION_MASK

MiB = 1 << 20
PAGE = 4096
_FIELDS = struct.Struct(">IIIIII")  # magic, version, flags, pages_alloc, normal, next size
RAMBLOCK_AT = 64  # the 256-byte name field, after the fixed fields and 32 unused bytes
OFFSETS_AT = 320  # the be64 page offsets
# Changes a packet header (a bytearray) and its payload; returns the payload to send.
Mutation = Callable[[bytearray, bytes], bytes]


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


class Relay:
    """Forwards every connection to `target`. On multifd channel 0 it parses the
    packets and applies `mutate` to the first one that carries pages."""

    def __init__(self, target: str, mutate: Mutation) -> None:
        host, port = target.removeprefix("tcp:").rsplit(":", 1)
        self.target = (host, int(port))
        self.mutate = mutate
        self.mutated = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.sock.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, name="relay-accept")]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return  # closed by close()
            server = socket.create_connection(self.target, timeout=FINISH_TIMEOUT)
            self.sockets += [client, server]
            thread = threading.Thread(target=self._pump, args=(client, server), name="relay")
            self.threads.append(thread)
            thread.start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        try:
            head = _read_exact(client, 4)
            server.sendall(head)
            if head != b"\x11\x22\x33\x44":
                self._copy(client, server)
                return
            rest = _read_exact(client, INIT_SIZE - 4)
            server.sendall(rest)
            if rest[20] != 0:  # the channel id, after version and UUID
                self._copy(client, server)
                return
            while True:
                header = bytearray(_read_exact(client, PACKET_HEADER_SIZE))
                _, _, flags, _, normal, size = _FIELDS.unpack_from(header)
                payload = _read_exact(client, size if flags & COMPRESSION_MASK else normal * PAGE)
                if normal and not self.mutated.is_set():
                    self.mutated.set()
                    payload = self.mutate(header, payload)
                server.sendall(bytes(header) + payload)
        except (OSError, EOFError):
            pass
        finally:
            # Either side gone: end both, as a broken network would.
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _copy(self, client: socket.socket, server: socket.socket) -> None:
        while data := client.recv(1 << 16):
            server.sendall(data)

    def close(self) -> None:
        # Shutting the listening socket down is what wakes a blocked accept().
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self.threads:
            thread.join(FINISH_TIMEOUT)
        for sock in self.sockets:
            sock.close()


def flip_magic_bit(header: bytearray, payload: bytes) -> bytes:
    header[1] ^= 0x01
    return payload


def offset_out_of_range(header: bytearray, payload: bytes) -> bytes:
    header[OFFSETS_AT : OFFSETS_AT + 8] = struct.pack(">Q", 0x7FFF_F000)
    return payload


def wrong_block_name(header: bytearray, payload: bytes) -> bytes:
    header[RAMBLOCK_AT : RAMBLOCK_AT + 256] = b"nosuch".ljust(256, b"\0")
    return payload


def truncated_zstd(header: bytearray, payload: bytes) -> bytes:
    size = len(payload) // 2
    header[20:24] = struct.pack(">I", size)
    return payload[:size]


CASES = {
    "flipped bit in the magic": (flip_magic_bit, "none", ("magic",)),
    "page offset out of range": (offset_out_of_range, "none", ("0x7ffff000", "pc.ram")),
    "wrong block name": (wrong_block_name, "none", ("nosuch",)),
    "truncated zstd payload": (truncated_zstd, "zstd", ()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupted_packet(migration: Callable[..., Migration], case: str) -> None:
    mutate, compression, words = CASES[case]
    m = migration(
        workload_rate=5_000,
        parameters={"multifd-compression": compression, "x-io-timeout": 5},
    )
    m.uri = m.destination.incoming(m.listen_uri)
    relay = Relay(m.uri, mutate)
    try:
        m.workload.start()
        m.source.migrate(relay.uri)
        src, dst = m.finish()
    finally:
        relay.close()
    assert relay.mutated.is_set()
    assert dst["status"] == "failed", dst
    error = dst["error-desc"]
    assert "channel 0" in error and "packet" in error, error
    for word in words:
        assert word in error, error
    assert m.resumed == []
    # The destination's failure reaches the source as a reset (or its pages
    # were all out): it failed and runs on, or it completed its side.
    assert src["status"] in ("failed", "completed"), src
    if src["status"] == "failed":
        assert not m.stopped and not m.workload.paused
    else:
        m.workload.resume()
    m.assert_completed()
