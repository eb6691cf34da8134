"""Opening what a URI names: sockets to connect to or listen on (tcp:, unix:), and the
single-stream transports (fd:, exec:, file:) in either direction."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from typing import Any

from .channel import Channel
from .errors import ChannelError, ChannelTimeoutError, os_error_text
from .tls import TLSConfig
from .uri import (
    ExecURI,
    FdURI,
    FileURI,
    MigrationURI,
    TcpURI,
    UnixURI,
    URIError,
    check_multifd,
)

SocketURI = TcpURI | UnixURI
StreamURI = FdURI | ExecURI | FileURI


def check_setup(target: MigrationURI, channels: int, uuid: bytes, tls: TLSConfig | None) -> None:
    """What both ends refuse before anything starts: multifd on a transport that cannot
    carry it, a channel count or UUID out of range, TLS on a transport without it."""
    if channels:
        check_multifd(target)
    if not 0 <= channels <= 255:
        raise ValueError(f"multifd-channels {channels}, expected 1 to 255 (or 0 without multifd)")
    if len(uuid) != 16:
        raise ValueError(f"the migration UUID is {len(uuid)} bytes, expected 16")
    if tls is not None and not isinstance(target, TcpURI | UnixURI):
        raise URIError(str(target), "TLS (tls-creds) needs tcp: or unix:", show_forms=False)


def connect_socket(
    uri: SocketURI,
    name: str,
    timeout: float | None,
    *,
    watch: Callable[[socket.socket], None] | None = None,
) -> socket.socket:
    """A connected stream socket (TCP_NODELAY on TCP), with `timeout` applied to the
    connect. `watch` sees each socket before it connects, so that another thread
    can shut it down to end a connect that waits (see `ConnectAbort`)."""
    try:
        if isinstance(uri, TcpURI):
            sock = _connect_tcp(uri, timeout, watch)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        return _connect(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), uri.path, timeout, watch)
    except TimeoutError:
        raise ChannelTimeoutError(
            name, f"connect to {uri} timed out after {timeout:g} s", errno=errno.ETIMEDOUT
        ) from None
    except OSError as exc:
        raise ChannelError(
            name, f"connect to {uri} failed: {os_error_text(exc)}", errno=exc.errno
        ) from None


def _connect_tcp(
    uri: TcpURI, timeout: float | None, watch: Callable[[socket.socket], None] | None
) -> socket.socket:
    """socket.create_connection, each socket shown to `watch` before it connects:
    every address in turn; if none connects, the first address's error."""
    errors: list[OSError] = []
    for family, kind, proto, _, address in socket.getaddrinfo(
        uri.host, uri.port, type=socket.SOCK_STREAM
    ):
        try:
            return _connect(socket.socket(family, kind, proto), address, timeout, watch)
        except OSError as exc:
            errors.append(exc)
    raise errors[0] if errors else OSError(f"no address found for {uri.host!r}")


