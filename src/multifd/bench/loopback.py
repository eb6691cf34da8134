"""Raw loopback scenario: the ceiling for a Python data path on this machine,
plain `sendall` of 1 MiB chunks over N connections to another process; and,
over unix sockets, the floor of the Python source's own data path: the pages
that are not zero, lent to the kernel as the source lends them (see
channels/splice.py), with no zero scan, no packets and no protocol."""

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

import numpy as np

from ..channels import Channel
from ..channels.channel import HAVE_VMSPLICE
from ..channels.iovec import IOVec, buffer_address
from ..memory import PAGE_SIZE, RAMBlock, zero_mask
from ..migration.multifd_send import BATCH_PAGES
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


def _lend_share(
    sock: socket.socket, base: int, pages: np.ndarray, offset: int, errors: list[str]
) -> None:
    """The pages at `base` listed in `pages`, lent a batch at a time through the
    channel code the Python source uses; the receiver lays them end to end."""
    try:
        with Channel(sock, "lent loopback") as channel:
            channel.write_all(_HEADER.pack(offset, len(pages) * PAGE_SIZE))
            iov = IOVec(BATCH_PAGES)
            for first in range(0, len(pages), BATCH_PAGES):
                offsets = pages[first : first + BATCH_PAGES].astype(np.uint64)
                iov.set_pages(base, offsets * np.uint64(PAGE_SIZE), PAGE_SIZE)
                channel.write_lent(iov)
            if channel.read_exact(1) != _ACK:
                raise ConnectionError("no acknowledgement from the receiver")
    except Exception as exc:
        errors.append(f"{type(exc).__name__}: {exc}")


