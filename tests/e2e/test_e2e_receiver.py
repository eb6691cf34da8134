"""The destination's receive threads on their own, fed bytes through a socket
pair: a packet's pages and the next header arrive in one read, and a stream
that ends after the pages, or inside the next header, is told apart."""

from __future__ import annotations

import contextlib
import socket
import threading
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import zstandard

from multifd.channels import Channel
from multifd.memory import RAMBlock
from multifd.migration import multifd_recv
from multifd.migration.compression import make_decompressor
from multifd.migration.multifd_recv import MultifdReceiver
from multifd.migration.received import ReceivedPages
from multifd.wire import (
    PACKET_HEADER_SIZE,
    PAGES_PER_PACKET,
    Compression,
    MultiFDPacket,
    PacketLayout,
    Where,
    WireError,
)

PAGE = 4096
BLOCK_PAGES = 64


def _packet(pages: list[int], num: int, fill: int) -> bytes:
    offsets = np.array(pages, dtype=np.uint64) * PAGE
    header = MultiFDPacket.for_pages(
        "pc.ram", offsets, flags=0, packet_num=num, payload_size=len(pages) * PAGE
    ).pack()
    return header + bytes([fill]) * (len(pages) * PAGE)


@pytest.fixture
def receiver() -> Iterator[tuple[MultifdReceiver, socket.socket, np.ndarray, list[str]]]:
    with _receiving(Compression.NONE) as parts:
        yield parts


def _run_out(rx: MultifdReceiver) -> None:
    thread = rx.channels[0].thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive()


def test_pages_then_end_of_stream_is_a_clean_end(receiver) -> None:
    rx, peer, block, errors = receiver
    peer.sendall(_packet([1, 2, 5], 0, 0xAA) + _packet([7], 1, 0xBB))
    peer.shutdown(socket.SHUT_WR)
    _run_out(rx)
    assert errors == []
    channel = rx.channels[0]
    assert channel.ended and channel.stats.packets == 2 and channel.stats.pages == 4
    # Each packet counted with its own header, not the next one's.
    assert channel.stats.bytes == 2 * PACKET_HEADER_SIZE + 4 * PAGE
    rows = block.reshape(BLOCK_PAGES, PAGE)
    assert (rows[[1, 2, 5]] == 0xAA).all() and (rows[7] == 0xBB).all()
    assert not rows[[0, 3, 4, 6, 8]].any()


def test_end_inside_the_next_header_names_packet_and_bytes(receiver) -> None:
    rx, peer, _, errors = receiver
    peer.sendall(_packet([3], 0, 0x11) + _packet([4], 1, 0x22)[:100])
    peer.shutdown(socket.SHUT_WR)
    _run_out(rx)
    assert len(errors) == 1
    assert errors[0].startswith("channel 0: packet 0: ")
    assert f"{PACKET_HEADER_SIZE - 100} bytes short" in errors[0]


def test_end_inside_the_pages_is_an_error(receiver) -> None:
    rx, peer, _, errors = receiver
    peer.sendall(_packet([3, 4], 0, 0x11)[: PACKET_HEADER_SIZE + PAGE + 10])
    peer.shutdown(socket.SHUT_WR)
    _run_out(rx)
    assert len(errors) == 1 and errors[0].startswith("channel 0: packet 0: ")
    assert "bytes short" in errors[0]


def test_a_peer_that_pauses_between_packets_is_waited_for(receiver) -> None:
    """The next header is read with the pages: a source that sends it later
    (a rate limit, a round's end) must not make the pages wait."""
    rx, peer, block, errors = receiver
    first = _packet([9], 0, 0x33)
    peer.sendall(first)
    rows = block.reshape(BLOCK_PAGES, PAGE)
    arrived = threading.Event()

    def watch() -> None:
        while not (rows[9] == 0x33).all():
            pass
        arrived.set()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    # The pages are in memory before the next header exists.
    assert arrived.wait(5)
    peer.sendall(_packet([10], 1, 0x44))
    peer.shutdown(socket.SHUT_WR)
    _run_out(rx)
    assert errors == [] and (rows[10] == 0x44).all()


