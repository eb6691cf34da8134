"""What the decoders read from: anything with ``read_exact(n)``.

A channel (socket, pipe, file) provides it in `multifd.channels`; `BufferSource`
provides it over bytes already in memory, for tests and recordings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable


@runtime_checkable
class ByteSource(Protocol):
    """A stream the decoders pull from.

    `read_exact` returns exactly `n` bytes or raises `EOFError` when the stream
    ends first. `read_to_eof` returns everything up to the end of the stream,
    raising `EOFError`-free; it refuses (raises `ValueError`) past `limit` bytes.
    Only the main stream's opaque device state needs `read_to_eof`. A source
    may also offer `peek_buffered() -> memoryview`, the bytes it already holds
    (never blocking), which lets the decoder take runs of records at once.
    """

    def read_exact(self, n: int) -> bytes: ...

    def read_to_eof(self, limit: int, complete: Callable[[bytes], bool] | None = None) -> bytes:
        """`complete(data)` may end the read before the stream does."""
        ...


class BufferSource:
    """A `ByteSource` over bytes in memory."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self._pos = 0

    @property
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def read_exact(self, n: int) -> bytes:
        if n > self.remaining:
            have = self.remaining
            self._pos = len(self._data)
            raise EOFError(f"stream ended {n - have} bytes short of {n}")
        chunk = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return chunk

    def read_to_eof(self, limit: int, complete: Callable[[bytes], bool] | None = None) -> bytes:
        # All of it is here already: a whole stream ends where the data does.
        if self.remaining > limit:
            raise ValueError(f"{self.remaining} bytes remain, more than the limit of {limit}")
        chunk = bytes(self._data[self._pos :])
        self._pos = len(self._data)
        return chunk
