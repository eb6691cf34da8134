"""Round trips over every transport (tcp: v4 and v6, unix:, fd:, exec:, file:) through
`connect_channels` and `Listener`, and the refusals made before anything starts."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
import uuid as uuid_module
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from multifd.channels import (
    ChannelEOFError,
    ChannelError,
    Connections,
    Listener,
    TcpURI,
    UnixURI,
    URIError,
    connect_channels,
)
from multifd.channels.channel import EXEC_KILL_GRACE
from multifd.channels.transport import open_stream
from multifd.channels.uri import ExecURI
from multifd.wire import FileHeader

HEADER = FileHeader().pack() + b"\x07\x00\x00\x00\x03pc"  # header + a configuration start
UUID = uuid_module.uuid4().bytes
PAGE = 4096


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def exchange(source: Connections, destination: Connections) -> None:
    """The header on main, then a page and a marker on every multifd channel."""
    assert destination.main.read_exact(len(HEADER)) == HEADER
    for i, channel in enumerate(source.multifd):
        channel.writev_all([b"packet %d " % i, bytes([i]) * PAGE])
    for i, channel in enumerate(destination.multifd):
        assert channel.name == f"channel {i}"
        assert channel.bytes_read == 64  # the init packet, read by the listener
        label = b"packet %d " % i
        assert channel.read_exact(len(label)) == label
        page = bytearray(PAGE)
        channel.readv_into([page])
        assert page == bytes([i]) * PAGE
    source.main.write_all(b"EOF")
    assert destination.main.read_exact(3) == b"EOF"
    assert destination.main.bytes_read == len(HEADER) + 3
    assert source.main.bytes_written == len(HEADER) + 3


@pytest.mark.parametrize("channels", [0, 1, 4])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_round_trip(listen: Callable[..., Listener], host: str, channels: int) -> None:
    if host == "::1" and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    listener = listen(
        f"tcp:[{host}]:0" if ":" in host else f"tcp:{host}:0", channels=channels, uuid=UUID
    )
    assert isinstance(listener.uri, TcpURI) and listener.uri.port != 0
    assert str(listener.uri).startswith("tcp:[::1]:" if ":" in host else "tcp:127.0.0.1:")
    source = connect_channels(listener.uri, header=HEADER, channels=channels, uuid=UUID)
    with source, listener.wait(10) as destination:
        assert len(destination.multifd) == channels
        exchange(source, destination)
    assert listener.refusals == []


@pytest.mark.parametrize("channels", [0, 3])
def test_unix_round_trip(listen: Callable[..., Listener], unix_path: str, channels: int) -> None:
    listener = listen(f"unix:{unix_path}", channels=channels, uuid=UUID)
    assert listener.uri == UnixURI(unix_path)
    source = connect_channels(f"unix:{unix_path}", header=HEADER, channels=channels, uuid=UUID)
    with source, listener.wait(10) as destination:
        exchange(source, destination)
    listener.close()
    assert not os.path.exists(unix_path)


def test_unix_listener_replaces_a_stale_socket_but_not_a_file(
    listen: Callable[..., Listener], tmp_path: Path
) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as old:  # as a killed process leaves it
        old.bind(str(stale))
        old.listen()
    listen(f"unix:{stale}").close()
    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")
    with pytest.raises(ChannelError, match="exists and is not a socket"):
        Listener(f"unix:{regular}")
    assert regular.read_text() == "keep me"


def test_unix_listener_leaves_a_live_socket_alone(
    listen: Callable[..., Listener], unix_path: str
) -> None:
    """A second listener on the path of one that runs is refused: it must not
    unlink the first one's socket and take its address."""
    first = listen(f"unix:{unix_path}")
    identity = os.stat(unix_path).st_ino
    with pytest.raises(
        ChannelError,
        match=rf"cannot listen on unix:{unix_path}: \[Errno 98\] address in use: "
        rf"another process listens on {unix_path}$",
    ):
        Listener(f"unix:{unix_path}")
    assert os.stat(unix_path).st_ino == identity
    source = connect_channels(f"unix:{unix_path}", header=HEADER)
    with source, first.wait(10) as destination:
        exchange(source, destination)


def test_fd_socket_round_trip() -> None:
    a, b = socket.socketpair()
    source = connect_channels(f"fd:{a.detach()}", header=HEADER)
    with Listener(f"fd:{b.detach()}") as listener:
        assert listener.has_all_channels()
        with source, listener.wait(0) as destination:
            exchange(source, destination)


