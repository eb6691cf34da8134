"""Migration URIs in QEMU's spelling (`tcp:`, `unix:`, `fd:`, `exec:`, `file:`) parsed
into values, refused early with the accepted forms when malformed."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ACCEPTED_FORMS = (
    "tcp:HOST:PORT (HOST may be [IPv6]; port 0 picks a free port when listening), "
    "unix:PATH, fd:N, exec:COMMAND, file:PATH[,offset=N]"
)

# sun_path is 108 bytes on Linux, one of which is the terminating NUL.
UNIX_PATH_MAX = 107

# off_t is a signed 64-bit count: lseek(2) takes no offset past this.
MAX_FILE_OFFSET = (1 << 63) - 1

_SIZE_SUFFIXES = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


class URIError(ValueError):
    """A migration URI that cannot be used; the message shows the accepted forms."""

    def __init__(self, uri: str, problem: str, *, show_forms: bool = True) -> None:
        self.uri = uri
        self.problem = problem
        text = f"invalid migration URI {uri!r}: {problem}"
        if show_forms:
            text += f" (accepted forms: {ACCEPTED_FORMS})"
        super().__init__(text)


@dataclass(frozen=True)
class TcpURI:
    """`tcp:HOST:PORT`. An empty host means every interface when listening."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class UnixURI:
    """`unix:PATH`, a UNIX stream socket."""

    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class FdURI:
    """`fd:N`, an already open socket or pipe; the channel takes ownership of it."""

    fd: int

    def __str__(self) -> str:
        return f"fd:{self.fd}"


@dataclass(frozen=True)
class ExecURI:
    """`exec:COMMAND`, run by `/bin/sh -c`: the source writes its stdin, the
    destination reads its stdout."""

    command: str

    def __str__(self) -> str:
        return f"exec:{self.command}"


@dataclass(frozen=True)
class FileURI:
    """`file:PATH[,offset=N]`: the migration starts `offset` bytes into the file."""

    path: str
    offset: int = 0

    def __str__(self) -> str:
        return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")


MigrationURI = TcpURI | UnixURI | FdURI | ExecURI | FileURI

_MULTIFD_REFUSALS: dict[type, str] = {
    FdURI: "fd: is one already open stream, and multifd needs to open more connections "
    "to the same address",
    ExecURI: "exec: has one pipe to one command, and multifd needs more connections "
    "to the same address",
    FileURI: "file: holds one stream (QEMU 9.0's mapped-ram, which allows multifd on "
    "file:, is not implemented)",
}


def check_multifd(uri: MigrationURI) -> None:
    """Refuse, in QEMU's words, a URI whose transport cannot carry multifd channels."""
    reason = _MULTIFD_REFUSALS.get(type(uri))
    if reason is not None:
        raise URIError(
            str(uri),
            f"multifd is not supported by current protocol: {reason}; use tcp: or unix:",
            show_forms=False,
        )


def socket_address_uri(address: Mapping[str, Any]) -> TcpURI | UnixURI:
    """The URI of a QEMU SocketAddress as query-migrate shows a listener's
    (`{"type": "inet", "host": …, "port": "…"}` or `{"type": "unix", "path": …}`),
    as QEMU's socket_uri reads it for `info migrate`."""
    kind = address.get("type")
    if kind == "inet":
        return TcpURI(address["host"], int(address["port"]))
    if kind == "unix":
        return UnixURI(address["path"])
    raise URIError(str(dict(address)), f"a socket address of type {kind!r} has no migration URI")


def parse_uri(text: str | MigrationURI) -> MigrationURI:
    """Parse a QEMU migration URI; values already parsed pass through unchanged."""
    if not isinstance(text, str):
        return text
    scheme, sep, rest = text.partition(":")
    if not sep:
        raise URIError(text, "no protocol before ':'")
    if scheme == "tcp":
        return _parse_tcp(text, rest)
    if scheme == "unix":
        return _parse_unix(text, rest)
    if scheme == "fd":
        if not rest.isdigit():
            raise URIError(text, "fd: needs a file descriptor number, e.g. fd:5")
        return FdURI(int(rest))
    if scheme == "exec":
        if not rest.strip():
            raise URIError(text, "exec: needs a command")
        return ExecURI(rest)
    if scheme == "file":
        return _parse_file(text, rest)
    if scheme in ("vsock", "rdma"):
        raise URIError(text, f"the {scheme}: protocol is not supported here")
    raise URIError(text, f"unknown migration protocol: {scheme}")


def _parse_tcp(text: str, rest: str) -> TcpURI:
    if "," in rest:
        raise URIError(text, "tcp: options (',to=', ',ipv4', …) are not supported")
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket or not tail.startswith(":"):
            raise URIError(text, "an IPv6 address needs the form tcp:[ADDRESS]:PORT")
        port_text = tail[1:]
    else:
        host, colon, port_text = rest.rpartition(":")
        if not colon:
            raise URIError(text, "tcp: needs HOST:PORT")
        if ":" in host:
            raise URIError(text, "an IPv6 address needs brackets, e.g. tcp:[::1]:4444")
    if not port_text.isdigit() or int(port_text) > 65535:
        raise URIError(text, f"port {port_text!r} is not a number from 0 to 65535")
    return TcpURI(host, int(port_text))


def _parse_unix(text: str, path: str) -> UnixURI:
    if not path:
        raise URIError(text, "unix: needs a socket path")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise URIError(text, f"a UNIX socket path is at most {UNIX_PATH_MAX} bytes")
    return UnixURI(path)


def _parse_file(text: str, rest: str) -> FileURI:
    # QEMU looks for ",offset=" and leaves everything before it to the path.
    path, sep, offset_text = rest.rpartition(",offset=")
    if not sep:
        path, offset_text = rest, "0"
    if not path:
        raise URIError(text, "file: needs a path")
    return FileURI(path, _parse_size(text, offset_text))


def _parse_size(text: str, value: str) -> int:
    """A byte count as QEMU's qemu_strtosz reads it: decimal or 0x hex, optional
    binary suffix (k, M, G, T, P, E)."""
    match = re.fullmatch(r"(0x[0-9a-fA-F]+|[0-9]+)([bkmgtpeBKMGTPE]?)", value)
    if match is None:
        raise URIError(text, f"offset {value!r} is not a byte count (e.g. 4096, 0x1000, 4k)")
    size = int(match.group(1), 0) << _SIZE_SUFFIXES[match.group(2).lower()]
    if size > MAX_FILE_OFFSET:
        raise URIError(
            text, f"offset {value!r} ({size} bytes) is past the largest file offset, 2^63 - 1"
        )
    return size
