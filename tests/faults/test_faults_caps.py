"""Resource caps over a real destination: a fake source that claims terabytes or
oversized packets is refused from the header, before anything is allocated.

The wire-level refusals (pages_alloc above 128, a 4 GiB vmdesc, MEM_SIZE totals)
are in tests/wire/test_wire_negative.py; these check the engine ends cleanly.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from e2e_support import FINISH_TIMEOUT, Migration

from multifd.channels import Listener, parse_uri
from multifd.wire import (
    Configuration,
    EndOfSection,
    FileHeader,
    MemSize,
    MultiFDInit,
    MultiFDPacket,
    RamBlockEntry,
    SectionFooter,
    SectionStart,
)

MiB = 1 << 20


def _run(m: Migration, main: bytes, channel0: bytes = b"") -> dict:
    """A fake source opens main and both multifd channels, writes `main` and
    `channel0`, and holds the sockets open until the destination has ended (it
    must fail on what it read, not on our hanging up)."""
    m.uri = m.destination.incoming(m.listen_uri)
    host, port = m.uri.removeprefix("tcp:").rsplit(":", 1)
    peers: list[socket.socket] = []
    try:
        for channel_id in (None, 0, 1):
            peers.append(socket.create_connection((host, int(port)), timeout=FINISH_TIMEOUT))
            if channel_id is not None:
                peers[-1].sendall(MultiFDInit(bytes(16), channel_id).pack())
        peers[0].sendall(FileHeader().pack() + Configuration.build("multifd-python").pack() + main)
        peers[1].sendall(channel0)
        dst = m.destination.wait(FINISH_TIMEOUT)
    finally:
        for peer in peers:
            peer.close()
    assert dst["status"] == "failed", dst
    assert m.resumed == []
    Listener(parse_uri(m.uri)).close()  # the port is free at once
    return dst


def _ram_start(blocks: tuple[RamBlockEntry, ...]) -> bytes:
    return SectionStart(2, "ram", 0, 4).pack() + MemSize(blocks).pack()


def test_block_list_claiming_terabytes(migration: Callable[..., Migration]) -> None:
    m = migration(sizes=(2 * MiB,), parameters={"x-io-timeout": 5})
    dst = _run(m, _ram_start((RamBlockEntry("pc.ram", 1 << 42),)))
    assert "Length mismatch: pc.ram: 0x40000000000 in != 0x200000" in dst["error-desc"], dst
    m.assert_completed()


def test_packet_claiming_more_pages_than_allowed(migration: Callable[..., Migration]) -> None:
    m = migration(sizes=(2 * MiB,), parameters={"x-io-timeout": 5})
    main = _ram_start((RamBlockEntry("pc.ram", 2 * MiB),))
    main += EndOfSection().pack() + SectionFooter(2).pack()
    packet = bytearray(MultiFDPacket.sync(0).pack())
    packet[12:20] = struct.pack(">II", 1 << 20, 1 << 20)  # pages_alloc, normal_pages
    dst = _run(m, main, bytes(packet))
    error = dst["error-desc"]
    assert "channel 0: packet 0" in error and "1048576" in error, error
    m.assert_completed()
