"""The QIOChannel analogue: one byte stream (socket, pipe or file) with exact reads,
zero-copy vectored I/O, byte counters, a timeout, shutdown and close."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import ssl
import stat
import struct
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from ._libc import HAVE_VMSPLICE, RecvMsg
from .errors import ChannelEOFError, ChannelError, ChannelTimeoutError, os_error_text
from .iovec import IOV_MAX, IOVec
from .splice import SplicePipe, unsent_bytes
from .tls import describe_alert_after_handshake, describe_ssl_error
from .tls_session import TLSSession

# Anything the buffer protocol accepts: bytes, bytearray, memoryview, numpy arrays…
Buffer = bytes | bytearray | memoryview

# A finished exec: command gets this long to exit after its pipe is closed before it
# is killed; killing earlier could cut short a command still writing out the stream.
EXEC_EXIT_TIMEOUT = 30.0
# After shutdown() asked it to stop (SIGTERM), a command gets this long before it is
# killed: one that ignores SIGTERM must not hold up a cancel.
EXEC_KILL_GRACE = 1.0
# How long the end of an exec: command's output waits for its exit status: the
# command closes its output as it exits, but is reaped a moment later.
EXEC_STATUS_WAIT = 1.0

_READ_CHUNK = 64 * 1024
# Capped by net.core.wmem_max (4 MiB on this class of machine).
UNIX_SNDBUF = 4 << 20
# Owners of lent memory held before the peer's progress is asked (SIOCOUTQ).
_HELD_CHECK = 16
# struct linger {l_onoff = 1, l_linger = 0}: close() sends a reset.
_LINGER_RESET = struct.pack("ii", 1, 0)
# What close() reads off and drops at most: more than any TLS session tickets,
# less than a peer flooding us could make it wait for.
_UNREAD_LIMIT = 1 << 20


def _timeval(seconds: float | None) -> bytes:
    """struct timeval for SO_RCVTIMEO/SO_SNDTIMEO; zero means wait forever."""
    if not seconds:
        return struct.pack("ll", 0, 0)
    whole = int(seconds)
    # A positive timeout must not round down to 0 (forever).
    micros = max(int((seconds - whole) * 1e6), 0 if whole else 1)
    return struct.pack("ll", whole, micros)


class Channel:
    """One migration stream: a socket (TCP, UNIX, TLS) or a file descriptor (pipe, file).

    Implements the wire layer's `ByteSource`. Reads are exact: a short read loops,
    and a stream that ends first raises `ChannelEOFError`. Writes are complete: a
    partial write loops by advancing views, never by joining buffers. Every error
    names the channel (`name`, e.g. "main channel", "channel 3").

    Threads: one thread reads and one writes at a time; any thread may call
    `shutdown()` to make blocked calls return. `close()` comes after the threads
    using the channel are joined, and is idempotent.
    """

    def __init__(
        self,
        stream: socket.socket | int,
        name: str,
        *,
        process: subprocess.Popen[bytes] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Own `stream`: a socket, or a file descriptor. A descriptor that is a socket
        becomes a socket; a pipe or file is read and written with readv/writev.
        `process` is the exec: command at the other end of a pipe, reaped on close."""
        if isinstance(stream, int) and stat.S_ISSOCK(os.fstat(stream).st_mode):
            stream = socket.socket(fileno=stream)
        self.name = name
        self.bytes_read = 0  # the stream offset of the next byte a caller reads
        self.bytes_written = 0
        self.exit_status: int | None = None  # exec: the command's exit status once closed
        self._sock = stream if isinstance(stream, socket.socket) else None
        self._fd = stream.fileno() if isinstance(stream, socket.socket) else stream
        # With return-path one thread reads the main channel while another writes
        # it: under TLS that needs TLSSession (OpenSSL takes one call at a time).
        self._session = TLSSession(stream) if isinstance(stream, ssl.SSLSocket) else None
        self._process = process
        # A pipe or file is non-blocking and waited on with poll() beside this
        # eventfd, which shutdown() makes readable: nothing else wakes a thread
        # blocked on a pipe. Sockets have shutdown(2) instead.
        self._wake: int | None = None
        if self._sock is None:
            self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            os.set_blocking(self._fd, False)
        # Bytes already taken off the stream (the listener reads the first four to
        # tell channels apart) that the next reads return first. MSG_PEEK cannot do
        # this job under TLS.
        self._prefix = bytearray()
        self._timeout: float | None = None
        self._lock = threading.Lock()
        self._shut = False
        self._closed = False
        # Lent pages go through a pipe into the socket (see splice.py): unix
        # stream sockets only. TCP keeps pages until they are acknowledged and
        # reads them again to retransmit, and across hosts the peer's read is
        # not a copy the sender saves.
        self._can_lend = (
            HAVE_VMSPLICE
            and self._session is None
            and self._sock is not None
            and self._sock.family == socket.AF_UNIX
            and self._sock.type == socket.SOCK_STREAM
        )
        self._splice: SplicePipe | None = None
        # What write_lent holds for the peer to read: (stream offset after it, owner).
        self._held: deque[tuple[int, object]] = deque()
        # Plain sockets read struct iovec tables with one recvmsg(2) (read_iovec).
        self._recvmsg = RecvMsg() if self._sock is not None and self._session is None else None
        self.timeout = timeout
        if self._sock is not None and self._sock.family == socket.AF_UNIX:
            # A unix socket queues at most its sender's SO_SNDBUF (about 200 KiB
            # by default), less than one 512 KiB packet: each packet cost several
            # sleeps and wake-ups on both ends. TCP tunes its own buffers.
            with contextlib.suppress(OSError):
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)

    def __repr__(self) -> str:
        kind = "tls" if self._session is not None else "socket" if self._sock is not None else "fd"
        state = " closed" if self._closed else ""
        return (
            f"<Channel {self.name!r} {kind}{state} read={self.bytes_read} "
            f"written={self.bytes_written}>"
        )

    # ---- properties ------------------------------------------------------------

    @property
    def timeout(self) -> float | None:
        """Seconds a single read or write may wait for progress; None waits forever."""
        return self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = value
        if self._session is not None:
            self._session.timeout = value
        elif self._sock is not None:
            # A blocking socket whose kernel timeouts bound each call: one
            # sendmsg or MSG_WAITALL recvmsg moves a whole packet, where Python's
            # own timeout (a non-blocking socket plus poll) returns at every
            # socket-buffer's worth and costs a poll and a GIL round trip each.
            self._sock.settimeout(None)
            timeval = _timeval(value)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    @property
    def duplex(self) -> bool:
        """Whether the peer can answer on this channel: a socket carries a reverse
        direction (QEMU's return path); a pipe or a file does not."""
        return self._sock is not None

    @property
    def is_tls(self) -> bool:
        return self._session is not None

    @property
    def closed(self) -> bool:
        return self._closed

    def peer_certificate(self) -> dict[str, object] | None:
        """The peer's TLS certificate as `ssl.SSLSocket.getpeercert()` decodes it."""
        if self._session is not None:
            return self._session.getpeercert()
        return None

    # ---- reading ---------------------------------------------------------------

    def read_exact(self, n: int) -> bytes:
        """Exactly `n` bytes, or `ChannelEOFError` if the stream ends first."""
        buf = bytearray(n)
        if n:
            self._fill([memoryview(buf)], n)
        return bytes(buf)

    def readv_into(self, buffers: Sequence[bytearray | memoryview]) -> int:
        """Fill every buffer completely, in order, straight from the stream
        (recvmsg_into / readv); returns the byte count."""
        views = _byte_views(buffers)
        total = sum(map(len, views))
        if total:
            self._fill(views, total)
        return total

    def read_iovec(self, iov: IOVec) -> None:
        """Fill every range of `iov` completely, in order: one recvmsg(2) on a
        plain socket, with no Python object per range."""
        if self._recvmsg is None or self._prefix or not iov.count:
            if iov.total:
                self._fill(iov.views(), iov.total)
            return
        start = self.bytes_read
        try:
            n = self._recvmsg(self._fd, iov.address, iov.count, socket.MSG_WAITALL)
        except InterruptedError:
            n = 0
        except OSError as exc:
            raise self._read_error(exc, iov.total, start, None) from _cause(exc)
        if n == iov.total:
            self.bytes_read = start + n
            return
        # Cut short (a timeout, a signal, the end): the rest the usual way,
        # which tells these apart.
        self.bytes_read = start + n
        total = iov.total
        iov.advance(n)
        try:
            self._fill(iov.views(), iov.total)
        except ChannelEOFError as exc:
            raise ChannelEOFError(
                self.name, missing=exc.missing, wanted=total, offset=start, note=exc.note
            ) from None

    def read_some_into(self, buffer: bytearray | memoryview) -> int:
        """Read what the stream has now, at most `len(buffer)` bytes, waiting only
        for the first; 0 at the end of the stream. Buffered readers use it."""
        view = memoryview(buffer).cast("B")
        if self._prefix:
            n = min(len(view), len(self._prefix))
            view[:n] = self._prefix[:n]
            del self._prefix[:n]
            self.bytes_read += n
            return n
        start = self.bytes_read
        try:
            if self._sock is None:
                n = self._fd_io(os.readv, [view], select.POLLIN)
            elif self._session is not None:
                n = self._session.recv_into(view)
            else:
                n = self._sock.recv_into(view, len(view))
        except (TimeoutError, BlockingIOError):
            raise ChannelTimeoutError(
                self.name,
                f"no data for {self._timeout:g} s at stream offset {start:#x}",
                errno=errno.ETIMEDOUT,
            ) from None
        except OSError as exc:
            raise self._failure(f"read failed at stream offset {start:#x}", exc) from exc
        self.bytes_read += n
        return n

    def read_to_eof(self, limit: int, complete: Callable[[bytes], bool] | None = None) -> bytes:
        """Everything up to the end of the stream; `ValueError` past `limit` bytes.

        `complete(data)`, when given, may end the read earlier: a peer that waits
        for an answer (the return path) does not close its end after the last byte."""
        start = self.bytes_read
        data = bytearray(self._prefix)
        self._prefix.clear()
        view = memoryview(bytearray(_READ_CHUNK))
        while len(data) <= limit:
            if complete is not None and data and complete(bytes(data)):
                break
            # Not an exact read: a peer that waits for our answer sends no more.
            n = self.read_some_into(view)
            if n == 0:
                break
            data += view[:n]
        self.bytes_read = start + len(data)
        if len(data) > limit:
            raise ValueError(
                f"{self.name}: more than {limit} bytes before the end of the stream "
                f"(from stream offset {start:#x})"
            )
        return bytes(data)

    def unread(self, data: bytes) -> None:
        """Put bytes just read back in front of the stream, for the next read."""
        self._prefix[:0] = data
        self.bytes_read -= len(data)

    def _fill(self, views: list[memoryview], total: int) -> None:
        start = self.bytes_read
        got = 0
        if self._prefix:
            n = _copy_into(views, self._prefix)
            del self._prefix[:n]
            got = n
            views = _advance(views, n)
        while views:
            n = self._recv_some(views, start, total, got)
            if n == total - got:
                break  # the usual case: one MSG_WAITALL call read everything
            if n == 0:
                self.bytes_read = start + got
                if self._shut:
                    raise ChannelError(
                        self.name,
                        f"shut down while reading ({got} of {total} bytes read at stream "
                        f"offset {start:#x})",
                        errno=errno.ECANCELED,
                    )
                raise ChannelEOFError(
                    self.name,
                    missing=total - got,
                    wanted=total,
                    offset=start,
                    note=self.end_note(),
                )
            got += n
            views = _advance(views, n)
        self.bytes_read = start + total

    def _recv_some(self, views: list[memoryview], start: int, total: int, got: int) -> int:
        try:
            if self._sock is None:
                return self._fd_io(os.readv, views, select.POLLIN)
            if self._session is not None:
                # SSLSocket has no recvmsg_into: TLS decrypts one buffer at a time.
                return self._session.recv_into(views[0])
            if len(views) == 1:
                return self._sock.recv_into(views[0], len(views[0]), socket.MSG_WAITALL)
            # MSG_WAITALL: one system call fills the whole list when data is flowing.
            return self._sock.recvmsg_into(views[:IOV_MAX], 0, socket.MSG_WAITALL)[0]
        except OSError as exc:
            raise self._read_error(exc, total, start, got) from _cause(exc)

    def _read_error(self, exc: OSError, total: int, start: int, got: int | None) -> ChannelError:
        """What a failed read of `total` bytes from stream offset `start` raises
        (`got` of them read, when known): a timeout, or the OS error, and where."""
        if isinstance(exc, TimeoutError | BlockingIOError):
            progress = "" if got is None else f" ({got} read)"
            return ChannelTimeoutError(
                self.name,
                f"no data for {self._timeout:g} s while reading {total} bytes at stream "
                f"offset {start:#x}{progress}",
                errno=errno.ETIMEDOUT,
            )
        return self._failure(f"read failed at stream offset {start + (got or 0):#x}", exc)

    # ---- writing ---------------------------------------------------------------

    def writable(self) -> bool:
        """Whether a short write would go out now, without waiting: the stream
        has room (poll, no timeout). False once closed."""
        if self._closed:
            return False
        poller = select.poll()
        poller.register(self._fd, select.POLLOUT)
        return bool(poller.poll(0))

    def write_all(self, data: Buffer) -> int:
        """Write all of `data`; returns its length."""
        return self.writev_all([data])

    def writev_all(self, buffers: Sequence[Buffer]) -> int:
        """Write every buffer in order (sendmsg / writev), looping over partial
        writes by advancing views: page buffers are never copied or joined."""
        views = _byte_views(buffers)
        total = sum(map(len, views))
        left = total
        while left:
            n = self._send_some(views)
            self.bytes_written += n
            left -= n
            if left:  # a partial write: a timeout, a signal, or more than IOV_MAX
                views = _advance(views, n)
        return total

    def _send_some(self, views: list[memoryview]) -> int:
        try:
            if self._sock is None:
                return self._fd_io(os.writev, views, select.POLLOUT)
            if self._session is not None:
                # SSLSocket has no sendmsg; each buffer becomes TLS records of its own.
                return self._session.send(views[0])
            batch = views[:IOV_MAX]
            if not self._timeout:
                return self._sock.sendmsg(batch)
            return self._timed_write(lambda: self._sock.sendmsg(batch), sum(map(len, batch)))
        except OSError as exc:
            raise self._write_error(exc) from _cause(exc)

    def _timed_write(self, call: Callable[[], int], size: int) -> int:
        """A sendmsg or splice of `size` bytes under the socket's send timeout.
        The kernel ends a call that copied part of its bytes when the timeout
        expires, with that part: looping on it would wait a whole timeout more
        (or several) before the error saying "could not write for T s". A call
        that lasted the timeout while the peer took nothing of what was queued
        (SIOCOUTQ: sent but not acknowledged, or not read on a unix socket) is
        that timeout; one during which it took some is a slow peer, and goes on."""
        queued = unsent_bytes(self._fd)
        started = time.monotonic()
        n = call()
        if n < size and time.monotonic() - started >= self._timeout:
            try:
                stalled = unsent_bytes(self._fd) >= queued + n
            except OSError:
                stalled = False  # a broken socket: the next call says how
            if stalled:
                self.bytes_written += n  # out: the error's offset counts it
                raise TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
        return n

    @property
    def can_lend(self) -> bool:
        """Whether `write_lent` lends pages here (a plain unix stream socket)."""
        return self._can_lend

    def write_lent(self, iov: IOVec, *, keep: object = None) -> None:
        """Write the memory in `iov` without copying it: lent to the kernel
        (vmsplice into a pipe, splice into the socket, see splice.py) where
        `can_lend`, copied elsewhere. The peer reads that memory when it reads
        the bytes: the caller keeps it mapped, and accepts that what it writes
        there meanwhile goes out. `keep`, the owner of memory in `iov` that must
        not change (a packet's header), is held here until the peer has read
        it. `wait_read()` tells when the peer has read everything. `iov` is
        consumed."""
        if not self._can_lend:
            self.writev_all(iov.views())
            iov.advance(iov.total)
            return
        try:
            if self._splice is None:
                self._splice = SplicePipe()
            pipe = self._splice
            while iov.total:
                if pipe.lend_iovec(iov) == 0:
                    self._drain_full(pipe)
                elif iov.total:
                    # vmsplice took what fitted: asking again would only find
                    # the pipe full (or past IOV_MAX, where draining early is
                    # harmless); a system call and a GIL hand-off saved per fill.
                    self._drain(pipe)
            if keep is not None:
                self._hold(keep, self.bytes_written + pipe.queued)
            self._drain(pipe)
        except OSError as exc:
            self._drop_splice()
            raise self._write_error(exc) from _cause(exc)

    def _hold(self, keep: object, end: int) -> None:
        """Keep `keep` until the peer has read up to stream offset `end`; let go
        of what it has read (one SIOCOUTQ now and then: the unread bytes)."""
        held = self._held
        if len(held) >= _HELD_CHECK:
            read = self.bytes_written - unsent_bytes(self._fd)
            while held and held[0][0] <= read:
                held.popleft()
        held.append((end, keep))

    def _write_error(self, exc: OSError) -> ChannelError:
        """What a failed write raises: a timeout, or the OS error, and where."""
        if isinstance(exc, TimeoutError | BlockingIOError):
            return ChannelTimeoutError(
                self.name,
                f"could not write for {self._timeout:g} s at stream offset {self.bytes_written:#x}",
                errno=errno.ETIMEDOUT,
            )
        return self._failure(
            f"write failed at stream offset {self.bytes_written:#x}", exc, writing=True
        )

    def _drain_full(self, pipe: SplicePipe) -> None:
        if not pipe.queued:  # an empty pipe that takes nothing would loop forever
            raise OSError(errno.EIO, "the pipe for lent pages took no bytes")
        self._drain(pipe)

    def _drain(self, pipe: SplicePipe) -> None:
        while pipe.queued:
            if self._timeout:
                n = self._timed_write(lambda: pipe.drain_some(self._fd), pipe.queued)
            else:
                n = pipe.drain_some(self._fd)
            self.bytes_written += n

    def _drop_splice(self) -> None:
        # What a failed write left in the pipe can never go out in order; a
        # peer that still reads the socket gets a stream that failed anyway.
        if self._splice is not None:
            self._splice.close()
            self._splice = None
        self._held.clear()

    def wait_read(self, timeout: float | None) -> bool:
        """Wait until the peer has read every byte written (lent pages are then
        no longer referenced); False if it has not within `timeout` or the
        channel was shut down meanwhile. Returns at once where nothing is lent."""
        if self._splice is None or self._closed:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._shut:
                return False
            try:
                if unsent_bytes(self._fd) <= 0:
                    self._held.clear()
                    return True
            except OSError:
                return True  # a shut-down or broken socket no longer holds pages
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    # ---- helpers ---------------------------------------------------------------

    def _fd_io(
        self, call: Callable[[int, list[memoryview]], int], views: list[memoryview], event: int
    ) -> int:
        """readv/writev on a pipe or file, whose descriptor is non-blocking: poll()
        waits for it or for shutdown() (files are always ready)."""
        assert self._wake is not None
        while True:
            try:
                return call(self._fd, views[:IOV_MAX])
            except BlockingIOError:
                poller = select.poll()
                poller.register(self._fd, event)
                poller.register(self._wake, select.POLLIN)
                ready = poller.poll(None if self._timeout is None else self._timeout * 1000)
                if not ready:
                    raise TimeoutError from None
                if any(fd == self._wake for fd, _ in ready):
                    if event == select.POLLIN:
                        return 0  # as a shut-down socket's read ends
                    raise OSError(errno.ECANCELED, os.strerror(errno.ECANCELED)) from None

    def end_note(self) -> str:
        """Why the stream ended, where the channel knows: an exec: command's exit
        status, if it exits within EXEC_STATUS_WAIT (a stream that ends early is
        most often a command that failed); empty otherwise."""
        return self._exit_status(EXEC_STATUS_WAIT)

    def _exit_status(self, wait: float) -> str:
        """An exec: command's exit status, if it exits within `wait` seconds."""
        if self._process is None:
            return ""
        try:
            status = self._process.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            return ""
        return f"exec: command exited with status {status}"

    def _failure(self, what: str, exc: OSError, *, writing: bool = False) -> ChannelError:
        detail = describe_ssl_error(exc) if isinstance(exc, ssl.SSLError) else os_error_text(exc)
        if writing and self._session is not None and not self._shut and _hung_up(exc):
            # The peer hung up after a TLS alert (under TLS 1.3, the destination's
            # refusal of our certificate comes after our handshake ended): the
            # alert, not the broken write, says why.
            session = self._session
            alert = session.pending_alert()
            if alert is not None:
                detail = describe_alert_after_handshake(alert, server_side=session.server_side)
        if self._shut:
            detail += " (the channel was shut down)"
        if exited := self._exit_status(0):
            detail += f" ({exited})"
        return ChannelError(self.name, f"{what}: {detail}", errno=exc.errno)

    # ---- ending ----------------------------------------------------------------

    def shutdown(self) -> None:
        """Make blocked reads and writes in other threads return (with an error).

        Sockets are shut down both ways; a pipe's or file's waits end; an exec:
        command's process group is terminated (killed on close() if it has not
        ended within EXEC_KILL_GRACE).
        """
        with self._lock:
            if self._closed or self._shut:
                return
            self._shut = True
            if self._sock is not None:
                # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops
                # the TLS state that a reader blocked in another thread still uses.
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
                return
            assert self._wake is not None
            os.eventfd_write(self._wake, 1)
            if self._process is not None and self._process.returncode is None:
                # The command runs in its own process group (see transport.py):
                # killing the group also stops what the shell started.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGTERM)

    def close(self, *, reset: bool = False) -> None:
        """Release the socket or descriptor (and reap an exec: command). Idempotent.

        `reset=True` abandons a TCP connection with a reset (SO_LINGER 0): after
        shutdown() and a drained receive queue, a plain close leaves a peer that
        is blocked writing into a full window waiting for one that never opens.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._drop_splice()
        if self._sock is not None:
            if reset and self._sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            else:
                self._discard_unread()
            self._sock.close()
        else:
            os.close(self._fd)
        if self._wake is not None:
            os.close(self._wake)
        if self._process is not None:
            try:
                self._process.wait(timeout=EXEC_KILL_GRACE if self._shut else EXEC_EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait()
            self.exit_status = self._process.returncode

    def _discard_unread(self) -> None:
        """Read off what the peer sent and nobody read. A socket closed with
        unread bytes resets the connection: TCP then drops the end of our
        stream that the kernel has not sent yet, and a unix socket fails the
        peer's last read. A TLS 1.3 server's session tickets are such bytes on
        every channel whose reverse direction is never read (no return path)."""
        assert self._sock is not None
        scratch = bytearray(_READ_CHUNK)
        for _ in range(_UNREAD_LIMIT // _READ_CHUNK):
            try:
                # socket.socket's own recv_into: raw bytes, past any TLS layer,
                # and MSG_DONTWAIT on the blocking socket returns at once.
                if not socket.socket.recv_into(self._sock, scratch, 0, socket.MSG_DONTWAIT):
                    return
            except OSError:
                return

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class Connections:
    """The channels of one migration: the main channel and the multifd channels by id."""

    main: Channel
    multifd: list[Channel] = field(default_factory=list)

    @property
    def all(self) -> list[Channel]:
        return [self.main, *self.multifd]

    def shutdown(self) -> None:
        for channel in self.all:
            channel.shutdown()

    def close(self, *, reset: bool = False) -> None:
        for channel in self.all:
            channel.close(reset=reset)

    def __enter__(self) -> Connections:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _hung_up(exc: OSError) -> bool:
    return isinstance(exc, ssl.SSLEOFError) or exc.errno in (errno.EPIPE, errno.ECONNRESET)


def _cause(exc: OSError) -> OSError | None:
    # A timeout says all there is to say; another error keeps the OS error as cause.
    return None if isinstance(exc, TimeoutError | BlockingIOError) else exc


def _byte_views(buffers: Sequence[Buffer]) -> list[memoryview]:
    """Flat byte views of the non-empty buffers. Views that already are (page
    slices of a RAM block: dozens per packet) pass through as they are."""
    views = []
    for b in buffers:
        if type(b) is not memoryview or b.format != "B" or b.ndim != 1:
            b = memoryview(b).cast("B")
        if len(b):
            views.append(b)
    return views


def _copy_into(views: list[memoryview], data: bytearray) -> int:
    """Copy from `data` into the views, in order; returns the bytes copied."""
    done = 0
    for view in views:
        n = min(len(view), len(data) - done)
        view[:n] = data[done : done + n]
        done += n
        if done == len(data):
            break
    return done


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The views still to transfer after `n` bytes went through."""
    i = 0
    while i < len(views) and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest
