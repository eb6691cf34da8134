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


CASES = {
    "flipped bit in the magic": (flip_magic_bit, "none", ("magic",)),
    "page offset out of range": (offset_out_of_range, "none", ("0x7ffff000", "pc.ram")),
    "wrong block name": (wrong_block_name, "none", ("nosuch",)),
    "truncated zstd payload": (truncated_zstd, "zstd", ()),
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