def _with_header_fields(packet: bytes, **fields: int) -> bytes:
    """A packet with header fields overwritten (flags at byte 8, normal_pages at 16)."""
    data = bytearray(packet)
    at = {"flags": 8, "pages_alloc": 12, "normal_pages": 16}
    for name, value in fields.items():
        data[at[name] : at[name] + 4] = value.to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            _packet([BLOCK_PAGES], 1, 0x22),
            f'offset too long: offset {BLOCK_PAGES * PAGE:#x} beyond block "pc.ram"',
        ),
        (_with_header_fields(_packet([4], 1, 0x22), flags=0x80), "flags"),
        (
            _with_header_fields(_packet([4], 1, 0x22), normal_pages=129),
            "received packet with 129 pages",
        ),
        (
            _packet([4], 1, 0x22).replace(b"pc.ram\0", b"pc.rom\0", 1),
            "unknown ram block pc.rom",
        ),
    ],
    ids=["offset", "flag", "count", "block"],
)
def test_after_a_good_packet_a_bad_one_is_refused_as_the_first_would_be(
    receiver, bad: bytes, message: str
) -> None:
    """A packet like the last good one takes a shortcut (see `_plain_pages`):
    whatever differs must still be refused, with the full path's message,
    before any page of it is written."""
    rx, peer, block, errors = receiver
    peer.sendall(_packet([3], 0, 0x11) + bad + bytes(PAGE))
    peer.shutdown(socket.SHUT_WR)
    _run_out(rx)
    assert len(errors) == 1, errors
    assert errors[0].startswith("channel 0: packet 1")
    assert message in errors[0]
    rows = block.reshape(BLOCK_PAGES, PAGE)
    assert (rows[3] == 0x11).all()
    assert not rows[4].any() and not rows[BLOCK_PAGES - 1].any()


def test_written_pages_are_marked_along_the_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """A receive thread marks the pages it wrote every WRITTEN_BATCH packets,
    not only at the sync: what it keeps meanwhile stays bounded, whatever the
    RAM size. Both paths (the shortcut and the full one) note their pages."""
    monkeypatch.setattr(multifd_recv, "WRITTEN_BATCH", 2)
    block = RAMBlock.anonymous("pc.ram", BLOCK_PAGES * PAGE)
    received = ReceivedPages({"pc.ram": block})
    ours, theirs = socket.socketpair()
    rx = MultifdReceiver(
        [Channel(ours, "channel 0", timeout=10)], compression=Compression.NONE, on_error=print
    )
    rx.set_blocks({"pc.ram": block.array}, received)
    rx.start()
    try:
        theirs.sendall(b"".join(_packet([2 * n, 2 * n + 1], n, 0x10 + n) for n in range(5)))
        theirs.shutdown(socket.SHUT_WR)
        _run_out(rx)
        marked = received.may_be_written("pc.ram", np.arange(BLOCK_PAGES))
        assert marked.tolist() == list(range(8))  # 4 packets marked, the 5th kept
        assert len(rx.channels[0].written) == 1
    finally:
        theirs.close()
        rx.close()
        block.close()


def test_zero_pages_in_9_0_packets_clear_only_what_may_hold_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """QEMU 9.0+ sends zero pages inside packets. On an untouched block, one
    this migration wrote before is cleared; one it never wrote is left as it
    is, not even read (here a byte put there behind the receiver's back shows
    that nothing wrote the page)."""
    monkeypatch.setattr(multifd_recv, "WRITTEN_BATCH", 1)  # marked at once
    block = RAMBlock.anonymous("pc.ram", BLOCK_PAGES * PAGE)
    received = ReceivedPages({"pc.ram": block})
    array = block.array
    array[5 * PAGE] = 0xEE
    ours, theirs = socket.socketpair()
    errors: list[str] = []
    rx = MultifdReceiver(
        [Channel(ours, "channel 0", timeout=10)],
        compression=Compression.NONE,
        layout=PacketLayout.V9_0,
        on_error=errors.append,
    )
    rx.set_blocks({"pc.ram": array}, received)
    rx.start()

    def packet(normal: list[int], zero: list[int], num: int) -> bytes:
        header = MultiFDPacket.for_pages(
            "pc.ram",
            np.array(normal, dtype=np.uint64) * PAGE,
            zero_offsets=np.array(zero, dtype=np.uint64) * PAGE,
            flags=0,
            packet_num=num,
            payload_size=len(normal) * PAGE,
            layout=PacketLayout.V9_0,
        ).pack()
        return header + b"\x77" * (len(normal) * PAGE)

    try:
        theirs.sendall(packet([3], [], 0) + packet([7], [3, 5], 1))
        theirs.shutdown(socket.SHUT_WR)
        _run_out(rx)
        rows = array.reshape(BLOCK_PAGES, PAGE)
        assert errors == []
        assert not rows[3].any()  # written by packet 0, zero in packet 1: cleared
        assert rows[5, 0] == 0xEE  # never written by this migration: left alone
        assert (rows[7] == 0x77).all()
    finally:
        theirs.close()
        rx.close()
        block.close()


