"""Migration URIs: every accepted form, every refusal, and multifd's transport rule."""

from __future__ import annotations

import pytest

from multifd.channels import (
    ACCEPTED_FORMS,
    ExecURI,
    FdURI,
    FileURI,
    TcpURI,
    UnixURI,
    URIError,
    check_multifd,
    parse_uri,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:127.0.0.1:4444", TcpURI("127.0.0.1", 4444)),
        ("tcp:localhost:0", TcpURI("localhost", 0)),
        ("tcp:[::1]:4444", TcpURI("::1", 4444)),
        ("tcp::4444", TcpURI("", 4444)),
        ("unix:/run/migrate.sock", UnixURI("/run/migrate.sock")),
        ("fd:7", FdURI(7)),
        ("exec:gzip -c > /tmp/vm.gz", ExecURI("gzip -c > /tmp/vm.gz")),
        ("file:/tmp/vm.bin", FileURI("/tmp/vm.bin", 0)),
        ("file:/tmp/vm.bin,offset=4096", FileURI("/tmp/vm.bin", 4096)),
        ("file:/tmp/vm.bin,offset=0x1000", FileURI("/tmp/vm.bin", 0x1000)),
        ("file:/tmp/vm.bin,offset=4k", FileURI("/tmp/vm.bin", 4096)),
        ("file:/tmp/a,b.bin,offset=2M", FileURI("/tmp/a,b.bin", 2 << 20)),
        ("file:/x,offset=0x7fffffffffffffff", FileURI("/x", (1 << 63) - 1)),
    ],
)
def test_accepted_forms(text: str, expected: object) -> None:
    assert parse_uri(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "tcp:127.0.0.1:4444",
        "tcp:[::1]:0",
        "unix:/tmp/s",
        "fd:3",
        "exec:cat",
        "file:/x",
        "file:/x,offset=8192",
    ],
)
def test_str_gives_back_the_uri(text: str) -> None:
    assert str(parse_uri(text)) == text


def test_parsed_uri_passes_through() -> None:
    uri = TcpURI("127.0.0.1", 1)
    assert parse_uri(uri) is uri


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("/tmp/vm.bin", "no protocol"),
        ("127.0.0.1:4444", "unknown migration protocol: 127.0.0.1"),
        ("http://x", "unknown migration protocol: http"),
        ("rdma:1.2.3.4:5", "rdma: protocol is not supported"),
        ("tcp:127.0.0.1", "needs HOST:PORT"),
        ("tcp:127.0.0.1:http", "is not a number"),
        ("tcp:127.0.0.1:65536", "is not a number from 0 to 65535"),
        ("tcp:::1:4444", "needs brackets"),
        ("tcp:[::1:4444", "tcp:[ADDRESS]:PORT"),
        ("tcp:127.0.0.1:4444,ipv4", "options"),
        ("unix:", "needs a socket path"),
        ("unix:/" + "x" * 200, "at most 107 bytes"),
        ("fd:", "needs a file descriptor number"),
        ("fd:migfd", "needs a file descriptor number"),
        ("exec:", "needs a command"),
        ("file:", "needs a path"),
        ("file:/x,offset=-1", "is not a byte count"),
        ("file:,offset=4", "needs a path"),
        # 9 << 60 and 2^63 do not fit off_t: lseek would raise OverflowError.
        ("file:/x,offset=9e", "past the largest file offset"),
        ("file:/x,offset=0x8000000000000000", "past the largest file offset"),
    ],
)
def test_malformed_uri_shows_accepted_forms(text: str, problem: str) -> None:
    with pytest.raises(URIError) as info:
        parse_uri(text)
    message = str(info.value)
    assert problem in message
    assert repr(text) in message
    assert ACCEPTED_FORMS in message
    assert isinstance(info.value, ValueError)


def test_multifd_allowed_on_sockets() -> None:
    check_multifd(parse_uri("tcp:127.0.0.1:4444"))
    check_multifd(parse_uri("unix:/tmp/s"))


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("exec:cat", "exec: has one pipe"),
        ("fd:5", "fd: is one already open stream"),
        ("file:/x", "file: holds one stream"),
    ],
)
def test_multifd_refused_with_qemu_wording(text: str, why: str) -> None:
    with pytest.raises(URIError) as info:
        check_multifd(parse_uri(text))
    message = str(info.value)
    assert "multifd is not supported by current protocol" in message
    assert why in message
    assert "use tcp: or unix:" in message