def _connect(
    sock: socket.socket,
    address: object,
    timeout: float | None,
    watch: Callable[[socket.socket], None] | None,
) -> socket.socket:
    try:
        if watch is not None:
            watch(sock)
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def listen_socket(uri: SocketURI, backlog: int) -> tuple[socket.socket, SocketURI]:
    """A listening socket (SO_REUSEADDR, so a closed listener's port is free at once)
    and the URI it is bound to: port 0 becomes the port the system chose."""
    sock: socket.socket | None = None
    try:
        if isinstance(uri, TcpURI):
            family, kind, proto, _, address = socket.getaddrinfo(
                uri.host or None, uri.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            bound: SocketURI = TcpURI(uri.host, sock.getsockname()[1])
        else:
            _remove_stale_socket(uri.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(uri.path)
            bound = uri
        sock.listen(backlog)
        return sock, bound
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise ChannelError(
            "listener", f"cannot listen on {uri}: {os_error_text(exc)}", errno=exc.errno
        ) from None


def socket_address(sock: socket.socket) -> dict[str, Any]:
    """The address `sock` is bound to as QEMU's SocketAddress (qapi/sockets.json),
    as query-migrate shows a listener's: a numeric host, the port as a string,
    and the flag of the family bound (socket_sockaddr_to_address_inet)."""
    if sock.family == socket.AF_UNIX:
        return {"type": "unix", "path": sock.getsockname()}
    host, port = socket.getnameinfo(
        sock.getsockname(), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
    )
    family = "ipv4" if sock.family == socket.AF_INET else "ipv6"
    return {"type": "inet", "host": host, "port": port, family: True}


def _remove_stale_socket(path: str) -> None:
    """QEMU unlinks the path before binding. We unlink only a socket nobody listens
    on (left by a process that was killed): a mistyped URI must not delete a file,
    nor a second daemon take the address of one that runs."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    # Non-blocking: a live listener with a full backlog answers EAGAIN at once.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except (BlockingIOError, InterruptedError):
            pass  # a listener that has not caught up: in use all the same
        except OSError as exc:
            if exc.errno != errno.EPROTOTYPE:  # a live socket of another type
                raise OSError(
                    exc.errno, f"{path} exists and cannot be checked: {exc.strerror}"
                ) from None
    raise OSError(errno.EADDRINUSE, f"address in use: another process listens on {path}")


def unlink_socket(path: str, identity: tuple[int, int]) -> None:
    """Remove a listener's socket file, unless someone else has since replaced it."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            os.unlink(path)


def open_stream(
    uri: StreamURI, name: str, *, outgoing: bool, timeout: float | None = None
) -> Channel:
    """The one channel of an fd:, exec: or file: migration, for writing (`outgoing`,
    the source) or reading (the destination)."""
    if isinstance(uri, FdURI):
        try:
            return Channel(uri.fd, name, timeout=timeout)
        except OSError as exc:
            raise ChannelError(
                name, f"{uri} is not an open file descriptor: {os_error_text(exc)}", errno=exc.errno
            ) from None
    if isinstance(uri, FileURI):
        return _open_file(uri, name, outgoing=outgoing, timeout=timeout)
    return _spawn(uri, name, outgoing=outgoing, timeout=timeout)


def _open_file(uri: FileURI, name: str, *, outgoing: bool, timeout: float | None) -> Channel:
    """QEMU (8.2, where file: came) opens with O_TRUNC, then seeks only to a nonzero
    offset: bytes before it read as zeros, and at offset 0 a FIFO or a device works."""
    # Truncated only once the seek succeeded: a refused offset leaves the file as it was.
    flags = os.O_WRONLY | os.O_CREAT if outgoing else os.O_RDONLY
    try:
        fd = os.open(uri.path, flags | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ChannelError(
            name, f"cannot open {uri.path}: {os_error_text(exc)}", errno=exc.errno
        ) from None
    try:
        if uri.offset:
            os.lseek(fd, uri.offset, os.SEEK_SET)
        if outgoing and stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)  # O_TRUNC's effect; other kinds of file ignore O_TRUNC
        return Channel(fd, name, timeout=timeout)
    except OSError as exc:
        os.close(fd)
        raise ChannelError(
            name,
            f"cannot use {uri.path} from offset {uri.offset:#x}: {os_error_text(exc)}",
            errno=exc.errno,
        ) from None


def _spawn(uri: ExecURI, name: str, *, outgoing: bool, timeout: float | None) -> Channel:
    read_end, write_end = os.pipe()
    ours, theirs = (write_end, read_end) if outgoing else (read_end, write_end)
    try:
        # Its own process group, so shutdown() can stop everything the shell starts.
        process = subprocess.Popen(
            ["/bin/sh", "-c", uri.command],
            stdin=theirs if outgoing else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL if outgoing else theirs,
            process_group=0,
        )
    except OSError as exc:
        os.close(ours)
        raise ChannelError(
            name, f"cannot start {uri}: {os_error_text(exc)}", errno=exc.errno
        ) from None
    finally:
        os.close(theirs)
    return Channel(ours, name, process=process, timeout=timeout)
