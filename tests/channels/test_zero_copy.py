"""Pages by address: `write_lent` (vmsplice and splice on unix sockets, a copy
elsewhere) and `read_iovec` (one recvmsg into a struct iovec table), with the
bytes on the wire, lending that really lends, reads cut short, and errors."""

from __future__ import annotations

import gc
import mmap
import os
import socket
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from multifd.channels import Channel, ChannelEOFError, ChannelError, ChannelTimeoutError
from multifd.channels import channel as channel_module
from multifd.channels import splice as splice_module
from multifd.channels.iovec import IOVec, buffer_address
from multifd.channels.splice import SplicePipe

PAGE = 4096


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


def _socket_pair(kind: str) -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX) if kind == "unix" else _tcp_pair()


@pytest.fixture(params=["unix", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Channel, Channel]]:
    a, b = _socket_pair(request.param)
    writer, reader = Channel(a, "channel 2", timeout=10), Channel(b, "channel 2", timeout=10)
    yield writer, reader
    writer.close()
    reader.close()


@pytest.fixture
def ram() -> Iterator[np.ndarray]:
    """A RAM block's memory: 4 MiB of random pages in an anonymous mapping
    (unmapped when the last view of it goes)."""
    pages = np.frombuffer(mmap.mmap(-1, 1024 * PAGE), dtype=np.uint8)
    pages[:] = np.random.default_rng(7).integers(0, 256, len(pages), dtype=np.uint8)
    yield pages


def _pages(ram: np.ndarray, offsets: np.ndarray) -> bytes:
    return b"".join(ram[o : o + PAGE].tobytes() for o in offsets.tolist())


