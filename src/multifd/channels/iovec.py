"""struct iovec arrays that numpy fills: the byte ranges of one packet's pages
as a table of (address, length), handed to recvmsg(2) or vmsplice(2) through
ctypes. Slicing a memoryview per page or run, and the socket module parsing
each one, cost more Python per packet than the kernel's copy of the pages.

The addresses are raw: whoever fills a table keeps the memory they point into
mapped until the call returns (a memoryview of it, held, makes the mmap refuse
to close), and checks every range against the block first.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

# Byte ranges per table: a packet's 128 pages, and what a read fetches with them.
IOVEC_CAPACITY = 256
# Ranges one system call takes.
try:
    IOV_MAX = os.sysconf("SC_IOV_MAX")
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    IOV_MAX = 1024


def buffer_address(buffer: bytearray | memoryview | np.ndarray) -> int:
    """The address of a writable buffer's first byte."""
    if isinstance(buffer, np.ndarray):
        return int(buffer.ctypes.data)
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


class IOVec:
    """A struct iovec[] with room for `capacity` ranges; `count` are in use,
    from row `start` (`address` is that row's): a call that moved whole ranges
    drops them by moving `start`, with no copy of the rest."""

    def __init__(self, capacity: int = IOVEC_CAPACITY) -> None:
        self.table = np.zeros((capacity, 2), dtype=np.uint64)
        self._table_address = int(self.table.ctypes.data)
        self.start = 0
        self.count = 0
        self.total = 0  # bytes in the ranges in use
        # The shape set_pages_then or set_packets left in the lengths column
        # (and the row after the pages, or where the headers are), while
        # nothing else has written the table since; their cached operands.
        self._layout: tuple[str | int, ...] | None = None
        self._addresses = self.table[:0, 0]
        self._header_steps = np.zeros(0, dtype=np.uint64)
        self._base = np.array(0, dtype=np.uint64)
        self._base_value = 0

    def _base_array(self, base: int) -> np.ndarray:
        """`base` as a 0-d uint64 array, kept while it is the same."""
        if self._base_value != base:
            self._base = np.array(base, dtype=np.uint64)
            self._base_value = base
        return self._base

    @property
    def address(self) -> int:
        """The address of the first range in use, as a struct iovec *."""
        return self._table_address + self.start * self.table.itemsize * 2

    @property
    def rows(self) -> np.ndarray:
        """The ranges in use, (address, length) rows."""
        return self.table[self.start : self.start + self.count]

    def set_pages(self, base: int, offsets: np.ndarray, size: int) -> None:
        """One range of `size` bytes at `base + offset` for each offset (an
        unsigned array, checked against the memory at `base` by the caller)."""
        n = len(offsets)
        np.add(offsets, base, out=self.table[:n, 0], casting="unsafe")
        self.table[:n, 1] = size
        self.start = 0
        self.count = n
        self.total = n * size
        self._layout = None

    def set_pages_then(
        self, base: int, offsets: np.ndarray, size: int, address: int, length: int
    ) -> None:
        """As set_pages (for native uint64 offsets), then one more range of
        `length` bytes at `address`. A receiver does this once per packet with
        the same sizes: the lengths and the last range are written only when
        they change, and the addresses by one numpy call on cached operands (a
        Python int operand and a fresh slice cost three times the addition)."""
        n = len(offsets)
        layout = ("then", n, size, address, length)
        if self._layout != layout:
            self.table[:n, 1] = size
            self.table[n] = (address, length)
            self._layout = layout
            self._addresses = self.table[:n, 0]
        np.add(offsets, self._base_array(base), out=self._addresses)
        self.start = 0
        self.count = n + 1
        self.total = n * size + length

    def set_packets(
        self,
        headers: int,
        header_size: int,
        base: int,
        offsets: np.ndarray,
        size: int,
        per_packet: int,
    ) -> None:
        """Packets as they go on the wire: a header of `header_size` bytes (the
        headers lie one after another from address `headers`), then up to
        `per_packet` ranges of `size` bytes at `base + offset`, for `offsets`
        taken `per_packet` at a time (checked by the caller, as for set_pages)."""
        n = len(offsets)
        packets = -(-n // per_packet)
        rows = n + packets
        stride = per_packet + 1
        table = self.table
        # A sender's batches are alike: the lengths, and each header's place
        # after the first, are written when that shape changes, not per batch.
        layout = ("packets", n, header_size, size, per_packet)
        if self._layout != layout:
            table[:rows, 1] = size
            table[0:rows:stride, 1] = header_size
            self._header_steps = np.arange(packets, dtype=np.uint64) * np.uint64(header_size)
            self._layout = layout
        np.add(self._header_steps, np.uint64(headers), out=table[0:rows:stride, 0])
        offsets = np.asarray(offsets, dtype=np.uint64)
        base_array = self._base_array(base)
        full = n // per_packet
        if full:  # the full packets' pages, as a (packets, header + pages) grid
            grid = table[: full * stride].reshape(full, stride, 2)
            np.add(
                offsets[: full * per_packet].reshape(full, per_packet),
                base_array,
                out=grid[:, 1:, 0],
            )
        if n > full * per_packet:  # a last packet of fewer pages
            first = full * stride + 1
            np.add(offsets[full * per_packet :], base_array, out=table[first:rows, 0])
        self.start = 0
        self.count = rows
        self.total = packets * header_size + n * size

    def append(self, address: int, length: int) -> None:
        """One more range at the end."""
        row = self.table[self.start + self.count]
        row[0] = address
        row[1] = length
        self.count += 1
        self.total += length
        self._layout = None

    def views(self) -> list[memoryview]:
        """The ranges as memoryviews, for the channels that cannot take a table
        (TLS, pipes and files) and for the rest of a read cut short."""
        return [
            memoryview((ctypes.c_char * length).from_address(address)).cast("B")
            for address, length in self.rows.tolist()
        ]

    def head_bytes(self, count: int) -> int:
        """The bytes in the first `count` ranges in use."""
        return int(np.add.reduce(self.table[self.start : self.start + count, 1]))

    def drop(self, count: int, length: int) -> None:
        """Drop the first `count` ranges, `length` bytes in all (head_bytes)."""
        self.start += count
        self.count -= count
        self.total -= length

    def advance(self, n: int) -> None:
        """Drop the first `n` bytes: after a call that moved only part of them."""
        if n == self.total:
            self.start += self.count
            self.count = self.total = 0
            return
        ends = np.cumsum(self.rows[:, 1])
        done = int(np.searchsorted(ends, n, side="right"))  # ranges wholly moved
        if done:
            self.drop(done, int(ends[done - 1]))
        into = n - (int(ends[done - 1]) if done else 0)
        if into:  # a range moved in part: what is left of it
            row = self.table[self.start]
            row[0] += into
            row[1] -= into
            self.total -= into
            self._layout = None
