"""`Channel` on its own: exact and vectored reads, vectored writes over partial I/O,
counters, the pushed-back prefix, end of stream, timeouts, shutdown and close."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from multifd.channels import (
    IOV_MAX,
    Channel,
    ChannelEOFError,
    ChannelError,
    ChannelTimeoutError,
)
from multifd.channels.iovec import IOVec, buffer_address
from multifd.wire import ByteSource, Reader, WireError

PAGE = 4096


@pytest.fixture(params=["socket", "pipe"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Channel, Channel]]:
    """A writer and a reader channel joined by a socket pair or a pipe."""
    if request.param == "socket":
        a, b = socket.socketpair()
        writer, reader = Channel(a, "channel 1"), Channel(b, "channel 1")
    else:
        r, w = os.pipe()
        writer, reader = Channel(w, "channel 1"), Channel(r, "channel 1")
    yield writer, reader
    writer.close()
    reader.close()


def test_channel_is_a_byte_source(pair: tuple[Channel, Channel]) -> None:
    assert isinstance(pair[1], ByteSource)


def test_read_exact_and_counters(pair: tuple[Channel, Channel]) -> None:
    writer, reader = pair
    assert writer.write_all(b"QEVM\x00\x00\x00\x03") == 8
    assert reader.read_exact(4) == b"QEVM"
    assert reader.read_exact(0) == b""
    assert reader.read_exact(4) == b"\x00\x00\x00\x03"
    assert (writer.bytes_written, reader.bytes_read) == (8, 8)


def test_vectored_round_trip_with_partial_writes(
    pair: tuple[Channel, Channel], background: Callable[..., Any]
) -> None:
    """8 MiB in 2048 page views plus headers: far more than a socket or pipe buffer
    holds and more views than IOV_MAX, so writes are partial and split."""
    writer, reader = pair
    rng = np.random.default_rng(1)
    source = rng.integers(0, 256, size=2048 * PAGE, dtype=np.uint8)
    header = b"H" * 1344
    pages = [memoryview(source)[i * PAGE : (i + 1) * PAGE] for i in range(2048)]
    assert len(pages) > IOV_MAX

    sender = background(writer.writev_all, [header, *pages, b"", header])
    got_header = bytearray(1344)
    dest = np.zeros_like(source)
    dest_pages = [memoryview(dest)[i * PAGE : (i + 1) * PAGE] for i in range(2048)]
    n = reader.readv_into([got_header, *dest_pages])
    assert reader.read_exact(1344) == header
    assert sender.result() == 2 * 1344 + 2048 * PAGE
    assert n == 1344 + 2048 * PAGE
    assert bytes(got_header) == header
    assert np.array_equal(source, dest)
    assert writer.bytes_written == reader.bytes_read == 2 * 1344 + 2048 * PAGE


def test_writev_accepts_any_buffer(pair: tuple[Channel, Channel]) -> None:
    writer, reader = pair
    words = np.arange(4, dtype=">u8")  # itemsize 8: counted in bytes all the same
    assert writer.writev_all([words, bytearray(b"xy"), memoryview(b"z")]) == 35
    assert reader.read_exact(35) == words.tobytes() + b"xyz"


def test_unread_prefix_is_read_first(pair: tuple[Channel, Channel]) -> None:
    writer, reader = pair
    writer.write_all(b"QEVM rest")
    magic = reader.read_exact(4)
    reader.unread(magic)
    assert reader.bytes_read == 0
    first, second = bytearray(2), bytearray(7)
    assert reader.readv_into([first, second]) == 9
    assert bytes(first + second) == b"QEVM rest"
    assert reader.bytes_read == 9


def test_read_some_into_returns_what_is_there(pair: tuple[Channel, Channel]) -> None:
    writer, reader = pair
    writer.write_all(b"QEVM tail")
    reader.unread(reader.read_exact(4))
    buf = bytearray(100)
    assert reader.read_some_into(buf) == 4  # the pushed-back bytes first
    assert reader.read_some_into(memoryview(buf)[4:]) == 5
    assert bytes(buf[:9]) == b"QEVM tail"
    writer.close()
    assert reader.read_some_into(buf) == 0
    assert reader.bytes_read == 9


def test_peer_closing_mid_read_says_what_is_missing_and_where(
    pair: tuple[Channel, Channel],
) -> None:
    writer, reader = pair
    writer.write_all(b"x" * 100)
    writer.close()
    reader.read_exact(64)
    with pytest.raises(ChannelEOFError) as info:
        reader.read_exact(1344)
    error = info.value
    assert isinstance(error, EOFError)
    assert str(error) == (
        "channel 1: peer closed the stream 1308 bytes short: got 36 of 1344 bytes "
        "read at stream offset 0x40"
    )
    assert (error.missing, error.wanted, error.offset) == (1308, 1344, 64)


def test_peer_closing_mid_readv(pair: tuple[Channel, Channel]) -> None:
    writer, reader = pair
    writer.write_all(b"y" * 5000)
    writer.close()
    with pytest.raises(ChannelEOFError, match="3192 bytes short: got 5000 of 8192"):
        reader.readv_into([bytearray(PAGE), bytearray(PAGE)])


def test_wire_reader_names_the_field_being_read(pair: tuple[Channel, Channel]) -> None:
    writer, reader = pair
    writer.write_all(b"\x11\x22\x33\x44" + bytes(20))
    writer.close()
    with pytest.raises(WireError) as info:
        Reader(reader).take(64, "multifd init packet")
    assert "truncated multifd init packet: needs 64 bytes" in str(info.value)
    assert "40 bytes short: got 24 of 64" in str(info.value)


def test_read_to_eof_and_its_limit(pair: tuple[Channel, Channel]) -> None:
    writer, reader = pair
    writer.write_all(b"{vmdesc}" * 4000)  # less than a pipe holds
    writer.close()
    reader.unread(b"")
    assert reader.read_exact(8) == b"{vmdesc}"
    assert reader.read_to_eof(1 << 20) == b"{vmdesc}" * 3999
    assert reader.bytes_read == 32000


def test_read_to_eof_refuses_past_limit(pair: tuple[Channel, Channel]) -> None:
    writer, reader = pair
    writer.write_all(b"z" * 1000)
    writer.close()
    with pytest.raises(ValueError, match="channel 1: more than 999 bytes"):
        reader.read_to_eof(999)


def test_read_timeout(pair: tuple[Channel, Channel]) -> None:
    writer, reader = pair
    reader.timeout = 0.05
    writer.write_all(b"ab")
    with pytest.raises(ChannelTimeoutError) as info:
        reader.read_exact(4)
    assert isinstance(info.value, TimeoutError)
    assert "channel 1: no data for 0.05 s while reading 4 bytes at stream offset 0x0" in str(
        info.value
    )


def test_write_timeout_when_the_peer_does_not_read(pair: tuple[Channel, Channel]) -> None:
    writer, _ = pair
    writer.timeout = 0.05
    with pytest.raises(ChannelTimeoutError, match=r"channel 1: could not write for 0\.05 s"):
        writer.write_all(bytes(64 << 20))


@pytest.mark.parametrize("lent", [False, True])
def test_a_stalled_peer_fails_a_write_after_one_timeout_not_two(lent: bool) -> None:
    """The kernel's send timeout ends a sendmsg (or splice) that copied part
    of its bytes with that part: looping on it waited a second timeout (or
    more) before the error that says "could not write for T s". A call that
    waited the whole timeout while the peer took nothing is the timeout.
    (Over TCP the peer's kernel acknowledges what fits its receive buffer
    after the call began: that counts as progress, so up to two timeouts.)"""
    timeout = 0.4
    a, b = socket.socketpair(socket.AF_UNIX)
    ram = np.zeros(64 << 20, dtype=np.uint8)
    with Channel(a, "channel 2", timeout=timeout) as writer, Channel(b, "channel 2"):
        started = time.monotonic()
        with pytest.raises(ChannelTimeoutError, match=r"channel 2: could not write for 0\.4 s"):
            if lent:
                iov = IOVec(len(ram) // PAGE)
                offsets = np.arange(0, len(ram), PAGE, dtype=np.uint64)
                iov.set_pages(buffer_address(ram), offsets, PAGE)
                writer.write_lent(iov)
            else:
                writer.write_all(ram)
        elapsed = time.monotonic() - started
        assert timeout <= elapsed < 1.5 * timeout, elapsed
        # What went out before the stall is counted: the error's offset is right.
        assert writer.bytes_written > 0


def test_write_to_a_closed_peer_names_the_channel_and_the_os_error(
    pair: tuple[Channel, Channel],
) -> None:
    writer, reader = pair
    reader.close()
    with pytest.raises(ChannelError) as info:
        writer.write_all(bytes(1 << 20))
    assert isinstance(info.value, OSError)
    assert str(info.value).startswith("channel 1: write failed at stream offset 0x")
    assert "Broken pipe" in str(info.value) or "Connection reset" in str(info.value)


def test_shutdown_wakes_a_blocked_reader(background: Callable[..., Any]) -> None:
    a, b = socket.socketpair()
    with Channel(a, "channel 0") as writer, Channel(b, "channel 0") as reader:
        blocked = background(reader.read_exact, 10)
        writer.write_all(b"12345")  # the reader is now certainly inside recv or about to be
        reader.shutdown()
        with pytest.raises(ChannelError, match="channel 0: shut down while reading"):
            blocked.result()


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_shutdown_wakes_a_reader_blocked_on_a_pipe(
    background: Callable[..., Any], timeout: float | None
) -> None:
    """As on a socket, with or without a timeout: a pipe has no shutdown(2)."""
    r, w = os.pipe()
    with Channel(w, "channel 0") as writer, Channel(r, "channel 0", timeout=timeout) as reader:
        blocked = background(reader.read_exact, 10)
        reader.shutdown()
        try:
            with pytest.raises(ChannelError) as info:
                blocked.result(5)
        finally:
            writer.close()  # ends a read that shutdown() did not
        assert str(info.value) == (
            "channel 0: shut down while reading (0 of 10 bytes read at stream offset 0x0)"
        )


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_shutdown_wakes_a_writer_blocked_on_a_pipe(
    background: Callable[..., Any], timeout: float | None
) -> None:
    r, w = os.pipe()
    with Channel(r, "channel 0") as reader, Channel(w, "channel 0", timeout=timeout) as writer:
        blocked = background(writer.write_all, bytes(64 << 20))
        writer.shutdown()
        try:
            with pytest.raises(ChannelError) as info:
                blocked.result(5)
        finally:
            reader.close()  # ends a write that shutdown() did not
        assert str(info.value).startswith("channel 0: write failed at stream offset 0x")
        assert str(info.value).endswith(
            "[Errno 125] Operation canceled (the channel was shut down)"
        )


def test_close_is_idempotent_and_shutdown_after_close_is_harmless() -> None:
    a, b = socket.socketpair()
    channel = Channel(a, "main channel")
    channel.close()
    channel.close()
    channel.shutdown()
    assert channel.closed
    b.close()


def test_fd_channel_of_a_socket_uses_the_socket_path() -> None:
    a, b = socket.socketpair()
    writer = Channel(a.detach(), "main channel")
    try:
        assert "socket" in repr(writer)
        writer.write_all(b"ok")
        assert b.recv(2) == b"ok"
    finally:
        writer.close()
        b.close()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_close_with_unread_bytes_still_delivers_the_whole_stream(
    family: str, background: Callable[..., Any]
) -> None:
    """A peer that sent bytes nobody reads (a TLS 1.3 server's session tickets,
    on a channel with no return path) still gets everything written before
    close, then a clean end of stream, not a reset."""
    if family == "tcp":
        with socket.create_server(("127.0.0.1", 0)) as server:
            ours = socket.create_connection(server.getsockname())
            peer, _ = server.accept()
    else:
        ours, peer = socket.socketpair()
    stream = os.urandom(8 << 20)
    channel = Channel(ours, "channel 1")
    with peer:
        peer.sendall(b"T" * 1694)
        # Wait until the unread bytes are in our receive queue.
        assert socket.socket.recv(ours, 1, socket.MSG_PEEK) == b"T"

        def write_then_close() -> None:
            channel.write_all(stream)
            channel.shutdown()
            channel.close()

        done = background(write_then_close)
        received = bytearray()
        while chunk := peer.recv(1 << 20):
            received += chunk
        done.result()
    assert len(received) == len(stream)
    assert received == stream
