"""Raw loopback scenario: the ceiling for a Python data path on this machine,
plain `sendall` of 1 MiB chunks over N connections to another process."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import socket
import struct
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from ..memory import RAMBlock
from .content import Content
from .options import BenchOptions
from .system import GB, median

CHUNK = 1 << 20
_HEADER = struct.Struct("<QQ")  # offset and length of this connection's share
_ACK = b"k"


def _receive_share(sock: socket.socket, buffer: memoryview, errors: list[str]) -> None:
    try:
        with sock:
            header = sock.recv(_HEADER.size, socket.MSG_WAITALL)
            offset, length = _HEADER.unpack(header)
            view = buffer[offset : offset + length]
            got = 0
            while got < length:
                n = sock.recv_into(view[got : got + CHUNK])
                if n == 0:
                    raise ConnectionError(f"EOF after {got} of {length} bytes")
                got += n
            sock.sendall(_ACK)
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


def _receiver_main(transport: str, path: str, size: int, timeout: float, conn: Connection) -> None:
    """Accept N connections per request from the parent; one thread each."""
    with RAMBlock.anonymous("loopback", size) as block:
        block.prefault()
        family = socket.AF_UNIX if transport == "unix" else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as listener:
            listener.bind(path if transport == "unix" else ("127.0.0.1", 0))
            listener.listen(64)
            # A benchmark that died between asking and connecting must not leave
            # this process waiting for connections forever.
            listener.settimeout(timeout)
            conn.send(listener.getsockname())
            while (count := conn.recv()) is not None:
                errors: list[str] = []
                threads = []
                for _ in range(count):
                    sock, _address = listener.accept()
                    thread = threading.Thread(
                        target=_receive_share, args=(sock, block.buffer, errors), daemon=True
                    )
                    thread.start()
                    threads.append(thread)
                for thread in threads:
                    thread.join()
                conn.send(errors)
    conn.close()


def _send_share(
    sock: socket.socket, data: memoryview, offset: int, length: int, errors: list[str]
) -> None:
    try:
        sock.sendall(_HEADER.pack(offset, length))
        for first in range(offset, offset + length, CHUNK):
            sock.sendall(data[first : min(first + CHUNK, offset + length)])
        if sock.recv(1) != _ACK:
            raise ConnectionError("no acknowledgement from the receiver")
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


class Loopback:
    """N connections carry the RAM content split N ways, from N sender threads to
    N receiver threads in another process that `recv_into` a preallocated,
    faulted-in buffer. Time runs from the first send to the last receiver's
    acknowledgement.

    Open (`with`), it keeps its receiver process, so that `run` can be called
    between the bulk scenario's migrations: the ceiling is then measured next
    to the runs it is the ceiling of, not minutes apart on a shared host.
    """

    def __init__(self, options: BenchOptions, content: Content, workdir: Path) -> None:
        self.options = options
        self.content = content
        self._path = str(workdir / "loopback.sock")
        self._outcomes: dict[int, list[float | str]] = {}
        self._stack: contextlib.ExitStack | None = None
        self._conn: Connection | None = None
        self._address: Any = None
        self._data: memoryview | None = None

    def __enter__(self) -> Loopback:
        options = self.options
        with contextlib.ExitStack() as stack:
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            stack.callback(parent.close)
            process = ctx.Process(
                target=_receiver_main,
                args=(
                    options.transport,
                    self._path,
                    self.content.size,
                    options.migration_timeout,
                    child,
                ),
                daemon=True,
            )
            process.start()
            child.close()
            stack.callback(_stop_receiver, process, parent)
            if not parent.poll(options.migration_timeout):
                raise RuntimeError("the loopback receiver did not start")
            try:
                self._address = parent.recv()
            except EOFError:
                process.join(10)
                raise RuntimeError(
                    f"the loopback receiver exited (code {process.exitcode}) before listening"
                ) from None
            if options.transport == "unix":  # bound by the receiver: ours to remove
                stack.callback(Path(self._path).unlink, missing_ok=True)
            block = stack.enter_context(self.content.block())
            self._data = block.buffer
            stack.callback(self._forget_data)
            self._conn = parent
            # The warm-up also faults the source mapping in, once.
            for _ in range(max(1, options.warmup)):
                self._one_run(options.channels[0])
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _forget_data(self) -> None:
        self._data = None  # the mapping closes after: no view may outlive it

    def run(self, count: int, index: int) -> None:
        """One timed run over `count` connections, recorded (`index` is for the
        progress line)."""
        outcome = self._one_run(count)
        self._outcomes.setdefault(count, []).append(outcome)
        size = self.content.size
        shown = f"{size / outcome / GB:.2f} GB/s" if isinstance(outcome, float) else outcome
        self.options.say(f"loopback x{count} run {index + 1}/{self.options.runs}: {shown}")

    def _one_run(self, count: int) -> float | str:
        assert self._conn is not None and self._data is not None, "not open"
        size = self.content.size
        family = socket.AF_UNIX if self.options.transport == "unix" else socket.AF_INET
        socks = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
        try:
            self._conn.send(count)
            for sock in socks:
                sock.connect(self._address)
            shares = [size // count // 4096 * 4096] * count
            shares[-1] = size - sum(shares[:-1])
            errors: list[str] = []
            threads = [
                threading.Thread(
                    target=_send_share,
                    args=(sock, self._data, sum(shares[:i]), shares[i], errors),
                    daemon=True,
                )
                for i, sock in enumerate(socks)
            ]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - started
        finally:
            for sock in socks:
                sock.close()
        errors += self._conn.recv()
        return f"loopback x{count}: {errors[0]}" if errors else elapsed

    def measure(self) -> list[dict[str, Any]]:
        """The loopback scenario on its own: every channel count, `runs` times."""
        with self:
            for count in self.options.channels:
                for index in range(self.options.runs):
                    self.run(count, index)
        return self.entries()

    def entries(self) -> list[dict[str, Any]]:
        """One entry per channel count: the median of its runs."""
        size = self.content.size
        entries = []
        for count in self.options.channels:
            outcomes = self._outcomes.get(count, [])
            errors = [o for o in outcomes if isinstance(o, str)]
            entry: dict[str, Any] = {
                "channels": count,
                "transport": self.options.transport,
                "bytes": size,
                "chunk": CHUNK,
                "gbps": None,
                "error": errors[0] if errors else None,
            }
            if outcomes and not errors:
                times = [o for o in outcomes if isinstance(o, float)]
                seconds = median(times)
                entry.update(
                    seconds=seconds,
                    gbps=size / seconds / GB,
                    runs_seconds=times,
                    best_gbps=size / min(times) / GB,
                )
            entries.append(entry)
        return entries


def _stop_receiver(process: mp.process.BaseProcess, conn: Connection) -> None:
    with contextlib.suppress(OSError):  # it is gone already
        conn.send(None)
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join()