class Loopback:
    """N connections carry the RAM content split N ways, from N sender threads to
    N receiver threads in another process that `recv_into` a preallocated,
    faulted-in buffer. Time runs from the first send to the last receiver's
    acknowledgement.

    Over unix sockets each run is followed by a run of the floor: the same
    connections and receiver, carrying only the pages that are not zero, lent
    from the mapping that is already faulted in. It is what moving the pages
    costs the kernel alone, the part of a migration no Python work can remove.

    Open (`with`), it keeps its receiver process, so that `run` can be called
    between the bulk scenario's migrations: the ceiling is then measured next
    to the runs it is the ceiling of, not minutes apart on a shared host.
    """

    def __init__(self, options: BenchOptions, content: Content, workdir: Path) -> None:
        self.options = options
        self.content = content
        self._path = str(workdir / "loopback.sock")
        # (kind, connections) → every timed run's seconds or error; kind is
        # "sendall" (the ceiling) or "lent" (the floor).
        self._outcomes: dict[tuple[str, int], list[float | str]] = {}
        self._stack: contextlib.ExitStack | None = None
        self._conn: Connection | None = None
        self._address: Any = None
        self._data: memoryview | None = None
        self._pages: np.ndarray | None = None  # the pages that are not zero
        self.floor_skipped = _floor_skipped(options)

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
            if self.floor_skipped is None:
                self._pages = np.flatnonzero(~zero_mask(block))
            self._conn = parent
            # The warm-up also faults the source mapping in, once.
            for _ in range(max(1, options.warmup)):
                self._one_run("sendall", options.channels[0])
                if self._pages is not None:
                    self._one_run("lent", options.channels[0])
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def _forget_data(self) -> None:
        self._data = None  # the mapping closes after: no view may outlive it

    def run(self, count: int, index: int) -> None:
        """One timed run over `count` connections, and one of the floor where
        it is measured, recorded (`index` is for the progress line)."""
        size = self.content.size
        for kind, label in (("sendall", "loopback"), ("lent", "floor")):
            if kind == "lent" and self._pages is None:
                continue
            outcome = self._one_run(kind, count)
            self._outcomes.setdefault((kind, count), []).append(outcome)
            shown = f"{size / outcome / GB:.2f} GB/s" if isinstance(outcome, float) else outcome
            self.options.say(f"{label} x{count} run {index + 1}/{self.options.runs}: {shown}")

    def _senders(self, kind: str, count: int) -> list[tuple[Any, tuple[Any, ...]]]:
        """Each connection's sending function and its share: the RAM cut in
        `count` runs of pages, or the pages that are not zero cut so."""
        assert self._data is not None
        if kind == "lent":
            assert self._pages is not None
            base = buffer_address(self._data)
            parts = np.array_split(self._pages, count)
            starts = np.cumsum([0] + [len(p) * PAGE_SIZE for p in parts[:-1]])
            return [(_lend_share, (base, p, int(s))) for p, s in zip(parts, starts, strict=True)]
        size = self.content.size
        shares = [size // count // PAGE_SIZE * PAGE_SIZE] * count
        shares[-1] = size - sum(shares[:-1])
        return [(_send_share, (self._data, sum(shares[:i]), shares[i])) for i in range(count)]

    def _one_run(self, kind: str, count: int) -> float | str:
        assert self._conn is not None and self._data is not None, "not open"
        family = socket.AF_UNIX if self.options.transport == "unix" else socket.AF_INET
        socks = [socket.socket(family, socket.SOCK_STREAM) for _ in range(count)]
        try:
            self._conn.send(count)
            for sock in socks:
                sock.connect(self._address)
            errors: list[str] = []
            threads = [
                threading.Thread(target=target, args=(sock, *share, errors), daemon=True)
                for sock, (target, share) in zip(socks, self._senders(kind, count), strict=True)
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
        label = "loopback" if kind == "sendall" else "floor"
        return f"{label} x{count}: {errors[0]}" if errors else elapsed

    def measure(self) -> None:
        """The loopback scenario on its own: every channel count, `runs` times;
        the figures are then in `entries()` and `floor_entries()`."""
        with self:
            for count in self.options.channels:
                for index in range(self.options.runs):
                    self.run(count, index)

    def entries(self) -> list[dict[str, Any]]:
        """One entry per channel count: the median of its runs."""
        return [
            _entry(self._outcomes.get(("sendall", count), []), self.content.size, self.content.size)
            | {"channels": count, "transport": self.options.transport, "chunk": CHUNK}
            for count in self.options.channels
        ]

    def floor_entries(self) -> list[dict[str, Any]]:
        """The floor's entries, one per channel count. Its GB/s are RAM moved
        per second, as a migration's are: RAM size / seconds."""
        moved = None if self._pages is None else len(self._pages) * PAGE_SIZE
        entries = []
        for count in self.options.channels:
            entry = {"channels": count, "transport": self.options.transport}
            if self.floor_skipped is not None:
                entry |= {"bytes": None, "gbps": None, "error": None, "skipped": self.floor_skipped}
            else:
                assert moved is not None
                outcomes = self._outcomes.get(("lent", count), [])
                entry |= _entry(outcomes, moved, self.content.size) | {"skipped": None}
                if entry["gbps"] is not None:
                    entry["wire_gbps"] = moved / entry["seconds"] / GB
            entries.append(entry)
        return entries


def _entry(outcomes: list[float | str], moved: int, ram: int) -> dict[str, Any]:
    """Median and fastest of the runs that moved `moved` bytes for `ram` bytes
    of RAM, or the first error."""
    errors = [o for o in outcomes if isinstance(o, str)]
    entry: dict[str, Any] = {
        "bytes": moved,
        "gbps": None,
        "error": errors[0] if errors else None,
    }
    if outcomes and not errors:
        times = [o for o in outcomes if isinstance(o, float)]
        seconds = median(times)
        entry.update(
            seconds=seconds,
            gbps=ram / seconds / GB,
            runs_seconds=times,
            best_gbps=ram / min(times) / GB,
        )
    return entry


def _floor_skipped(options: BenchOptions) -> str | None:
    """Why the floor cannot be measured here, or None."""
    if options.transport != "unix":
        return "the source lends pages over unix sockets only (TCP copies them)"
    if not HAVE_VMSPLICE:
        return "this system has no vmsplice(2)"
    return None


def _stop_receiver(process: mp.process.BaseProcess, conn: Connection) -> None:
    with contextlib.suppress(OSError):  # it is gone already
        conn.send(None)
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join()
