"""The source's send threads on their own, writing into a pipe or a unix
socket: what a channel counts for a batch it wrote whole, and the packet a
batch cut short by the peer is said to have broken in."""

from __future__ import annotations

import os
import socket
import threading
import time

import numpy as np

from multifd.channels import Channel
from multifd.migration.multifd_send import MultifdSender
from multifd.wire import PACKET_HEADER_SIZE, PAGES_PER_PACKET, Compression, MultiFDPacket

PAGE = 4096
PACKET = PACKET_HEADER_SIZE + PAGES_PER_PACKET * PAGE


def _ram(pages: int) -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, pages * PAGE, dtype=np.uint8)


def _sender(stream: socket.socket | int, errors: list[str]) -> MultifdSender:
    """One channel's sender, started, uncompressed; errors reported to `errors`."""
    sender = MultifdSender(
        [Channel(stream, "channel 0", timeout=10)],
        compression=Compression.NONE,
        level=1,
        on_error=errors.append,
    )
    sender.start()
    return sender


def test_a_whole_batch_counts_every_packet_and_page() -> None:
    ours, theirs = socket.socketpair()
    ram = _ram(1000)
    errors: list[str] = []
    pages = np.arange(3, 1000, 3, dtype=np.int64)  # 333 pages: packets of 128, 128, 77
    received = bytearray()

    def read() -> None:
        with theirs:
            while data := theirs.recv(1 << 20):
                received.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    sender = _sender(ours, errors)
    try:
        sender.send("pc.ram", memoryview(ram), pages)
        sender.sync()
    finally:
        sender.close()
    reader.join()
    (stats,) = sender.stats
    assert errors == []
    assert stats.packets == 4 and stats.sync_packets == 1 and stats.pages == 333
    assert stats.bytes == len(received) == 4 * PACKET_HEADER_SIZE + 333 * PAGE
    last = MultiFDPacket.unpack(bytes(received[2 * PACKET : 2 * PACKET + PACKET_HEADER_SIZE]))
    assert last.normal_pages == 77 and last.packet_num == 2


def test_a_batch_cut_short_names_the_packet_it_broke_in() -> None:
    # A pipe holds 64 KiB: once the reader has taken two packets and 100 KiB
    # and gone, the writer has put out less than three packets whole.
    read_end, write_end = os.pipe()
    ram = _ram(1024)
    errors: list[str] = []
    taken = 2 * PACKET + (100 << 10)

    def read_then_leave() -> None:
        got = 0
        while got < taken:
            got += len(os.read(read_end, min(1 << 16, taken - got)))
        os.close(read_end)

    reader = threading.Thread(target=read_then_leave)
    reader.start()
    sender = _sender(write_end, errors)
    try:
        sender.send("pc.ram", memoryview(ram), np.arange(1024, dtype=np.int64))
        reader.join()
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        sender.close()
    (stats,) = sender.stats
    assert len(errors) == 1 and errors[0].startswith("channel 0: packet 2: "), errors
    assert stats.packets == 2 and stats.pages == 2 * PAGES_PER_PACKET
    assert taken <= stats.bytes < 3 * PACKET
