"""The source's multifd channels: one thread each, fed batches of packets.

The migration thread splits a run of pages into packets (≤128 pages of one
block, as QEMU's multifd_send_pages) and queues them on the channel with the
least queued work, several packets at a time: a channel thread then writes a
whole batch, and goes on to the next without waiting for the migration
thread. A batch's headers are built at once (page_packet_headers) and go out
with its pages in one sendmsg, or, on a unix socket, lent with vmsplice and
spliced in (see channels/splice.py). Handing over one packet at a time, as
QEMU does between C threads, costs a GIL round trip per packet in Python and
kept every thread waiting on the others.

At the end of every round the migration thread syncs: each channel writes one
SYNC packet after its queued batches, and the migration thread waits until all
of them have (QEMU's multifd_send_sync_main).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..channels import Channel, ChannelError
from ..channels.iovec import IOVec, buffer_address
from ..wire import (
    PACKET_HEADER_SIZE,
    PAGES_PER_PACKET,
    TARGET_PAGE_SIZE,
    Compression,
    MultiFDPacket,
    PacketLayout,
    page_packet_headers,
)
from .compression import Compressor, make_compressor
from .stats import ChannelStats, MigrationAborted

# Pages handed to a channel at once (one batch).
BATCH_PAGES = 8 * PAGES_PER_PACKET
# Pages queued on one channel before the migration thread waits: the batch being
# written and the next one, so that a channel never waits for the migration
# thread, and a cancel or a dead peer is noticed within a batch or two.
QUEUE_PAGES = 2 * BATCH_PAGES


@dataclass
class _Batch:
    """Packets of one block, numbered on from `first_num`, PAGES_PER_PACKET
    pages each (the last may hold fewer); or one SYNC packet."""

    block_name: str = ""
    buffer: memoryview | None = None
    pages: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    first_num: int = 0
    sync_num: int | None = None  # a SYNC packet instead of pages

    @property
    def page_count(self) -> int:
        return len(self.pages)

    def packet_pages(self) -> list[np.ndarray]:
        return [
            self.pages[i : i + PAGES_PER_PACKET]
            for i in range(0, len(self.pages), PAGES_PER_PACKET)
        ]


@dataclass
class _SendChannel:
    channel: Channel
    stats: ChannelStats
    compressor: Compressor | None
    wakeup: threading.Condition
    queue: deque[_Batch] = field(default_factory=deque)
    queued_pages: int = 0
    syncs_written: int = 0
    thread: threading.Thread | None = None
    # A batch as it goes on the wire: each packet's header, then its pages.
    iov: IOVec = field(default_factory=lambda: IOVec(BATCH_PAGES + BATCH_PAGES // PAGES_PER_PACKET))


def byte_runs(offsets: np.ndarray, size: int) -> zip:
    """(start, end) byte ranges of runs of adjacent `size`-byte pages at
    `offsets`, so that adjacent pages travel as one buffer."""
    offsets = offsets.astype(np.int64, copy=False)
    step = np.diff(offsets) != size
    first = np.empty(len(offsets), dtype=np.bool_)
    first[0] = True
    first[1:] = step
    last = np.empty(len(offsets), dtype=np.bool_)
    last[-1] = True
    last[:-1] = step
    return zip(offsets[first].tolist(), (offsets[last] + size).tolist(), strict=True)


class MultifdSender:
    """Owns the send threads; the migration thread calls `send`, `sync`, `close`."""

    def __init__(
        self,
        channels: list[Channel],
        *,
        compression: Compression,
        level: int,
        layout: PacketLayout = PacketLayout.V7_2,
        on_error: Callable[[str], None],
    ) -> None:
        self._lock = threading.Lock()
        # The migration thread waits on this one for queue space and syncs; each
        # channel thread on its own, so a batch wakes only its channel.
        self._space = threading.Condition(self._lock)
        self._aborted = False
        self._compression = compression
        self._layout = layout
        self._on_error = on_error
        self._packet_num = 0  # the next packet's number
        self._next = 0  # where the search for the least loaded channel starts
        # Bytes handed to the channels, header included (uncompressed size):
        # what the bandwidth limit counts, as QEMU counts a packet when queued.
        self.queued_bytes = 0
        self.channels = [
            _SendChannel(
                ch,
                ChannelStats(i),
                make_compressor(compression, level),
                threading.Condition(self._lock),
            )
            for i, ch in enumerate(channels)
        ]

    # -- owner's side ---------------------------------------------------------

    def start(self) -> None:
        for sc in self.channels:
            sc.thread = threading.Thread(
                target=self._run, args=(sc,), name=f"multifdsend_{sc.stats.id}", daemon=True
            )
            sc.thread.start()

    def send(self, block_name: str, buffer: memoryview, pages: np.ndarray) -> int:
        """Queue pages of one block (any number, in packets of ≤128) on the
        channels; returns the bytes of page data they will put on the wire."""
        for first in range(0, len(pages), BATCH_PAGES):
            chunk = pages[first : first + BATCH_PAGES]
            with self._lock:
                # Wait for room on any channel, then choose: choosing first and
                # waiting for that one channel left the others idle meanwhile.
                self._wait(lambda: any(sc.queued_pages < QUEUE_PAGES for sc in self.channels))
                sc = self._least_loaded()
                # Numbered when queued, as QEMU numbers a packet when a channel takes it.
                packets = -(-len(chunk) // PAGES_PER_PACKET)
                first_num = self._packet_num
                self._packet_num += packets
                sc.queue.append(_Batch(block_name, buffer, chunk, first_num))
                sc.queued_pages += len(chunk)
                sc.wakeup.notify()
            self.queued_bytes += packets * PACKET_HEADER_SIZE + len(chunk) * TARGET_PAGE_SIZE
        return len(pages) * TARGET_PAGE_SIZE

    def sync(self) -> None:
        """Every channel writes one SYNC packet after its queued pages; returns
        once all have been written (not acknowledged)."""
        with self._lock:
            targets = []
            for sc in self.channels:
                self.queued_bytes += PACKET_HEADER_SIZE
                sc.queue.append(_Batch(sync_num=self._packet_num))
                self._packet_num += 1
                targets.append(sc.syncs_written + 1)
                sc.wakeup.notify()
            self._wait(
                lambda: all(
                    sc.syncs_written >= target
                    for sc, target in zip(self.channels, targets, strict=True)
                )
            )

    def wait_read(self, timeout: float | None) -> str | None:
        """Wait until the destination has read everything written on every
        channel: until then, lent pages of the source's memory are still on
        their way. None once read, else what is still waiting."""
        for sc in self.channels:
            if not sc.channel.wait_read(timeout):
                return f"channel {sc.stats.id}: the destination did not read the last pages"
        return None

    def abort(self) -> None:
        """Wake every waiter and make every blocked socket call return."""
        with self._lock:
            self._aborted = True
            self._space.notify_all()
            for sc in self.channels:
                sc.wakeup.notify_all()
        for sc in self.channels:
            sc.channel.shutdown()

    def close(self) -> None:
        """Stop and join every thread, then close every channel."""
        self.abort()
        for sc in self.channels:
            if sc.thread is not None:
                sc.thread.join()
        for sc in self.channels:
            sc.channel.close()

    @property
    def stats(self) -> list[ChannelStats]:
        return [sc.stats for sc in self.channels]

    def _least_loaded(self) -> _SendChannel:
        # Ties go round-robin from the channel after the last one chosen, as
        # QEMU's multifd_send_pages starts its search: with the lowest id
        # winning, channel 0 carried most pages whenever channels kept up.
        n = len(self.channels)
        order = [self.channels[(self._next + step) % n] for step in range(n)]
        chosen = min(order, key=lambda sc: sc.queued_pages)
        self._next = (chosen.stats.id + 1) % n
        return chosen

    def _wait(self, ready: Callable[[], bool]) -> None:
        """Wait on `_space` (lock held) until `ready`, or raise once aborted."""
        while not ready():
            if self._aborted:
                raise MigrationAborted
            self._space.wait()
        if self._aborted:
            raise MigrationAborted

    # -- channel threads ------------------------------------------------------

    def _run(self, sc: _SendChannel) -> None:
        while True:
            with self._lock:
                while not sc.queue and not self._aborted:
                    sc.wakeup.wait()
                if self._aborted:
                    return
                batch = sc.queue[0]
            try:
                started = time.perf_counter_ns()
                self._write(sc, batch)
                sc.stats.busy_ns += time.perf_counter_ns() - started
            except Exception as exc:
                with self._lock:
                    # After abort() shut this channel down, its error is a
                    # consequence: the channel's figures must not blame it.
                    quiet = self._aborted
                if not quiet:
                    detail = exc.message if isinstance(exc, ChannelError) else str(exc)
                    sc.stats.error = f"channel {sc.stats.id}: packet {sc.stats.packets}: {detail}"
                    self._on_error(sc.stats.error)
                with self._lock:
                    self._aborted = True
                    self._space.notify_all()
                return
            with self._lock:
                sc.queue.popleft()
                sc.queued_pages -= batch.page_count
                if batch.sync_num is not None:
                    sc.syncs_written += 1
                self._space.notify()

    def _write(self, sc: _SendChannel, batch: _Batch) -> None:
        stats = sc.stats
        if batch.sync_num is not None:
            header = MultiFDPacket.sync(batch.sync_num, layout=self._layout).pack()
            sc.channel.write_all(header)
            stats.bytes += len(header)
            stats.packets += 1
            stats.sync_packets += 1
            return
        assert batch.buffer is not None
        if sc.compressor is None and sc.channel.can_lend and not batch.buffer.readonly:
            self._write_lent(sc, batch)
            return
        buffer = batch.buffer
        offsets = batch.pages.astype(np.uint64) * np.uint64(TARGET_PAGE_SIZE)
        payloads: list[list] = []
        for part in batch.packet_pages():
            views = [buffer[a:b] for a, b in byte_runs(part * TARGET_PAGE_SIZE, TARGET_PAGE_SIZE)]
            payloads.append(views if sc.compressor is None else [sc.compressor.compress(views)])
        sizes = np.array([sum(map(len, p)) for p in payloads], dtype=np.uint64)
        headers = page_packet_headers(
            batch.block_name,
            offsets,
            batch.first_num,
            flags=self._compression.flag,
            payload_sizes=sizes,
            layout=self._layout,
        )
        parts: list = []
        for header, payload in zip(headers, payloads, strict=True):
            parts.append(header)
            parts.extend(payload)
        start = sc.channel.bytes_written
        expected = int(sizes.sum()) + len(sizes) * PACKET_HEADER_SIZE
        try:
            sc.channel.writev_all(parts)
        finally:
            self._count_written(sc, batch, start, expected, sizes)

    def _write_lent(self, sc: _SendChannel, batch: _Batch) -> None:
        """The batch's headers and pages, lent rather than copied (see
        channels/splice.py); the source's completion waits until they are read."""
        assert batch.buffer is not None
        offsets = batch.pages.astype(np.uint64) * np.uint64(TARGET_PAGE_SIZE)
        headers = page_packet_headers(
            batch.block_name,
            offsets,
            batch.first_num,
            flags=self._compression.flag,
            layout=self._layout,
        )
        sc.iov.set_packets(
            buffer_address(headers),
            PACKET_HEADER_SIZE,
            buffer_address(batch.buffer),
            offsets,
            TARGET_PAGE_SIZE,
            PAGES_PER_PACKET,
        )
        start = sc.channel.bytes_written
        expected = sc.iov.total
        try:
            # The headers are lent too: the channel holds them until they are read.
            sc.channel.write_lent(sc.iov, keep=headers)
        finally:
            self._count_written(sc, batch, start, expected)

    @staticmethod
    def _count_written(
        sc: _SendChannel,
        batch: _Batch,
        start: int,
        expected: int,
        sizes: np.ndarray | None = None,
    ) -> None:
        """Count what went out of a batch of `expected` bytes whose packets'
        payloads have `sizes` (default: their pages, uncompressed); of a batch
        cut short, the packets it holds whole, so that an error names the
        packet it broke in."""
        written = sc.channel.bytes_written - start
        sc.stats.bytes += written
        if written == expected:
            sc.stats.packets += -(-len(batch.pages) // PAGES_PER_PACKET)
            sc.stats.pages += len(batch.pages)
            return
        if sizes is None:
            sizes = np.array([len(p) for p in batch.packet_pages()], dtype=np.uint64)
            sizes *= np.uint64(TARGET_PAGE_SIZE)
        ends = np.cumsum(sizes + np.uint64(PACKET_HEADER_SIZE))
        done = int(np.searchsorted(ends, written, side="right"))
        sc.stats.packets += done
        sc.stats.pages += min(done * PAGES_PER_PACKET, len(batch.pages))