def test_fd_pipe_round_trip() -> None:
    read_end, write_end = os.pipe()
    source = connect_channels(f"fd:{write_end}", header=HEADER)
    with Listener(f"fd:{read_end}") as listener, source, listener.wait(0) as destination:
        exchange(source, destination)


def test_fd_that_is_not_open_is_refused() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(ChannelError, match=f"fd:{read_end} is not an open file descriptor"):
        connect_channels(f"fd:{read_end}", header=HEADER)


def test_exec_round_trip(tmp_path: Path) -> None:
    """The source writes into the command's stdin, the destination reads its stdout."""
    saved = tmp_path / "vm.gz"
    payload = bytes(range(256)) * 1024
    with connect_channels(f"exec:gzip -c > {saved}", header=HEADER) as source:
        source.main.writev_all([payload, payload])
    assert source.main.exit_status == 0
    with Listener(f"exec:gunzip -c < {saved}") as listener, listener.wait(0) as destination:
        assert destination.main.read_exact(len(HEADER)) == HEADER
        assert destination.main.read_to_eof(1 << 20) == payload * 2
    assert destination.main.exit_status == 0


def test_exec_command_status_is_kept(tmp_path: Path) -> None:
    with connect_channels("exec:cat > /dev/null; exit 3", header=HEADER) as source:
        pass
    assert source.main.exit_status == 3


def test_exec_shutdown_stops_the_command_and_wakes_the_reader(
    background: Callable[..., Any],
) -> None:
    listener = Listener("exec:echo QEVM; exec sleep 60")
    with listener, listener.wait(0) as destination:
        assert destination.main.read_exact(5) == b"QEVM\n"
        blocked = background(destination.main.read_exact, 1)
        destination.main.shutdown()
        with pytest.raises((ChannelError, EOFError)):
            blocked.result()
    assert destination.main.exit_status is not None and destination.main.exit_status < 0


def test_exec_command_that_cannot_read_gives_a_write_error() -> None:
    with (
        pytest.raises(ChannelError) as info,
        connect_channels("exec:exit 7", header=HEADER) as source,
    ):
        for _ in range(1000):  # the pipe fills up or the command is gone: EPIPE
            source.main.write_all(bytes(1 << 16))
    assert str(info.value).startswith("main channel: write failed")
    assert "Broken pipe" in str(info.value)


def test_exec_destination_names_the_exit_status_of_a_command_that_failed() -> None:
    channel = open_stream(ExecURI("exit 3"), "main channel", outgoing=False)
    with channel, pytest.raises(ChannelEOFError) as info:
        channel.read_exact(4)
    assert str(info.value) == (
        "main channel: peer closed the stream 4 bytes short: got 0 of 4 bytes read at "
        "stream offset 0x0 (exec: command exited with status 3)"
    )


def test_exec_command_that_ignores_sigterm_is_killed_soon_after_shutdown(
    tmp_path: Path, background: Callable[..., Any]
) -> None:
    """A writer blocked on a command that neither reads nor stops on SIGTERM wakes
    at shutdown(), and close() kills the command after EXEC_KILL_GRACE."""
    ready = tmp_path / "pid"
    channel = open_stream(
        ExecURI(f"trap '' TERM; echo $$ > {ready}.new; mv {ready}.new {ready}; exec sleep 60"),
        "main channel",
        outgoing=True,
        timeout=None,
    )
    try:
        blocked = background(channel.write_all, bytes(64 << 20))
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        channel.shutdown()
        with pytest.raises(ChannelError, match="main channel: write failed at stream offset"):
            blocked.result(5)
        start = time.monotonic()
        channel.close()
        assert time.monotonic() - start < EXEC_KILL_GRACE + 2
        assert channel.exit_status == -signal.SIGKILL
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.killpg(int(ready.read_text()), signal.SIGKILL)  # a failed test leaves none
        channel.close()


def test_file_round_trip_at_offset(tmp_path: Path) -> None:
    path = tmp_path / "vm.bin"
    path.write_bytes(b"old contents that QEMU would truncate")
    with connect_channels(f"file:{path},offset=4k", header=HEADER) as source:
        source.main.writev_all([b"page:", bytes([9]) * PAGE])
    data = path.read_bytes()
    assert data[:4096] == bytes(4096)  # O_TRUNC, then seek: as QEMU does
    assert data[4096:] == HEADER + b"page:" + bytes([9]) * PAGE
    with Listener(f"file:{path},offset=0x1000") as listener, listener.wait(0) as destination:
        assert destination.main.read_exact(len(HEADER)) == HEADER
        assert destination.main.read_to_eof(1 << 20) == b"page:" + bytes([9]) * PAGE


