"""Buffered main-channel I/O, like QEMU's QEMUFile: small records cost no syscall.

The main stream is made of many tiny records (a ZERO record is 9 bytes), so
reads come from a 64 KiB buffer and writes collect in a 32 KiB one, flushed
at the points the protocol needs (end of section, end of stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..channels import Channel

WRITE_BUFFER = 32 * 1024
READ_BUFFER = 64 * 1024

Buffer = bytes | bytearray | memoryview


class QEMUFileWriter:
    """Collects small writes; large or vectored ones go straight out after a flush."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._buffer = bytearray()

    @property
    def bytes_written(self) -> int:
        return self.channel.bytes_written + len(self._buffer)

    def write(self, data: Buffer) -> None:
        self._buffer += data
        if len(self._buffer) >= WRITE_BUFFER:
            self.flush()

    def writev(self, buffers: Sequence[Buffer]) -> None:
        """Write page views without copying them into the buffer."""
        pending = [bytes(self._buffer)] if self._buffer else []
        self._buffer.clear()
        self.channel.writev_all([*pending, *buffers])

    def flush(self) -> None:
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self.channel.write_all(data)


class QEMUFileReader:
    """A `ByteSource` over a channel that reads ahead in 64 KiB chunks."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._buffer = bytearray()
        self._pos = 0
        self._chunk = bytearray(READ_BUFFER)

    def _available(self) -> int:
        return len(self._buffer) - self._pos

    def _refill(self) -> int:
        """Read whatever the channel has now (at most 64 KiB); 0 at end of stream."""
        n = self.channel.read_some_into(memoryview(self._chunk))
        if n:
            if self._pos:
                del self._buffer[: self._pos]
                self._pos = 0
            self._buffer += memoryview(self._chunk)[:n]
        return n

    def read_exact(self, n: int) -> bytes:
        while self._available() < n:
            if not self._refill():
                have = self._available()
                self._pos = len(self._buffer)
                note = self.channel.end_note()
                raise EOFError(
                    f"{self.channel.name}: peer closed the stream {n - have} bytes short of {n} "
                    f"at stream offset {self.channel.bytes_read - have:#x}"
                    + (f" ({note})" if note else "")
                )
        data = bytes(self._buffer[self._pos : self._pos + n])
        self._pos += n
        return data

    def peek_buffered(self) -> memoryview:
        """What is already read ahead, without waiting (see `ByteSource`)."""
        return memoryview(self._buffer)[self._pos :]

    def read_to_eof(self, limit: int, complete: Callable[[bytes], bool] | None = None) -> bytes:
        rest = bytes(self._buffer[self._pos :])
        self._buffer.clear()
        self._pos = 0
        if complete is not None and rest and complete(rest):
            return rest
        whole = None if complete is None else lambda more: complete(rest + more)
        return rest + self.channel.read_to_eof(limit - len(rest), whole)
