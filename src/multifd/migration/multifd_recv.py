"""The destination's multifd channels: one thread each, writing pages in place.

Each thread reads a header, then the pages straight into the RAM block (one
recvmsg into an iovec table of the pages and the next header, see
channels/iovec.py; or decompress and scatter). At a SYNC packet it
stops until the migration thread, at the matching EOS or MULTIFD_FLUSH, has
seen every channel reach its SYNC (QEMU's multifd_recv_sync_main).

A channel owes nothing between syncs (a real source leaves it idle while the
main stream carries device state, say), so its reads have no timeout of their
own: x-io-timeout bounds how long the migration thread waits at a sync for a
channel that makes no progress. After the main stream's last sync a source
sends nothing more on a channel but closes it: `finish` stops the threads and
fails a channel that held data past that sync, rather than resume without it.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import NoReturn

import numpy as np

from ..channels import Channel, ChannelEOFError, ChannelError
from ..channels.iovec import IOVec, buffer_address
from ..wire import (
    HEADER_FIXED_SIZE,
    PACKET_HEADER_SIZE,
    PAGES_PER_PACKET,
    TARGET_PAGE_SIZE,
    Compression,
    MultiFDPacket,
    PacketLayout,
    Where,
    WireError,
    plain_pages_header,
)
from .compression import make_decompressor
from .received import ReceivedPages
from .stats import ChannelStats, MigrationAborted

# Packets whose pages a receive thread notes before marking them in the received map.
WRITTEN_BATCH = 64
_OFFSET = struct.Struct(">Q")  # one page offset, as the header holds it


class _RecvChannel:
    def __init__(self, channel: Channel, channel_id: int, compression: Compression) -> None:
        self.channel = channel
        self.stats = ChannelStats(channel_id)
        self.decompressor = make_decompressor(compression)
        self.synced = 0  # SYNC packets reached
        self.released = 0  # syncs the migration thread has let past
        self.ended = False  # the peer closed the stream at a packet boundary
        self.stopped = False  # the thread has left its loop
        # perf_counter_ns when its last packet was complete: the progress a
        # sync's deadline counts from.
        self.progress_ns = 0
        # The migration thread gave up waiting for its SYNC and shut it down.
        self.overdue = False
        # Shut down as overdue with its pages in: what was missing is the next
        # packet's header.
        self.next_header_missing = False
        # Pages written (9.0's zero pages included) when the last sync let it
        # past, and whether it stopped inside a packet: data after that sync.
        self.zero_pages = 0
        self.pages_released = 0
        self.cut_short = False
        # First pages of this segment's packets and last pages of its full ones:
        # (packet_num, block, offset), to count QEMU 7.2's repeats (see `sync`).
        self.heads: list[tuple[int, str, int]] = []
        self.tails: list[tuple[int, str, int]] = []
        # Pages written and not yet marked in the received map: (block, byte
        # offsets as big-endian u64, as the headers hold them).
        self.written: list[tuple[str, bytes]] = []
        self.thread: threading.Thread | None = None
        # Every header lands in the same buffer: no allocation per packet.
        self.header = bytearray(PACKET_HEADER_SIZE)
        self.header_view = memoryview(self.header)
        # The next header came with the last packet's pages (see `_pages`), or
        # the stream ended right after them.
        self.header_ready = False
        self.ended_after_pages = False
        # A packet's pages and the next header, for one recvmsg.
        self.iov = IOVec()
        self.header_address = buffer_address(self.header)
        # The header's offset slots, as they are on the wire (big-endian).
        self.offset_slots = np.frombuffer(
            self.header, dtype=">u8", count=PAGES_PER_PACKET, offset=HEADER_FIXED_SIZE
        )


class MultifdReceiver:
    """Owns the receive threads; the migration thread calls `sync` and `close`."""

    def __init__(
        self,
        channels: list[Channel],
        *,
        compression: Compression,
        layout: PacketLayout = PacketLayout.V7_2,
        on_error: Callable[[str], None],
        io_timeout: float | None = None,
    ) -> None:
        """`io_timeout`: how long `sync` waits for a channel that makes no
        progress (None: as long as it takes)."""
        self._cond = threading.Condition()
        self._io_timeout = io_timeout
        self._aborted = False
        self._finishing = False
        self._compression = compression
        self._layout = layout
        self._on_error = on_error
        # name → (used_length, writable uint8 array); set from MEM_SIZE.
        self._blocks: dict[str, tuple[int, np.ndarray]] = {}
        self._lengths: dict[str, int] = {}
        # name → byte view: held, it also keeps the block mapped while the
        # channels read into it by address.
        self._views: dict[str, memoryview] = {}
        self._addresses: dict[str, int] = {}
        # Raw ramblock field of a packet the full path accepted → (name,
        # address, last page's offset): the shortcut of `_plain_pages`.
        self._known_fields: dict[bytes, tuple[str, int, int]] = {}
        self._received = ReceivedPages({})
        self.channels = [_RecvChannel(ch, i, compression) for i, ch in enumerate(channels)]
        self.repeated = 0  # pages counted once although received twice (7.2 quirk)

    def set_blocks(self, blocks: Mapping[str, np.ndarray], received: ReceivedPages) -> None:
        """The destination's blocks by name, once MEM_SIZE has been checked,
        and where to note the pages written."""
        self._received = received
        self._blocks = {name: (len(array), array) for name, array in blocks.items()}
        self._lengths = {name: len(array) for name, array in blocks.items()}
        self._views = {name: memoryview(array).cast("B") for name, array in blocks.items()}
        self._addresses = {name: buffer_address(array) for name, array in blocks.items()}
        self._known_fields = {}

    def start(self) -> None:
        for rc in self.channels:
            rc.thread = threading.Thread(
                target=self._run, args=(rc,), name=f"multifdrecv_{rc.stats.id}", daemon=True
            )
            rc.thread.start()

    def sync(self, label: str) -> None:
        """Wait until every channel has reached its next SYNC, then release them."""
        with self._cond:
            target = self.channels[0].released + 1 if self.channels else 0
            since = time.perf_counter_ns()
            while True:
                if self._aborted:
                    raise MigrationAborted
                ended = [rc for rc in self.channels if rc.ended and rc.synced < target]
                if ended:
                    rc = ended[0]
                    self._fail_channel(
                        rc,
                        f"channel {rc.stats.id}: peer closed the channel "
                        f"before the SYNC of {label}",
                    )
                if all(rc.synced >= target for rc in self.channels):
                    break
                due = self._next_due(target, since)
                if due is None:
                    self._cond.wait()
                    continue
                rc, due_ns = due
                wait_ns = due_ns - time.perf_counter_ns()
                if wait_ns <= 0:
                    self._overdue(rc, target, label)
                self._cond.wait(wait_ns / 1e9)
            self.repeated += self._count_repeats()
            self._note_written()
            for rc in self.channels:
                rc.released = target
                rc.pages_released = rc.stats.pages + rc.zero_pages
            self._cond.notify_all()

    def _next_due(self, target: int, since: int) -> tuple[_RecvChannel, int] | None:
        """The channel whose SYNC is due first, and when (perf_counter_ns):
        x-io-timeout after its last complete packet, or after `since` (when
        the wait began) if that is later. Called with the condition held."""
        if self._io_timeout is None:
            return None
        timeout_ns = int(self._io_timeout * 1e9)
        due = [
            (max(since, rc.progress_ns) + timeout_ns, rc)
            for rc in self.channels
            if rc.synced < target
        ]
        due_ns, rc = min(due, key=lambda item: item[0])
        return rc, due_ns

    def _overdue(self, rc: _RecvChannel, target: int, label: str) -> NoReturn:
        """Fail `rc`, whose SYNC did not come in time: shut it down and wait for
        its thread to stop (its read returns at once), so that the message says
        exactly how far the channel got. Called with the condition held."""
        rc.overdue = True
        rc.channel.shutdown()
        while not rc.stopped and rc.synced < target and not self._aborted:
            self._cond.wait()
        if self._aborted:
            raise MigrationAborted  # another failure came first and was reported
        packet = rc.stats.packets + rc.next_header_missing
        self._fail_channel(
            rc,
            f"channel {rc.stats.id}: packet {packet}: no SYNC for {label} within "
            f"{self._io_timeout:g} s (x-io-timeout); received up to stream offset "
            f"{rc.channel.bytes_read:#x}",
        )

    def _fail_channel(self, rc: _RecvChannel, message: str) -> NoReturn:
        """The migration thread, in `sync`, fails the migration because of
        `rc`. Called with the condition held."""
        rc.stats.error = message
        self._aborted = True
        self._cond.notify_all()
        self._on_error(message)
        raise MigrationAborted

    def finish(self, *, unmatched_sync: bool) -> None:
        """After the main stream's last sync: stop every thread, then fail if a
        channel held data past that sync (pages it wrote since, a packet it was
        inside, a SYNC the main stream never asked for), since that data
        belonged to a segment the main stream has already closed. A look that
        does not wait: what the peer has not sent yet is not seen. `unmatched_sync`:
        one SYNC too many is QEMU 9.1/9.2's at completion (spec 2.4)."""
        self._stop()
        allowed = 1 if unmatched_sync else 0
        for rc in self.channels:
            extra_syncs = rc.synced - rc.released
            extra_pages = rc.stats.pages + rc.zero_pages - rc.pages_released
            if not (rc.cut_short or extra_pages or extra_syncs > allowed):
                continue
            found = []
            if extra_syncs:
                found.append(f"{extra_syncs} SYNC packet(s) more")
            if extra_pages:
                found.append(f"{extra_pages} page(s)")
            if rc.cut_short:
                found.append(f"a packet cut short at stream offset {rc.channel.bytes_read:#x}")
            raise WireError(
                f"data after its last SYNC (the main stream asked for {rc.released}): "
                + ", ".join(found),
                where=Where(channel=rc.stats.id),
            )

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        for rc in self.channels:
            rc.channel.shutdown()

    def close(self, *, reset: bool = False) -> None:
        """Stop every thread (if `finish` did not), then close every channel;
        `reset` when the migration is abandoned (see `Channel.close`)."""
        self.abort()  # a thread parked at a SYNC leaves at once
        self._stop()
        for rc in self.channels:
            rc.channel.close(reset=reset)

    def _stop(self) -> None:
        """Shut every channel down and join its thread. A shut-down socket still
        gives what is queued in it: a thread reads that (past a SYNC it was
        parked at, unless the migration was aborted), then stops between
        packets, or inside one (`cut_short`)."""
        with self._cond:
            self._finishing = True
            self._cond.notify_all()
        for rc in self.channels:
            rc.channel.shutdown()
        for rc in self.channels:
            if rc.thread is not None:
                rc.thread.join()

    def _count_repeats(self) -> int:
        """QEMU 7.2 sources send the last page of a full packet again at the head
        of a later packet of the same segment (read again, so its bytes may have
        changed); QEMU counts it once in `normal`, so we do too. Called with
        every channel parked at a SYNC."""
        tails: dict[tuple[str, int], int] = {}
        for rc in self.channels:
            for num, block, offset in rc.tails:
                tails.setdefault((block, offset), num)
        repeats = 0
        for rc in self.channels:
            for num, block, offset in rc.heads:
                first = tails.get((block, offset))
                repeats += first is not None and first < num
            rc.heads.clear()
            rc.tails.clear()
        return repeats

    def _note_written(self) -> None:
        """Hand the rest of the round's written pages to the received map: a
        page's zero record can only come in a later round, after this sync.
        Called with every channel parked at a SYNC."""
        for rc in self.channels:
            self._hand_over(rc)

    def _hand_over(self, rc: _RecvChannel) -> None:
        """The pages `rc` wrote since it last handed them over, marked at once."""
        by_block: dict[str, list[bytes]] = {}
        for name, offsets in rc.written:
            by_block.setdefault(name, []).append(offsets)
        rc.written.clear()
        for name, parts in by_block.items():
            offsets = np.frombuffer(b"".join(parts), dtype=">u8").astype(np.uint64)
            self._received.wrote(name, offsets)

    @property
    def stats(self) -> list[ChannelStats]:
        return [rc.stats for rc in self.channels]

    # -- channel threads ------------------------------------------------------

    def _run(self, rc: _RecvChannel) -> None:
        try:
            self._receive(rc)
        finally:
            with self._cond:
                rc.stopped = True
                self._cond.notify_all()

    def _receive(self, rc: _RecvChannel) -> None:
        try:
            while self._receive_one(rc):
                pass
        except Exception as exc:
            with self._cond:
                rc.cut_short = self._finishing
                # sync() reports an overdue channel, with what it had read.
                quiet = self._finishing or self._aborted or rc.overdue
            if quiet:
                return
            if isinstance(exc, WireError):
                message = str(exc)
            else:
                detail = (
                    exc.message if isinstance(exc, ChannelError | ChannelEOFError) else str(exc)
                )
                message = f"channel {rc.stats.id}: packet {rc.stats.packets}: {detail}"
            rc.stats.error = message
            self._on_error(message)
            with self._cond:
                self._aborted = True
                self._cond.notify_all()

    def _receive_one(self, rc: _RecvChannel) -> bool:
        channel = rc.channel
        header = rc.header
        if rc.header_ready:
            start = channel.bytes_read - PACKET_HEADER_SIZE
            rc.header_ready = False
        else:
            start = channel.bytes_read
            try:
                if not rc.ended_after_pages:
                    channel.readv_into([rc.header_view])
            except ChannelEOFError as exc:
                if exc.missing != exc.wanted:
                    raise
                rc.ended_after_pages = True
            except ChannelError:
                if self._finishing and channel.bytes_read == start:
                    return False  # stopped between packets, as a source leaves it
                raise
            if rc.ended_after_pages:  # the peer closed the stream at a packet boundary
                with self._cond:
                    rc.ended = True
                    self._cond.notify_all()
                return False
        started = time.perf_counter_ns()
        if self._plain_pages(rc):
            rc.stats.packets += 1
            end = channel.bytes_read - (PACKET_HEADER_SIZE if rc.header_ready else 0)
            rc.stats.bytes += end - start
            now = time.perf_counter_ns()
            rc.stats.busy_ns += now - started
            rc.progress_ns = now
            return True
        where = Where(channel=rc.stats.id, packet=rc.stats.packets, offset=start)
        packet = MultiFDPacket.unpack(header, layout=self._layout, where=where)
        if packet.page_count:
            self._pages(rc, packet, where)
            if packet.flags == 0 and self._layout is PacketLayout.V7_2:
                name = packet.block_name()
                self._known_fields[packet.ramblock] = (
                    name,
                    self._addresses[name],
                    self._lengths[name] - TARGET_PAGE_SIZE,
                )
        rc.stats.packets += 1
        end = channel.bytes_read - (PACKET_HEADER_SIZE if rc.header_ready else 0)
        rc.stats.bytes += end - start
        now = time.perf_counter_ns()
        rc.stats.busy_ns += now - started
        rc.progress_ns = now
        if packet.is_sync:
            rc.stats.sync_packets += 1
            with self._cond:
                rc.synced += 1
                self._cond.notify_all()
                # Once finishing, a SYNC past the last sync parks nothing: what
                # follows it is read, to be found by `finish`.
                while rc.released < rc.synced and not (self._aborted or self._finishing):
                    self._cond.wait()
                if self._aborted:
                    return False
        return True

    def _plain_pages(self, rc: _RecvChannel) -> bool:
        """The common packet (uncompressed pages of a block an earlier packet
        named, every offset inside it) with a few integer checks instead of a
        MultiFDPacket and its checks: they cost as much Python per packet as
        the rest of the loop. False leaves the packet to the full path."""
        if rc.decompressor is not None or self._layout is not PacketLayout.V7_2:
            return False
        plain = plain_pages_header(rc.header)
        if plain is None:
            return False
        normal, packet_num, field = plain
        block = self._known_fields.get(field)
        if block is None:
            return False
        name, address, last = block
        header = rc.header
        end = HEADER_FIXED_SIZE + 8 * normal
        # Copies, native or raw, of what the header says: the read below
        # overwrites it with the next one.
        offsets = rc.offset_slots[:normal].astype(np.uint64)
        # argmax and an index: a third of what a reduction costs on 128 values.
        if offsets[offsets.argmax()] > last:
            return False
        rc.iov.set_pages_then(
            address, offsets, TARGET_PAGE_SIZE, rc.header_address, PACKET_HEADER_SIZE
        )
        written = rc.header_view[HEADER_FIXED_SIZE:end].tobytes()
        first = _OFFSET.unpack_from(header, HEADER_FIXED_SIZE)[0]
        final = _OFFSET.unpack_from(header, end - 8)[0]
        self._read_pages_and_next_header(rc, appended=True)
        self._note(rc, name, written)
        rc.stats.pages += normal
        rc.heads.append((packet_num, name, first))
        if normal == PAGES_PER_PACKET:
            rc.tails.append((packet_num, name, final))
        return True

    def _note_ends(
        self,
        rc: _RecvChannel,
        packet: MultiFDPacket,
        name: str,
        offsets: np.ndarray,
    ) -> None:
        rc.heads.append((packet.packet_num, name, int(offsets[0])))
        if packet.normal_pages == PAGES_PER_PACKET:
            rc.tails.append((packet.packet_num, name, int(offsets[-1])))

    def _note(self, rc: _RecvChannel, name: str, offsets: bytes) -> None:
        """Pages written (their offsets big-endian): marked WRITTEN_BATCH
        packets at a time, since one numpy operation per packet cost a quarter
        of the loop's Python, and keeping them all until the sync, memory in
        proportion to the RAM."""
        rc.written.append((name, offsets))
        if len(rc.written) >= WRITTEN_BATCH:
            self._hand_over(rc)

    @staticmethod
    def _read_pages_and_next_header(rc: _RecvChannel, *, appended: bool = False) -> None:
        """The pages, and in the same system call the next packet's header: the
        Python work between two reads, not the copying, is what a fast peer
        waits for (QEMU's default socket buffer holds less than a packet). A
        source always follows a packet of pages with another packet (at least
        the SYNC of the round) or closes the channel, so this never waits for
        bytes that are not coming. `appended`: the header's range is in the
        table already."""
        if not appended:
            rc.iov.append(rc.header_address, PACKET_HEADER_SIZE)
        channel = rc.channel
        start = channel.bytes_read
        wanted = rc.iov.total
        try:
            channel.read_iovec(rc.iov)
        except ChannelEOFError as exc:
            if exc.missing != PACKET_HEADER_SIZE:
                raise  # pages or the next header cut short
            rc.ended_after_pages = True  # the stream ended right after them
            return
        except ChannelError:
            # Shut down (bytes_read is then exact): were the pages all in?
            rc.next_header_missing = channel.bytes_read - start >= wanted - PACKET_HEADER_SIZE
            raise
        rc.header_ready = True

    def _pages(self, rc: _RecvChannel, packet: MultiFDPacket, where: Where) -> None:
        name, offsets = packet.check_pages(self._lengths, self._compression, where)
        array = self._blocks[name][1]
        normal = packet.normal_pages
        data_offsets, zero_offsets = offsets[:normal], offsets[normal:]
        if normal:
            if rc.decompressor is None:
                # check_pages put every page inside the block.
                rc.iov.set_pages(self._addresses[name], data_offsets, TARGET_PAGE_SIZE)
                self._read_pages_and_next_header(rc)
            else:
                aligned = not np.bitwise_and(data_offsets, TARGET_PAGE_SIZE - 1).any()
                payload = rc.channel.read_exact(packet.next_packet_size)
                # An error in the payload points at its first byte, after the header.
                at = where.at((where.offset or 0) + PACKET_HEADER_SIZE)
                data = rc.decompressor.decompress(payload, normal * TARGET_PAGE_SIZE, at)
                pages = np.frombuffer(data, dtype=np.uint8).reshape(normal, TARGET_PAGE_SIZE)
                _scatter(array, data_offsets, pages, aligned)
            self._note(rc, name, data_offsets.astype(">u8").tobytes())
            rc.stats.pages += normal
            self._note_ends(rc, packet, name, data_offsets)
        # 9.0's zero pages: as QEMU, those of fresh memory not written since are left alone.
        rc.zero_pages += len(zero_offsets)
        for offset in zero_offsets.tolist():
            if self._received.page_may_be_written(name, offset):
                array[offset : offset + TARGET_PAGE_SIZE] = 0


def _scatter(array: np.ndarray, offsets: np.ndarray, pages: np.ndarray, aligned: bool) -> None:
    if aligned:
        rows = array[: len(array) - len(array) % TARGET_PAGE_SIZE].reshape(-1, TARGET_PAGE_SIZE)
        rows[(offsets // TARGET_PAGE_SIZE).astype(np.intp)] = pages
        return
    for offset, page in zip(offsets.tolist(), pages, strict=True):
        array[offset : offset + TARGET_PAGE_SIZE] = page
