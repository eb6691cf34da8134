"""The channels layer: migration transports named by QEMU URIs, the `Channel` byte
stream with vectored I/O, TLS, and gathering a migration's channels on either side."""

from .channel import IOV_MAX, Buffer, Channel, Connections
from .connect import CONNECT_TIMEOUT, ConnectAbort, connect_channels
from .errors import ChannelEOFError, ChannelError, ChannelTimeoutError, TLSError
from .listener import HANDSHAKE_TIMEOUT, Listener
from .tls import TLSConfig, certificate_subject
from .uri import (
    ACCEPTED_FORMS,
    ExecURI,
    FdURI,
    FileURI,
    MigrationURI,
    TcpURI,
    UnixURI,
    URIError,
    check_multifd,
    parse_uri,
    socket_address_uri,
)

__all__ = [
    "ACCEPTED_FORMS",
    "CONNECT_TIMEOUT",
    "HANDSHAKE_TIMEOUT",
    "IOV_MAX",
    "Buffer",
    "Channel",
    "ChannelEOFError",
    "ChannelError",
    "ChannelTimeoutError",
    "ConnectAbort",
    "Connections",
    "ExecURI",
    "FdURI",
    "FileURI",
    "Listener",
    "MigrationURI",
    "TLSConfig",
    "TLSError",
    "TcpURI",
    "URIError",
    "UnixURI",
    "certificate_subject",
    "check_multifd",
    "connect_channels",
    "parse_uri",
    "socket_address_uri",
]