def test_write_lent_puts_packets_on_the_wire(
    pair: tuple[Channel, Channel], ram: np.ndarray, background: Callable[..., Any]
) -> None:
    """Two writes of headers and pages: more ranges than one vmsplice takes
    (IOV_MAX) and more pages than the pipe holds, in a scattered order, arrive
    whole and in order."""
    writer, reader = pair
    first = np.arange(0, 1024, dtype=np.uint64)[::-1].copy() * PAGE  # 1024 pages, 9 headers
    second = np.array([1023, 5, 6, 7, 900], dtype=np.uint64) * PAGE
    iov = IOVec(1100)
    heads = [np.frombuffer(os.urandom(9 * 40), dtype=np.uint8), np.full(40, 7, dtype=np.uint8)]

    def packets(head: np.ndarray, offsets: np.ndarray) -> bytes:
        out = b""
        for i in range(0, len(offsets), 128):
            out += head[i // 128 * 40 : i // 128 * 40 + 40].tobytes()
            out += _pages(ram, offsets[i : i + 128])
        return out

    expected = packets(heads[0], first) + packets(heads[1], second)

    def send() -> None:
        for head, offsets in ((heads[0], first), (heads[1], second)):
            iov.set_packets(buffer_address(head), 40, buffer_address(ram), offsets, PAGE, 128)
            assert iov.count == len(offsets) + -(-len(offsets) // 128)
            writer.write_lent(iov, keep=head)
            assert iov.total == 0

    sender = background(send)
    got = reader.read_exact(len(expected))
    sender.result()
    assert got == expected
    assert writer.bytes_written == reader.bytes_read == len(expected)
    assert writer.can_lend is (writer._sock.family == socket.AF_UNIX)  # type: ignore[union-attr]


def test_lent_headers_are_held_until_the_peer_reads_them(ram: np.ndarray) -> None:
    """What `keep` owns (a batch's headers) stays referenced by the channel
    while the peer has not read it, and is let go once it has."""
    a, b = socket.socketpair(socket.AF_UNIX)
    with Channel(a, "channel 0") as writer, Channel(b, "channel 0") as reader:
        iov = IOVec()
        head = np.full(16, 9, dtype=np.uint8)
        gone = []
        weakref.finalize(head, gone.append, True)
        iov.set_packets(
            buffer_address(head), 16, buffer_address(ram), np.array([0], dtype=np.uint64), PAGE, 128
        )
        writer.write_lent(iov, keep=head)
        del head
        gc.collect()
        assert not gone  # the peer has read nothing: the channel holds it
        assert reader.read_exact(16 + PAGE) == b"\x09" * 16 + ram[:PAGE].tobytes()
        assert writer.wait_read(5.0)
        gc.collect()
        assert gone == [True]


def test_lent_headers_already_read_are_let_go_while_writing(ram: np.ndarray) -> None:
    """A long stream of lent writes holds only what the peer has not read yet,
    not everything since the last wait_read."""
    a, b = socket.socketpair(socket.AF_UNIX)
    with Channel(a, "channel 0") as writer, Channel(b, "channel 0") as reader:
        iov = IOVec()
        gone: list[int] = []
        for n in range(40):
            head = np.full(8, n, dtype=np.uint8)
            weakref.finalize(head, gone.append, n)
            offsets = np.array([n * PAGE], dtype=np.uint64)
            iov.set_packets(buffer_address(head), 8, buffer_address(ram), offsets, PAGE, 128)
            writer.write_lent(iov, keep=head)
            del head
            assert reader.read_exact(8 + PAGE)[:8] == bytes([n]) * 8
        gc.collect()
        assert len(gone) >= 20  # let go of along the way
        assert writer.wait_read(5.0)
        gc.collect()
        assert sorted(gone) == list(range(40))


def test_a_unix_socket_lends_pages_until_the_peer_reads_them(ram: np.ndarray) -> None:
    """The proof that nothing was copied: a write to the memory after write_lent
    reaches the peer. wait_read() tells when the memory is free again."""
    a, b = socket.socketpair(socket.AF_UNIX)
    with Channel(a, "channel 0") as writer, Channel(b, "channel 0") as reader:
        iov = IOVec()
        iov.set_pages(buffer_address(ram), np.array([3 * PAGE], dtype=np.uint64), PAGE)
        writer.write_lent(iov)
        assert not writer.wait_read(0.02)
        ram[3 * PAGE : 4 * PAGE] = 0xAB
        assert reader.read_exact(PAGE) == b"\xab" * PAGE
        assert writer.wait_read(5.0)


def test_tcp_copies_at_the_write(ram: np.ndarray) -> None:
    a, b = _tcp_pair()
    with Channel(a, "channel 0") as writer, Channel(b, "channel 0") as reader:
        before = ram[:PAGE].tobytes()
        iov = IOVec()
        iov.set_pages(buffer_address(ram), np.array([0], dtype=np.uint64), PAGE)
        writer.write_lent(iov)
        assert writer.wait_read(0)  # nothing lent
        ram[:PAGE] = 0
        assert reader.read_exact(PAGE) == before


def test_write_lent_to_a_closed_peer_names_the_channel_and_leaves_no_pipe(
    ram: np.ndarray,
) -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    fds_before = set(os.listdir("/proc/self/fd"))
    with Channel(a, "channel 4") as writer:
        b.close()
        iov = IOVec()
        iov.set_pages(buffer_address(ram), np.arange(128, dtype=np.uint64) * PAGE, PAGE)
        with pytest.raises(ChannelError) as info:
            writer.write_lent(iov)
        assert str(info.value).startswith("channel 4: write failed at stream offset 0x")
        assert "Broken pipe" in str(info.value) or "Connection reset" in str(info.value)
    assert set(os.listdir("/proc/self/fd")) <= fds_before


def test_write_lent_times_out_when_the_peer_does_not_read(ram: np.ndarray) -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with Channel(a, "channel 1", timeout=0.05) as writer, Channel(b, "channel 1"):
        iov = IOVec(1024)
        with pytest.raises(ChannelTimeoutError, match=r"channel 1: could not write for 0\.05 s"):
            for _ in range(64):  # 256 MiB: far beyond what the socket buffers hold
                iov.set_pages(buffer_address(ram), np.arange(1024, dtype=np.uint64) * PAGE, PAGE)
                writer.write_lent(iov)


def test_read_iovec_fills_pages_in_place(
    pair: tuple[Channel, Channel], ram: np.ndarray, background: Callable[..., Any]
) -> None:
    writer, reader = pair
    offsets = np.array([9, 2, 3, 4, 700], dtype=np.uint64) * PAGE
    payload = os.urandom(len(offsets) * PAGE + 16)
    sender = background(writer.write_all, payload)
    header = bytearray(16)
    iov = IOVec()
    iov.set_pages(buffer_address(ram), offsets, PAGE)
    iov.append(buffer_address(header), len(header))
    reader.read_iovec(iov)
    sender.result()
    assert _pages(ram, offsets) + bytes(header) == payload
    assert reader.bytes_read == len(payload)


def test_read_iovec_across_slow_writes_and_a_pushed_back_prefix(
    pair: tuple[Channel, Channel], ram: np.ndarray, background: Callable[..., Any]
) -> None:
    """Bytes that come a few at a time, and some already read and put back."""
    writer, reader = pair
    payload = os.urandom(3 * PAGE)
    writer.write_all(payload[:10])
    reader.unread(reader.read_exact(10))

    def trickle() -> None:
        for i in range(10, len(payload), 1000):
            writer.write_all(payload[i : i + 1000])

    sender = background(trickle)
    iov = IOVec()
    iov.set_pages(buffer_address(ram), np.array([1, 0, 2], dtype=np.uint64) * PAGE, PAGE)
    reader.read_iovec(iov)
    sender.result()
    assert _pages(ram, np.array([1, 0, 2]) * PAGE) == payload


def test_read_iovec_says_what_is_missing_when_the_peer_closes(
    pair: tuple[Channel, Channel], ram: np.ndarray
) -> None:
    writer, reader = pair
    reader.read_exact(0)
    writer.write_all(b"z" * 5000)
    writer.close()
    iov = IOVec()
    iov.set_pages(buffer_address(ram), np.array([0, 1], dtype=np.uint64) * PAGE, PAGE)
    with pytest.raises(ChannelEOFError) as info:
        reader.read_iovec(iov)
    assert (info.value.missing, info.value.wanted, info.value.offset) == (3192, 8192, 0)
    assert str(info.value).startswith("channel 2: peer closed the stream 3192 bytes short")


def test_read_iovec_timeout(pair: tuple[Channel, Channel], ram: np.ndarray) -> None:
    writer, reader = pair
    reader.timeout = 0.05
    writer.write_all(b"ab")
    iov = IOVec()
    iov.set_pages(buffer_address(ram), np.array([0], dtype=np.uint64), PAGE)
    with pytest.raises(ChannelTimeoutError, match=r"channel 2: no data for 0\.05 s"):
        reader.read_iovec(iov)


@given(
    lengths=st.lists(st.integers(1, 9000), min_size=1, max_size=40),
    dropped=st.integers(0, 40),
    cuts=st.lists(st.floats(0, 1), min_size=1, max_size=3),
)
def test_iovec_advance_keeps_exactly_the_bytes_not_yet_moved(
    lengths: list[int], dropped: int, cuts: list[float]
) -> None:
    # Whole ranges dropped first (what a lending that took them all does),
    # then cuts anywhere, one after another: what is left is the same bytes.
    iov = IOVec(64)
    address = 1 << 20
    for length in lengths:
        iov.append(address, length)
        address += length + 7
    everything = [(a + i) for a, n in iov.rows.tolist() for i in range(n)]
    dropped = min(dropped, iov.count)
    head = iov.head_bytes(dropped)
    assert head == sum(lengths[:dropped])
    iov.drop(dropped, head)
    moved = head
    for cut in cuts:
        n = int(cut * iov.total)
        iov.advance(n)
        moved += n
        rest = [(a + i) for a, n in iov.rows.tolist() for i in range(n)]
        assert rest == everything[moved:]
        assert iov.total == len(rest)
        assert iov.address == buffer_address(iov.table) + 16 * iov.start


def _packet_rows(headers: int, base: int, offsets: np.ndarray) -> list[list[int]]:
    """set_packets's table, one range at a time: a 40-byte header, then up to
    128 pages of 4096 bytes."""
    rows = []
    for i in range(0, len(offsets), 128):
        rows.append([headers + i // 128 * 40, 40])
        rows += [[base + int(o), 4096] for o in offsets[i : i + 128]]
    return rows


@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["then", "packets", "pages", "append", "advance"]),
            st.integers(1, 300),  # pages
            st.sampled_from([1 << 20, 1 << 30]),  # the block's address
            st.sampled_from([0x5000, 0x9000]),  # the extra range's, or the headers'
        ),
        min_size=1,
        max_size=12,
    )
)
def test_set_pages_then_and_set_packets_give_the_same_table_whatever_came_before(
    steps: list[tuple[str, int, int, int]],
) -> None:
    # The lengths (and the last range, or the headers' places) are rewritten
    # only when their shape changes: any other use of the table in between
    # must not leave a stale row behind.
    iov = IOVec(512)
    for kind, n, base, extra in steps:
        offsets = np.arange(n, dtype=np.uint64)[::-1] * np.uint64(4096)
        if kind == "then":
            offsets = offsets[:128]
            iov.set_pages_then(base, offsets, 4096, extra, 1344)
            expected = [[base + int(o), 4096] for o in offsets] + [[extra, 1344]]
            assert iov.rows.tolist() == expected
            assert iov.total == len(offsets) * 4096 + 1344
        elif kind == "packets":
            iov.set_packets(extra, 40, base, offsets, 4096, 128)
            expected = _packet_rows(extra, base, offsets)
            assert iov.rows.tolist() == expected
            assert iov.total == sum(length for _, length in expected)
        elif kind == "pages":
            iov.set_pages(base, offsets, 512)
        elif kind == "append":
            iov.append(extra, 100)
        elif iov.total:
            iov.advance(iov.total // 3)


def test_without_vmsplice_a_unix_socket_copies(
    ram: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A C library without vmsplice (not Linux) costs the lending, nothing else."""
    monkeypatch.setattr(channel_module, "HAVE_VMSPLICE", False)
    a, b = socket.socketpair(socket.AF_UNIX)
    with Channel(a, "channel 0") as writer, Channel(b, "channel 0") as reader:
        assert not writer.can_lend
        before = ram[PAGE : 2 * PAGE].tobytes()
        iov = IOVec()
        iov.set_pages(buffer_address(ram), np.array([PAGE], dtype=np.uint64), PAGE)
        writer.write_lent(iov)
        ram[PAGE : 2 * PAGE] = 0
        assert reader.read_exact(PAGE) == before


def test_a_pipe_that_takes_nothing_fails_the_write_rather_than_spin(
    ram: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(SplicePipe, "lend_iovec", lambda self, iov: 0)
    a, b = socket.socketpair(socket.AF_UNIX)
    with Channel(a, "channel 3") as writer, Channel(b, "channel 3") as reader:
        iov = IOVec()
        writer.write_all(b"hh")
        iov.set_pages(buffer_address(ram), np.array([0], dtype=np.uint64), PAGE)
        expected = r"channel 3: write failed at stream offset 0x2: .*took no bytes"
        with pytest.raises(ChannelError, match=expected):
            writer.write_lent(iov)
        assert reader.read_exact(2) == b"hh"  # what went in before is in order


def test_a_lend_never_asks_a_full_pipe_again(
    ram: np.ndarray, background: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """vmsplice takes what fits: the rest waits for the pipe to be drained, not
    for a second vmsplice that can only fail with EAGAIN (a system call and a
    GIL hand-off per pipe's worth of pages)."""
    calls: list[str] = []
    real = splice_module.vmsplice

    def counted(fd: int, iovecs: int, count: int, flags: int) -> int:
        try:
            n = real(fd, iovecs, count, flags)
        except BlockingIOError:
            calls.append("full")
            raise
        calls.append("lent")
        return n

    monkeypatch.setattr(splice_module, "vmsplice", counted)
    a, b = socket.socketpair(socket.AF_UNIX)
    with Channel(a, "channel 1", timeout=10) as writer, Channel(b, "channel 1") as reader:
        offsets = np.arange(1024, dtype=np.uint64) * PAGE  # 4 MiB: four pipes' worth
        iov = IOVec(1024)
        iov.set_pages(buffer_address(ram), offsets, PAGE)
        sender = background(lambda: writer.write_lent(iov))
        got = reader.read_exact(len(ram))
        sender.result()
    assert got == ram.tobytes()
    assert "full" not in calls and len(calls) >= 4, calls
