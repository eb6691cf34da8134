"""A relay between a source and a destination that corrupts one multifd packet.

It forwards every connection both ways (the main channel's reverse direction
carries the return path) and, on multifd channel 0, parses the packets and
applies a mutation to the first one that carries pages and that it accepts.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

from e2e_support import FINISH_TIMEOUT

from multifd.wire import INIT_SIZE, PACKET_HEADER_SIZE
from multifd.wire.multifd import COMPRESSION_MASK

PAGE = 4096
_FIELDS = struct.Struct(">IIIIII")  # magic, version, flags, pages_alloc, normal, next size
RAMBLOCK_AT = 64  # the 256-byte name field, after the fixed fields and 32 unused bytes
OFFSETS_AT = 320  # the be64 page offsets
# Changes a packet header (a bytearray) and its payload; returns the payload to
# send, or None to leave this packet alone and wait for another.
Mutation = Callable[[bytearray, bytes], bytes | None]


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return bytes(data)


def block_name(header: bytearray) -> str:
    """The RAM block a packet header names."""
    return bytes(header[RAMBLOCK_AT : RAMBLOCK_AT + 256]).rstrip(b"\0").decode()


class Relay:
    """Forwards every connection to `target`; see the module docstring."""

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
            for target, args in ((self._pump, (client, server)), (self._back, (server, client))):
                thread = threading.Thread(target=target, args=args, name="relay")
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
                    changed = self.mutate(header, payload)
                    if changed is not None:
                        self.mutated.set()
                        payload = changed
                server.sendall(bytes(header) + payload)
        except (OSError, EOFError):
            pass
        finally:
            # Either side gone: end both, as a broken network would.
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _back(self, server: socket.socket, client: socket.socket) -> None:
        """The reverse direction, as it is: the return path on the main channel."""
        with contextlib.suppress(OSError):
            self._copy(server, client)
            # The destination ended its side: so does the relay, towards the source.
            client.shutdown(socket.SHUT_WR)

    def _copy(self, client: socket.socket, server: socket.socket) -> None:
        while data := client.recv(1 << 16):
            server.sendall(data)

    def sever(self, choose: Callable[[list[tuple[socket.socket, socket.socket]]], int]) -> bool:
        """Cut one forwarded connection, both ways, as a broken network would;
        `choose` picks it from the (client, server) pairs. False if none yet."""
        sockets = list(self.sockets)  # the accept thread appends a pair at a time
        pairs = list(zip(sockets[::2], sockets[1::2], strict=True))
        if not pairs:
            return False
        for sock in pairs[choose(pairs)]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return True

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
