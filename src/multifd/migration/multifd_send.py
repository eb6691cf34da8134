"""The source's multifd channels: one thread each, fed batches of pages.

The migration thread hands a batch (≤128 pages of one block) to the next idle
channel, as QEMU's multifd_send_pages does; at the end of every round it syncs:
each channel writes one SYNC packet after its last batch, and the migration
thread waits until all of them have (QEMU's multifd_send_sync_main).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..channels import Channel, ChannelError
from ..wire import TARGET_PAGE_SIZE, Compression, MultiFDPacket, PacketLayout
from .compression import make_compressor
from .stats import ChannelStats, MigrationAborted


@dataclass
class _Job:
    block_name: str = ""
    buffer: memoryview | None = None
    pages: np.ndarray | None = None  # page indices inside the block
    sync: bool = False
    packet_num: int = 0


@dataclass
class _SendChannel:
    channel: Channel
    stats: ChannelStats
    job: _Job | None = None
    thread: threading.Thread | None = None
    compressor: object | None = field(default=None)


def page_runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive page indices as (first, count) runs, so adjacent pages go out
    as one buffer."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(pages)]))
    return [(int(pages[s]), int(e - s)) for s, e in zip(starts, ends, strict=True)]


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
        self._cond = threading.Condition(self._lock)
        self._idle: deque[int] = deque()
        self._aborted = False
        self._compression = compression
        self._layout = layout
        self._on_error = on_error
        self._packet_num = 0
        self._next = 0
        self.channels = [
            _SendChannel(ch, ChannelStats(i), compressor=make_compressor(compression, level))
            for i, ch in enumerate(channels)
        ]

    # -- owner's side ---------------------------------------------------------

    def start(self) -> None:
        for sc in self.channels:
            sc.thread = threading.Thread(
                target=self._run, args=(sc,), name=f"multifdsend_{sc.stats.id}", daemon=True
            )
            self._idle.append(sc.stats.id)
            sc.thread.start()

    def send(self, block_name: str, buffer: memoryview, pages: np.ndarray) -> int:
        """Queue ≤128 pages of one block on the next idle channel; returns the
        bytes it will put on the wire (header + raw pages)."""
        with self._cond:
            sc = self._take_idle()
            sc.job = _Job(block_name, buffer, pages, packet_num=self._packet_num)
            self._packet_num += 1
            self._cond.notify_all()
        return len(pages) * TARGET_PAGE_SIZE

    def sync(self) -> None:
        """Every channel writes one SYNC packet after its queued pages; returns
        once all have been written (not acknowledged)."""
        with self._cond:
            self._wait(lambda: len(self._idle) == len(self.channels))
            self._idle.clear()
            for sc in self.channels:
                sc.job = _Job(sync=True, packet_num=self._packet_num)
                self._packet_num += 1
            self._cond.notify_all()
            self._wait(lambda: len(self._idle) == len(self.channels))

    def abort(self) -> None:
        """Wake every waiter and make every blocked socket call return."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
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

    def _take_idle(self) -> _SendChannel:
        # Round-robin from the channel after the last one used, like QEMU.
        self._wait(lambda: bool(self._idle))
        n = len(self.channels)
        for step in range(n):
            candidate = (self._next + step) % n
            if candidate in self._idle:
                self._idle.remove(candidate)
                self._next = (candidate + 1) % n
                return self.channels[candidate]
        raise AssertionError("an idle channel was announced but none is idle")

    def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if self._aborted:
                raise MigrationAborted
            self._cond.wait()
        if self._aborted:
            raise MigrationAborted

    # -- channel threads ------------------------------------------------------

    def _run(self, sc: _SendChannel) -> None:
        while True:
            with self._cond:
                while sc.job is None and not self._aborted:
                    self._cond.wait()
                if self._aborted:
                    return
                job = sc.job
            try:
                started = time.perf_counter_ns()
                self._write(sc, job)
                sc.stats.busy_ns += time.perf_counter_ns() - started
            except Exception as exc:
                with self._cond:
                    # After abort() shut this channel down, its error is a
                    # consequence: the channel's figures must not blame it.
                    quiet = self._aborted
                if not quiet:
                    detail = exc.message if isinstance(exc, ChannelError) else str(exc)
                    sc.stats.error = f"channel {sc.stats.id}: packet {sc.stats.packets}: {detail}"
                    self._on_error(sc.stats.error)
                with self._cond:
                    sc.job = None
                    self._aborted = True
                    self._cond.notify_all()
                return
            with self._cond:
                sc.job = None
                self._idle.append(sc.stats.id)
                self._cond.notify_all()

    def _write(self, sc: _SendChannel, job: _Job) -> None:
        stats = sc.stats
        if job.sync:
            header = MultiFDPacket.sync(job.packet_num, layout=self._layout).pack()
            sc.channel.write_all(header)
            stats.bytes += len(header)
            stats.packets += 1
            stats.sync_packets += 1
            return
        assert job.pages is not None and job.buffer is not None
        views = [
            job.buffer[first * TARGET_PAGE_SIZE : (first + count) * TARGET_PAGE_SIZE]
            for first, count in page_runs(job.pages)
        ]
        offsets = job.pages.astype(np.uint64) * np.uint64(TARGET_PAGE_SIZE)
        if sc.compressor is None:
            payload: list = views
            size = len(job.pages) * TARGET_PAGE_SIZE
        else:
            compressed = sc.compressor.compress(views)
            payload = [compressed]
            size = len(compressed)
        header = MultiFDPacket.for_pages(
            job.block_name,
            offsets,
            flags=self._compression.flag,
            packet_num=job.packet_num,
            payload_size=size,
            layout=self._layout,
        ).pack()
        sc.channel.writev_all([header, *payload])
        stats.bytes += len(header) + size
        stats.packets += 1
        stats.pages += len(job.pages)