def test_file_missing_on_the_destination(tmp_path: Path) -> None:
    with pytest.raises(ChannelError, match=r"main channel: cannot open .*No such file"):
        Listener(f"file:{tmp_path / 'absent'}")


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_file_offset_the_file_cannot_take_leaves_it_as_it_was(tmp_path: Path) -> None:
    """A seek refused (past the file system's largest file) fails naming the file
    and the offset, closes the file, and truncates nothing."""
    path = tmp_path / "vm.bin"
    path.write_bytes(b"keep")
    before = _open_fds()
    for listen in (False, True):
        with pytest.raises(ChannelError) as info:
            if listen:
                Listener(f"file:{path},offset=0x7fffffffffffffff")
            else:
                connect_channels(f"file:{path},offset=0x7fffffffffffffff", header=HEADER)
        assert str(info.value) == (
            f"main channel: cannot use {path} from offset 0x7fffffffffffffff: "
            "[Errno 22] Invalid argument"
        )
    assert _open_fds() == before
    assert path.read_bytes() == b"keep"


def test_file_that_cannot_seek(tmp_path: Path) -> None:
    """A FIFO takes a migration at offset 0, as QEMU seeks only to a nonzero
    offset; a nonzero one fails naming the file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Our own reader, open throughout: a writer's open of a FIFO waits for a
    # reader, and a reader like cat would leave when the first writer closes.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        before = _open_fds()
        with pytest.raises(ChannelError) as info:
            connect_channels(f"file:{fifo},offset=4k", header=HEADER)
        assert str(info.value) == (
            f"main channel: cannot use {fifo} from offset 0x1000: [Errno 29] Illegal seek"
        )
        assert _open_fds() == before
        with connect_channels(f"file:{fifo}", header=HEADER) as source:
            source.main.write_all(b"page")
        assert os.read(reader, 1 << 16) == HEADER + b"page"
    finally:
        os.close(reader)


@pytest.mark.parametrize("uri", ["exec:cat", "fd:0", "file:/tmp/x"])
def test_multifd_refused_before_anything_starts(uri: str) -> None:
    with pytest.raises(URIError, match="multifd is not supported by current protocol"):
        connect_channels(uri, header=HEADER, channels=2)
    with pytest.raises(URIError, match="multifd is not supported by current protocol"):
        Listener(uri, channels=2)


@pytest.mark.parametrize("uri", ["tcp:127.0.0.1", "unix:", "ftp:host", "fd:name"])
def test_malformed_uri_refused_before_anything_starts(uri: str) -> None:
    with pytest.raises(URIError, match="accepted forms"):
        connect_channels(uri, header=HEADER, channels=2)
    with pytest.raises(URIError, match="accepted forms"):
        Listener(uri, channels=2)


def test_connect_needs_a_port(listen: Callable[..., Listener]) -> None:
    with pytest.raises(URIError, match="a host and a port other than 0"):
        connect_channels("tcp:127.0.0.1:0", header=HEADER)


def test_address_in_use(listen: Callable[..., Listener]) -> None:
    listener = listen("tcp:127.0.0.1:0")
    with pytest.raises(ChannelError) as info:
        Listener(listener.uri)
    assert str(info.value).startswith(f"listener: cannot listen on {listener.uri}")
    assert "Address already in use" in str(info.value)


def test_closed_listener_frees_the_port_with_connections_still_open(
    listen: Callable[..., Listener],
) -> None:
    listener = listen("tcp:127.0.0.1:0", channels=2, uuid=UUID)
    source = connect_channels(listener.uri, header=HEADER, channels=2, uuid=UUID)
    with source, listener.wait(10) as destination:
        listener.close()
        # The handed-over connections live on, and the port is free for a new listener.
        Listener(listener.uri).close()
        exchange(source, destination)


def test_closing_an_exec_listener_before_wait_stops_the_command() -> None:
    """The cancel path does not wait for a command that would run for a minute."""
    listener = Listener("exec:exec sleep 60")
    listener.close()
    with pytest.raises(ChannelError, match=r"closed on .* before the channels were handed over"):
        listener.wait(0)
