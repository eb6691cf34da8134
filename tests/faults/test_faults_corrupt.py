"""Corrupted bytes on a multifd channel, injected by a relay between the ends: the
destination fails naming the channel, packet and field; the source runs on."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from e2e_support import Migration
from relay import OFFSETS_AT, RAMBLOCK_AT, Relay

MiB = 1 << 20


def flip_magic_bit(header: bytearray, payload: bytes) -> bytes:
    header[1] ^= 0x01
    return payload


def offset_out_of_range(header: bytearray, payload: bytes) -> bytes:
    header[OFFSETS_AT : OFFSETS_AT + 8] = struct.pack(">Q", 0x7FFF_F000)
    return payload


def wrong_block_name(header: bytearray, payload: bytes) -> bytes:
    header[RAMBLOCK_AT : RAMBLOCK_AT + 256] = b"nosuch".ljust(256, b"\0")
    return payload


def truncated_zstd(header: bytearray, payload: bytes) -> bytes:
    size = len(payload) // 2
    header[20:24] = struct.pack(">I", size)
    return payload[:size]


def garbage_payload(header: bytearray, payload: bytes) -> bytes:
    return bytes(len(payload))  # zeros: no valid zlib or zstd data begins so


def oversized_size(header: bytearray, payload: bytes) -> bytes:
    header[20:24] = struct.pack(">I", 0xFFFF_FFF0)
    return payload


def pages_beyond_payload(header: bytearray, payload: bytes) -> bytes | None:
    # One page more than the payload holds (as long as a packet has room).
    normal = struct.unpack_from(">I", header, 16)[0]
    if normal >= 128:
        return None
    header[16:20] = struct.pack(">I", normal + 1)
    header[OFFSETS_AT + 8 * normal : OFFSETS_AT + 8 * normal + 8] = struct.pack(">Q", 0)
    return payload


def other_method_flag(header: bytearray, payload: bytes) -> bytes:
    header[11] ^= 0x06  # zlib <-> zstd
    return payload


def flag_cleared(header: bytearray, payload: bytes) -> bytes:
    header[11] &= ~0x06
    return payload


CASES = {
    "flipped bit in the magic": (flip_magic_bit, "none", ("magic",)),
    "page offset out of range": (offset_out_of_range, "none", ("0x7ffff000", "pc.ram")),
    "wrong block name": (wrong_block_name, "none", ("nosuch",)),
    "truncated zstd payload": (truncated_zstd, "zstd", ("zstd", "decompressed to")),
    "corrupt zlib payload": (garbage_payload, "zlib", ("zlib payload",)),
    "corrupt zstd payload": (garbage_payload, "zstd", ("zstd payload",)),
    "oversized zlib size": (oversized_size, "zlib", ("next_packet_size", "0xfffffff0")),
    "zstd pages beyond payload": (pages_beyond_payload, "zstd", ("decompressed to",)),
    "zstd flag on zlib": (other_method_flag, "zlib", ("flags received 0x4 flags expected 0x2",)),
    "zlib flag on zstd": (other_method_flag, "zstd", ("flags received 0x2 flags expected 0x4",)),
    "no flag on zlib": (flag_cleared, "zlib", ("flags received 0x0 flags expected 0x2",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupted_packet(migration: Callable[..., Migration], case: str) -> None:
    mutate, compression, words = CASES[case]
    m = migration(
        workload_rate=5_000,
        parameters={"multifd-compression": compression, "x-io-timeout": 5},
    )
    m.uri = m.destination.incoming(m.listen_uri)
    relay = Relay(m.uri, mutate)
    try:
        m.workload.start()
        m.source.migrate(relay.uri)
        src, dst = m.finish()
    finally:
        relay.close()
    assert relay.mutated.is_set()
    assert dst["status"] == "failed", dst
    error = dst["error-desc"]
    assert "channel 0" in error and "packet" in error, error
    for word in words:
        assert word in error, error
    assert m.resumed == []
    # The destination's failure reaches the source as a reset (or its pages
    # were all out): it failed and runs on, or it completed its side.
    assert src["status"] in ("failed", "completed"), src
    if src["status"] == "failed":
        assert not m.stopped and not m.workload.paused
    else:
        m.workload.resume()
    m.assert_completed()
