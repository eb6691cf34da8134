"""The destination side: accept connections until the main channel and all N multifd
channels are in, in any order, refusing bad or extra ones without disturbing the rest."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from multifd.wire import INIT_SIZE, MULTIFD_MAGIC, QEMU_VM_FILE_MAGIC, MultiFDInit, WireError

from .channel import Channel, Connections
from .errors import ChannelEOFError, ChannelError, ChannelTimeoutError, os_error_text
from .tls import TLSConfig
from .transport import (
    SocketURI,
    check_setup,
    listen_socket,
    open_stream,
    socket_address,
    unlink_socket,
)
from .uri import MigrationURI, TcpURI, UnixURI, parse_uri

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# Connections in handshake at once, each with its thread and descriptor. Past it
# the oldest silent one makes room (see _make_room); at least twice a source's
# channels, so that a source never evicts its own.
MAX_PENDING_HANDSHAKES = 64

_EXTRA = "Extra incoming migration connection; ignoring"
_MAIN_MAGIC = struct.pack(">I", QEMU_VM_FILE_MAGIC)
_MULTIFD_MAGIC = struct.pack(">I", MULTIFD_MAGIC)
# accept() errors that concern one connection, not the listening socket.
_TRANSIENT_ACCEPT_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN}


class _Refused(Exception):
    """A connection the listener turns away; the message says why."""


class _Mismatch(_Refused):
    """A multifd channel of a source set up differently (more channels than
    ours): its pages would be lost, so the migration must fail."""


@dataclass
class _Pending:
    """A connection in handshake: its socket (the TLS one once wrapped), its
    descriptor (the TLS socket takes the same one over), what the log calls it,
    when it was accepted, and the thread doing its handshake."""

    sock: socket.socket
    fd: int
    label: str
    since: float
    thread: threading.Thread


class Listener:
    """Gathers a migration's incoming channels on `uri`.

    For tcp: and unix: it listens (port 0 picks a port: read it back from `uri`)
    and an accept thread it owns hands each connection to a short-lived handshake
    thread, so a silent peer never holds up the others. A handshake reads the
    first four bytes: "QEVM" is the main channel (those bytes stay in the channel
    for the stream decoder), the multifd magic starts a 64-byte init that is
    checked (version, `uuid`, id below `channels`) and places the channel by id.
    Refused connections are closed, logged and described in `refusals`; a
    refusal never disturbs the channels already placed.

    At most `max_handshakes` connections are in handshake at once (threads and
    descriptors stay bounded whatever a flood of silent peers does). A new
    connection beyond that evicts the oldest one with nothing waiting to be read,
    rather than being refused itself: refusing the newest would let a few dozen
    silent peers, renewed every `handshake_timeout`, lock the real source out for
    good, while a source's channel sends its first bytes on connecting and is
    done within milliseconds, long before it would become the oldest silent one.

    For fd:, exec: and file: there is nothing to accept: the main channel is opened
    at once, and `channels` must be 0.

    `wait()` hands the channels over to the caller; `close()` stops accepting,
    frees the port at once, joins every thread, and closes every channel not yet
    handed over.
    """

    def __init__(
        self,
        uri: str | MigrationURI,
        *,
        channels: int = 0,
        uuid: bytes = bytes(16),
        tls: TLSConfig | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_handshakes: int = MAX_PENDING_HANDSHAKES,
    ) -> None:
        target = parse_uri(uri)
        check_setup(target, channels, uuid, tls)
        self.uri: MigrationURI = target
        self._channels = channels
        self._uuid = uuid
        self._tls = tls
        self._context = tls.server_context() if tls is not None else None
        self._handshake_timeout = handshake_timeout
        self._max_handshakes = max(max_handshakes, 2 * (channels + 1))

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._main: Channel | None = None
        self._multifd: list[Channel | None] = [None] * channels
        self._refusals: list[str] = []
        self._mismatches: list[str] = []
        self._failure: ChannelError | None = None
        # In handshake, by connection number: oldest first.
        self._pending: dict[int, _Pending] = {}
        self._evicted: set[int] = set()  # handshakes told to end, not yet ended
        self._handshakes: list[threading.Thread] = []
        self._closed = False
        self._handed_over = False

        self._sock: socket.socket | None = None
        self._unix_identity: tuple[int, int] | None = None
        self._wake_reader: socket.socket | None = None
        self._wake_writer: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        # What query-migrate shows while we listen; QEMU shows none for fd:,
        # exec: and file:, which are not listened on.
        self.socket_addresses: list[dict[str, Any]] = []
        if not isinstance(target, TcpURI | UnixURI):
            self._main = open_stream(target, "main channel", outgoing=False)
            return
        try:
            self._listen(target)
        except BaseException:
            self.close()
            raise

    def _listen(self, target: SocketURI) -> None:
        # The kernel's largest backlog, not the channel count: a burst of
        # connections (stray or hostile peers, or a source's channels while
        # the accept thread starts handshake threads) must queue, not overflow.
        # An overflowing queue drops SYNs, and every connect behind them, the
        # source's too, waits a whole SYN retransmission (1 s, then 3 s …).
        self._sock, self.uri = listen_socket(target, backlog=socket.SOMAXCONN)
        self.socket_addresses = [socket_address(self._sock)]
        if isinstance(target, UnixURI):
            st = os.stat(target.path)
            self._unix_identity = (st.st_dev, st.st_ino)
        # Non-blocking: a connection that vanishes between select() and accept()
        # must not block the accept thread, which also watches the wake-up socket.
        self._sock.setblocking(False)
        self._wake_reader, self._wake_writer = socket.socketpair()
        # Owned and joined by close(); a daemon all the same, so a program that
        # dies without closing us can still exit, as with every engine thread.
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"multifd-listener {self.uri}", daemon=True
        )
        self._accept_thread.start()

    # ---- what the owner sees --------------------------------------------------

    @property
    def refusals(self) -> list[str]:
        """Every connection refused so far, one message each, oldest first."""
        with self._lock:
            return list(self._refusals)

    @property
    def mismatches(self) -> list[str]:
        """The refusals of multifd channels that the migration's source really
        sent: our UUID with an id beyond multifd-channels (a source with more
        channels than ours). Whatever it writes on them is lost: a migration
        with any of them must fail, as QEMU's does.

        Another UUID is another source's channel, and a second channel with an
        id already placed is a second source (no source sends an id twice):
        refused like a second main channel, they leave this migration alone,
        so a stray or hostile peer cannot end it with 64 bytes."""
        with self._lock:
            return list(self._mismatches)

    def has_all_channels(self) -> bool:
        """The main channel and every multifd channel are in (QEMU's
        migration_has_all_channels)."""
        with self._lock:
            return self._complete()

    def has_any_channel(self) -> bool:
        """A source has begun: the main channel or a multifd channel is placed."""
        with self._lock:
            return self._main is not None or any(c is not None for c in self._multifd)

    def wait(self, timeout: float | None = None, *, until_mismatch: bool = False) -> Connections:
        """Wait for every channel and hand them over: from now on the caller closes
        them. Raises `ChannelTimeoutError` saying what is missing, or `ChannelError`
        if the listener was closed or failed first, or (`until_mismatch`) once a
        channel of a source set up differently was refused: that source gave up."""
        with self._changed:
            self._changed.wait_for(
                lambda: (
                    self._closed
                    or self._failure is not None
                    or self._complete()
                    or (until_mismatch and bool(self._mismatches))
                ),
                timeout,
            )
            if until_mismatch and self._mismatches and not self._complete():
                raise ChannelError(
                    "listener",
                    f"the source is set up differently: {self._mismatches[0]} ({self._progress()})",
                    errno=errno.EPROTO,
                )
            if self._handed_over or (self._complete() and not self._closed):
                self._handed_over = True
                assert self._main is not None
                return Connections(self._main, [c for c in self._multifd if c is not None])
            if self._failure is not None:
                raise self._failure
            if self._closed:
                raise ChannelError(
                    "listener",
                    f"closed on {self.uri} before the channels were handed over "
                    f"({self._progress()})",
                    errno=errno.ECANCELED,
                )
            raise ChannelTimeoutError(
                "listener",
                f"timed out after {timeout:g} s waiting for channels on {self.uri} "
                f"({self._progress()})",
                errno=errno.ETIMEDOUT,
            )

    def close(self) -> None:
        """Stop accepting and free the address at once; join every thread; close the
        channels not handed over. Idempotent; also the cancel path."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = [p.sock for p in self._pending.values()]
            owned = [] if self._handed_over else [self._main, *self._multifd]
            self._changed.notify_all()
        if self._wake_writer is not None:
            with contextlib.suppress(OSError):
                self._wake_writer.send(b"\0")
        for sock in pending:
            _shutdown(sock)
        if self._accept_thread is not None and self._accept_thread.ident is not None:
            self._accept_thread.join()
        # The accept thread is gone, so the list no longer grows.
        for thread in self._handshakes:
            thread.join()
        if self._sock is not None:
            self._sock.close()
        if self._unix_identity is not None and isinstance(self.uri, UnixURI):
            unlink_socket(self.uri.path, self._unix_identity)
        for end in (self._wake_reader, self._wake_writer):
            if end is not None:
                end.close()
        for channel in owned:
            if channel is not None:
                channel.shutdown()  # an exec: command is stopped, not waited for
                channel.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- the accept thread ----------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None and self._wake_reader is not None
        number = 0
        with selectors.DefaultSelector() as selector:
            selector.register(self._sock, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if any(key.fileobj is self._wake_reader for key, _ in ready):
                    return
                try:
                    conn, address = self._sock.accept()
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno in _TRANSIENT_ACCEPT_ERRORS:
                        continue
                    # EMFILE and the like leave the socket readable: retrying would spin.
                    self._fail(
                        ChannelError(
                            "listener",
                            f"accept on {self.uri} failed: {os_error_text(exc)}",
                            errno=exc.errno,
                        )
                    )
                    return
                number += 1
                self._admit(number, conn, _describe_peer(number, address, self.uri))

    def _admit(self, number: int, conn: socket.socket, label: str) -> None:
        conn.settimeout(self._handshake_timeout)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # A peer that already reset the connection is its handshake's business.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        evicted = self._make_room()
        if evicted is not None:
            # Joined before the next thread starts: never more handshake threads
            # than the cap. Its socket is shut down, so it ends at once.
            evicted.join()
        with self._lock:
            self._reap_handshakes()
            if self._closed:  # close() has already ended the handshakes it knew of
                conn.close()
                return
            # Past the last channel a connection is extra; its first bytes still
            # tell a source with more channels than ours from a stray peer.
            extra = self._complete()
            thread = threading.Thread(
                target=self._handshake,
                args=(number, conn, label, extra),
                name=f"multifd-handshake-{number}",
            )
            self._pending[number] = _Pending(conn, conn.fileno(), label, time.monotonic(), thread)
            self._handshakes.append(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # out of threads: refuse this one, keep the others
            with self._lock:
                self._pending.pop(number, None)
                self._handshakes.remove(thread)
                self._refuse_locked(label, f"cannot start its handshake: {exc}")
            conn.close()

    def _make_room(self) -> threading.Thread | None:
        """At the cap, end the oldest handshake with nothing waiting to be read
        (or else the oldest) and return its thread to join."""
        with self._lock:
            if len(self._pending) < self._max_handshakes:
                return None
            number = _oldest_silent(self._pending)
            silent = number is not None
            if number is None:
                number = next(iter(self._pending))
            pending = self._pending.pop(number)
            self._evicted.add(number)
            age = time.monotonic() - pending.since
            what = "the oldest silent one" if silent else "the oldest"
            self._refuse_locked(
                pending.label,
                f"{len(self._pending) + 1} handshakes pending, the most at once: closed "
                f"to make room for a new connection ({what}, after {age:.2f} s); ignoring",
            )
        _shutdown(pending.sock)
        return pending.thread

    def _reap_handshakes(self) -> None:
        """Join the handshake threads that have finished (joining them is instant)."""
        finished = [t for t in self._handshakes if not t.is_alive()]
        for thread in finished:
            thread.join()
            self._handshakes.remove(thread)

    def _fail(self, failure: ChannelError) -> None:
        with self._lock:
            self._failure = failure
            self._changed.notify_all()
        log.error("%s", failure)

    # ---- one handshake thread per connection ----------------------------------

    def _handshake(self, number: int, conn: socket.socket, label: str, extra: bool) -> None:
        deadline = time.monotonic() + self._handshake_timeout
        stage = "TLS handshake" if self._tls is not None else "channel magic"
        sock = conn
        channel: Channel | None = None
        try:
            if self._tls is not None and self._context is not None:
                sock = self._tls.wrap_server(self._context, conn)
                self._track(number, sock)
                self._tls.handshake(sock, label)
                stage = "channel magic"
            channel = Channel(sock, label, timeout=_remaining(deadline))
            magic = channel.read_exact(4)
            if extra and magic != _MULTIFD_MAGIC:
                raise _Refused(_EXTRA)
            if magic == _MAIN_MAGIC:
                channel.unread(magic)  # the stream decoder reads the header from byte 0
                self._place(number, channel, None, label)
                return
            if magic != _MULTIFD_MAGIC:
                raise _Refused(_unknown_magic(magic))
            if not self._channels:
                raise _Refused("a multifd channel, but multifd is off here (multifd-channels 0)")
            stage = "multifd init packet"
            channel.timeout = _remaining(deadline)
            init = MultiFDInit.unpack(magic + channel.read_exact(INIT_SIZE - 4))
            try:
                init.check(self._uuid, self._channels)
            except WireError as exc:
                if exc.field == "uuid":
                    raise _Refused(exc.message) from None
                raise _Mismatch(exc.message) from None
            self._place(number, channel, init.channel_id, label)
        except ChannelTimeoutError:
            reason = (
                _EXTRA
                if extra and stage == "channel magic"
                else f"{stage} not received within the handshake timeout "
                f"({self._handshake_timeout:g} s); ignoring"
            )
            self._refuse(number, label, reason, channel or sock)
        except _Mismatch as exc:
            self._refuse(number, label, str(exc), channel or sock, mismatch=True)
        except (_Refused, WireError) as exc:
            reason = exc.message if isinstance(exc, WireError) else str(exc)
            self._refuse(number, label, reason, channel or sock)
        except (ChannelError, ChannelEOFError) as exc:
            # These already name the connection (the channel's name is `label`).
            self._refuse(number, None, str(exc), channel or sock)
        except OSError as exc:
            self._refuse(number, label, os_error_text(exc), channel or sock)
        except Exception as exc:
            # A bug must cost one connection, not the listener or the process.
            log.exception("%s: handshake failed", label)
            self._refuse(number, label, f"handshake failed: {exc!r}", channel or sock)

    def _track(self, number: int, sock: socket.socket) -> None:
        """The TLS socket takes over the plain one's descriptor (which it detaches):
        close() must find and shut down the new one."""
        with self._lock:
            pending = self._pending.get(number)
            if pending is not None:
                pending.sock = sock
            # Evicted (or closed) while wrapping: the plain socket it shut down
            # no longer owns the descriptor.
            ended = self._closed or pending is None
        if ended:
            _shutdown(sock)

    def _place(self, number: int, channel: Channel, channel_id: int | None, label: str) -> None:
        with self._lock:
            self._pending.pop(number, None)
            refusal = None
            if self._closed or number in self._evicted:
                # Its socket was shut down under it: closing says so already,
                # eviction was logged when it happened.
                self._evicted.discard(number)
            elif channel_id is None:
                if self._main is None:
                    self._main, channel.name = channel, "main channel"
                else:
                    refusal = "a second main channel (QEVM); ignoring"
            elif self._multifd[channel_id] is None:
                self._multifd[channel_id], channel.name = channel, f"channel {channel_id}"
            else:
                refusal = f"multifd: received id '{channel_id}' already setup"
            placed = not self._closed and refusal is None
            if placed:
                channel.timeout = None
                self._changed.notify_all()
            elif refusal is not None:
                self._refuse_locked(label, refusal)
        if not placed:
            channel.close()

    def _refuse(
        self,
        number: int,
        label: str | None,
        reason: str,
        stream: Channel | socket.socket,
        *,
        mismatch: bool = False,
    ) -> None:
        """Record why (unless we are closing: then the failure is our own doing),
        and only then close, so a peer that sees its connection end finds the reason."""
        with self._lock:
            self._pending.pop(number, None)
            if number in self._evicted:
                # The failure is the eviction's doing; it was logged then.
                self._evicted.discard(number)
            elif not self._closed:
                self._refuse_locked(label, reason, mismatch=mismatch)
        stream.close()

    def _refuse_locked(self, label: str | None, reason: str, *, mismatch: bool = False) -> None:
        message = f"{label}: {reason}" if label else reason
        self._refusals.append(message)
        if mismatch:
            self._mismatches.append(message)
            self._changed.notify_all()  # wakes a wait(until_mismatch=True)
        log.warning("%s", message)

    # ---- state, under the lock ------------------------------------------------

    def _complete(self) -> bool:
        return self._main is not None and all(c is not None for c in self._multifd)

    def _progress(self) -> str:
        missing = []
        if self._main is None:
            missing.append("the main channel")
        ids = [str(i) for i, c in enumerate(self._multifd) if c is None]
        if ids:
            missing.append(("channels " if len(ids) > 1 else "channel ") + ", ".join(ids))
        text = "missing " + " and ".join(missing) if missing else "all channels in"
        if self._refusals:
            text += f"; {len(self._refusals)} connection(s) refused, the last: {self._refusals[-1]}"
        return text


def _oldest_silent(pending: dict[int, _Pending]) -> int | None:
    """The number of the oldest connection with no bytes waiting to be read
    (POLLIN also means the peer hung up: that handshake ends by itself).
    Every descriptor is open: a handshake leaves `pending` before it closes."""
    poller = select.poll()
    for entry in pending.values():
        poller.register(entry.fd, select.POLLIN)
    waiting = {fd for fd, _ in poller.poll(0)}
    return next((n for n, entry in pending.items() if entry.fd not in waiting), None)


def _remaining(deadline: float) -> float:
    # Never 0: a socket timeout of 0 means non-blocking, not "already expired".
    return max(deadline - time.monotonic(), 0.001)


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _describe_peer(number: int, address: object, uri: MigrationURI) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        shown = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
        return f"incoming connection #{number} from {shown}"
    return f"incoming connection #{number} on {uri}"


def _unknown_magic(magic: bytes) -> str:
    value = struct.unpack(">I", magic)[0]
    text = (
        f"unknown channel magic {value:#010x}, expected {QEMU_VM_FILE_MAGIC:#010x} "
        f'("QEVM", the main channel) or {MULTIFD_MAGIC:#010x} (a multifd channel)'
    )
    if magic[0] == 0x16 and magic[1] == 0x03:
        text += "; this is a TLS handshake: set tls-creds on this side too"
    return text
