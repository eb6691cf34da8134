"""multifd-compression methods: one zlib or zstd stream per channel, as QEMU keeps.

Each packet's pages are compressed in order and flushed (zlib Z_SYNC_FLUSH,
zstd FLUSH_BLOCK) so the receiver can decode the packet alone, while the
stream itself is never ended (spec 3.4).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Protocol

import zstandard

from ..wire import PAGES_PER_PACKET, TARGET_PAGE_SIZE, Compression, Where, WireError

Buffer = bytes | bytearray | memoryview
MAX_PACKET_BYTES = PAGES_PER_PACKET * TARGET_PAGE_SIZE


class Compressor(Protocol):
    def compress(self, pages: Sequence[Buffer]) -> bytes: ...


class Decompressor(Protocol):
    def decompress(self, payload: bytes, expected: int, where: Where) -> bytes: ...


class ZlibCompressor:
    def __init__(self, level: int) -> None:
        self._stream = zlib.compressobj(level)

    def compress(self, pages: Sequence[Buffer]) -> bytes:
        parts = [self._stream.compress(p) for p in pages]
        parts.append(self._stream.flush(zlib.Z_SYNC_FLUSH))
        return b"".join(parts)


class ZstdCompressor:
    def __init__(self, level: int) -> None:
        self._stream = zstandard.ZstdCompressor(level=level).compressobj()

    def compress(self, pages: Sequence[Buffer]) -> bytes:
        parts = [self._stream.compress(p) for p in pages]
        parts.append(self._stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
        return b"".join(parts)


class ZlibDecompressor:
    def __init__(self) -> None:
        self._stream = zlib.decompressobj()

    def decompress(self, payload: bytes, expected: int, where: Where) -> bytes:
        try:
            # max_length bounds the output: a hostile payload cannot inflate past it.
            data = self._stream.decompress(payload, expected + 1)
        except zlib.error as exc:
            raise WireError(f"zlib payload: {exc}", where=where) from None
        if self._stream.eof:
            # The channel's stream lasts the whole migration: QEMU's inflate
            # refuses Z_STREAM_END, and the stream could not go on past it.
            raise WireError(
                "zlib payload ends the channel's zlib stream (Z_FINISH); a source "
                "only flushes it (Z_SYNC_FLUSH), as every later packet continues it",
                where=where,
                field="payload",
                expected="Z_SYNC_FLUSH",
            )
        return _exact(data, expected, "zlib", where)


class _BoundedSink:
    """Collects decompressed output and stops a stream that outgrows its packet."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise _Overflow
        self.parts.append(bytes(data))
        return len(data)


# The largest window a channel's zstd stream may ask for: level 20, the
# highest multifd-zstd-level, uses 32 MiB. zstd's own limit is 128 MiB, which
# a hostile source could ask of every channel.
MAX_ZSTD_WINDOW = 32 << 20


class _Overflow(Exception):
    pass


class ZstdDecompressor:
    def __init__(self) -> None:
        # A stream writer pushes output through our sink chunk by chunk, so a
        # zstd bomb is stopped once it passes the packet's size (decompressobj
        # would build the whole output first).
        self._sink = _BoundedSink()
        # The output buffer must hold a whole packet: with a smaller one, output
        # that fills it exactly when the input runs out stays inside zstd.
        self._stream = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW).stream_writer(
            self._sink, write_size=2 * MAX_PACKET_BYTES, write_return_read=True
        )

    def decompress(self, payload: bytes, expected: int, where: Where) -> bytes:
        self._sink.parts.clear()
        self._sink.size = 0
        self._sink.limit = expected
        try:
            self._stream.write(payload)
        except _Overflow:
            raise WireError(
                f"zstd payload decompresses to more than the {expected} bytes the header announces",
                where=where,
                field="payload",
                expected=str(expected),
            ) from None
        except zstandard.ZstdError as exc:
            if "memory" in str(exc):  # the frame asks for a window above the cap
                raise WireError(
                    f"zstd payload: its frame needs a window above {MAX_ZSTD_WINDOW >> 20} MiB, "
                    "more than any multifd-zstd-level (0-20) uses",
                    where=where,
                    field="payload",
                ) from None
            raise WireError(f"zstd payload: {exc}", where=where) from None
        return _exact(b"".join(self._sink.parts), expected, "zstd", where)


def _exact(data: bytes, expected: int, method: str, where: Where) -> bytes:
    if len(data) != expected:
        raise WireError(
            f"{method} payload decompressed to {len(data)} bytes, expected {expected} "
            "(the pages the header announces)",
            where=where,
            field="payload",
            value=len(data),
            expected=str(expected),
        )
    return data


def make_compressor(method: Compression, level: int = 1) -> Compressor | None:
    """A fresh per-channel compressor, or None for `none`."""
    if method is Compression.ZLIB:
        return ZlibCompressor(level)
    if method is Compression.ZSTD:
        return ZstdCompressor(level)
    return None


def make_decompressor(method: Compression) -> Decompressor | None:
    """A fresh per-channel decompressor, or None for `none`."""
    if method is Compression.ZLIB:
        return ZlibDecompressor()
    if method is Compression.ZSTD:
        return ZstdDecompressor()
    return None
