"""The source side: open the main channel and write the stream header at once, then
open the multifd channels concurrently, each sending its init packet first."""

from __future__ import annotations

import contextlib
import errno
import functools
import socket
import ssl
import threading

from multifd.wire import MultiFDInit

from .channel import Channel, Connections
from .tls import TLSConfig
from .transport import check_setup, connect_socket, open_stream
from .uri import MigrationURI, TcpURI, UnixURI, URIError, parse_uri

CONNECT_TIMEOUT = 30.0


class ConnectAbort:
    """Lets another thread end `connect_channels` at once (a cancelled migration).

    Every socket is watched from before it connects; `abort()` shuts them down,
    which ends a connect(), TLS handshake or first write that waits, and any
    socket watched afterwards fails before connecting.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: dict[str, socket.socket] = {}  # the latest socket of each channel
        self._aborted = False

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            sockets = list(self._sockets.values())
        for sock in sockets:
            with contextlib.suppress(OSError):  # closed already, or never connected
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def watch(self, name: str, sock: socket.socket) -> None:
        with self._lock:
            if not self._aborted:
                self._sockets[name] = sock
                return
        raise ConnectionAbortedError(errno.ECANCELED, "connecting was aborted")


def connect_channels(
    uri: str | MigrationURI,
    *,
    header: bytes,
    channels: int = 0,
    uuid: bytes = bytes(16),
    tls: TLSConfig | None = None,
    timeout: float | None = CONNECT_TIMEOUT,
    abort: ConnectAbort | None = None,
) -> Connections:
    """Open a migration's channels to `uri` and write their first bytes.

    The main channel comes first and sends `header` (the QEVM stream header and
    configuration) before any multifd channel connects, which a QEMU 7.2
    destination needs. Then `channels` multifd channels connect concurrently,
    each sending its 64-byte init (`uuid`, channel id). `channels=0` is plain
    precopy, and the only choice for fd:, exec: and file:.

    `timeout` bounds each connect, TLS handshake and first write; the channels
    returned have no timeout. `abort`, when given, lets another thread end it all
    at once. If any channel fails, every channel already opened
    is closed and the error of the lowest channel id is raised (`ChannelError`,
    naming the channel and the OS error; a `TLSError` says which TLS check failed).
    """
    target = parse_uri(uri)
    _check_arguments(target, channels, uuid, tls)
    context = tls.client_context() if tls is not None else None
    main = _open(target, "main channel", tls, context, timeout, abort)
    try:
        main.write_all(header)
        multifd = _open_multifd(target, channels, uuid, tls, context, timeout, abort)
    except BaseException:
        main.close()
        raise
    connections = Connections(main, multifd)
    for channel in connections.all:
        channel.timeout = None
    return connections


def _check_arguments(
    target: MigrationURI, channels: int, uuid: bytes, tls: TLSConfig | None
) -> None:
    check_setup(target, channels, uuid, tls)
    if isinstance(target, TcpURI) and (not target.host or target.port == 0):
        raise URIError(str(target), "connecting needs a host and a port other than 0")
    if tls is not None and isinstance(target, UnixURI) and not tls.hostname:
        raise URIError(
            str(target), "TLS over unix: needs tls-hostname, the name to check", show_forms=False
        )


def _open(
    target: MigrationURI,
    name: str,
    tls: TLSConfig | None,
    context: ssl.SSLContext | None,
    timeout: float | None,
    abort: ConnectAbort | None,
) -> Channel:
    if not isinstance(target, TcpURI | UnixURI):
        return open_stream(target, name, outgoing=True, timeout=timeout)
    watch = functools.partial(abort.watch, name) if abort is not None else None
    sock = connect_socket(target, name, timeout, watch=watch)
    try:
        if tls is not None and context is not None:
            host = target.host if isinstance(target, TcpURI) else ""
            sock = tls.wrap_client(context, sock, host, name)
            if watch is not None:
                watch(sock)  # the TLS socket has taken the descriptor over
            tls.handshake(sock, name)
        return Channel(sock, name, timeout=timeout)
    except BaseException:
        sock.close()
        raise


def _open_multifd(
    target: MigrationURI,
    channels: int,
    uuid: bytes,
    tls: TLSConfig | None,
    context: ssl.SSLContext | None,
    timeout: float | None,
    abort: ConnectAbort | None,
) -> list[Channel]:
    opened: list[Channel | None] = [None] * channels
    errors: list[Exception | None] = [None] * channels

    def open_one(channel_id: int) -> None:
        try:
            channel = _open(target, f"channel {channel_id}", tls, context, timeout, abort)
            opened[channel_id] = channel
            channel.write_all(MultiFDInit(uuid, channel_id).pack())
        except Exception as exc:  # reported by the owner below, after every join
            errors[channel_id] = exc

    threads = [
        threading.Thread(target=open_one, args=(i,), name=f"multifd-connect-{i}")
        for i in range(channels)
    ]
    complete = False
    try:
        try:
            for thread in threads:
                thread.start()
        finally:
            for thread in threads:
                if thread.ident is not None:  # started
                    thread.join()
        failed = [exc for exc in errors if exc is not None]
        if failed:
            for other in failed[1:]:
                failed[0].add_note(f"also: {other}")
            raise failed[0]
        complete = True
        return [channel for channel in opened if channel is not None]
    finally:
        if not complete:
            for channel in opened:
                if channel is not None:
                    channel.close()