@contextlib.contextmanager
def _receiving(
    compression: Compression,
) -> Iterator[tuple[MultifdReceiver, socket.socket, np.ndarray, list[str]]]:
    ours, theirs = socket.socketpair()
    block = np.zeros(BLOCK_PAGES * PAGE, dtype=np.uint8)
    errors: list[str] = []
    rx = MultifdReceiver(
        [Channel(ours, "channel 0", timeout=10)], compression=compression, on_error=errors.append
    )
    rx.set_blocks({"pc.ram": block}, ReceivedPages({}))
    rx.start()
    try:
        yield rx, theirs, block, errors
    finally:
        theirs.close()
        rx.close()


def _zlib_packet(pages: list[int], num: int, payload: bytes) -> bytes:
    offsets = np.array(pages, dtype=np.uint64) * PAGE
    header = MultiFDPacket.for_pages(
        "pc.ram", offsets, flags=0x02, packet_num=num, payload_size=len(payload)
    ).pack()
    return header + payload


@pytest.mark.parametrize("packets", [1, 2])
def test_a_zlib_stream_finished_inside_a_packet_is_refused_at_that_packet(packets: int) -> None:
    """A channel's zlib stream lasts the whole migration (each packet ends in
    Z_SYNC_FLUSH); QEMU's inflate refuses one that ends (Z_STREAM_END). Refused
    at the packet that ended it, even when it is the channel's last one, with
    the byte where its payload begins."""
    page = bytes([0x42]) * PAGE
    stream = _zlib_packet([1], 0, zlib.compress(page))
    if packets == 2:
        follow = zlib.compressobj(1)
        stream += _zlib_packet([2], 1, follow.compress(page) + follow.flush(zlib.Z_SYNC_FLUSH))
    with _receiving(Compression.ZLIB) as (rx, peer, _, errors):
        peer.sendall(stream)
        peer.shutdown(socket.SHUT_WR)
        _run_out(rx)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"channel 0: packet 0: byte {PACKET_HEADER_SIZE:#x}: ")
    assert "Z_FINISH" in errors[0]


@pytest.mark.parametrize(("level", "refused"), [(20, False), (21, True), (22, True)])
def test_a_zstd_window_beyond_any_multifd_level_is_refused(level: int, refused: bool) -> None:
    """zstd levels above multifd-zstd-level's 20 ask for windows of 64 and 128
    MiB, which a hostile source could ask of every channel; level 20's 32 MiB
    is the most a source may ask."""
    pages = bytes(range(256)) * 16 * PAGES_PER_PACKET
    stream = zstandard.ZstdCompressor(level=level).compressobj()
    payload = stream.compress(pages) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
    decompressor = make_decompressor(Compression.ZSTD)
    assert decompressor is not None
    where = Where(channel=1, packet=3, offset=0x540)
    if not refused:
        assert decompressor.decompress(payload, len(pages), where) == pages
        return
    with pytest.raises(
        WireError,
        match="channel 1: packet 3: byte 0x540: zstd payload: its "
        "frame needs a window above 32 MiB",
    ):
        decompressor.decompress(payload, len(pages), where)
