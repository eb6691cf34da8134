"""The destination's multifd channels: one thread each, writing pages in place.

Each thread reads a header, then the pages straight into the RAM block (one
recvmsg into an iovec table of the pages and the next header, see
channels/iovec.py; or decompress and scatter). At a SYNC packet it
stops until the migration thread, at the matching EOS or MULTIFD_FLUSH, has
seen every channel reach its SYNC (QEMU's multifd_recv_sync_main).
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable, Mapping

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
    ) -> None:
        self._cond = threading.Condition()
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
            while True:
                if self._aborted:
                    raise MigrationAborted
                ended = [rc for rc in self.channels if rc.ended and rc.synced < target]
                if ended:
                    rc = ended[0]
                    message = (
                        f"channel {rc.stats.id}: peer closed the channel before the SYNC of {label}"
                    )
                    rc.stats.error = message
                    self._aborted = True
                    self._cond.notify_all()
                    self._on_error(message)
                    raise MigrationAborted
                if all(rc.synced >= target for rc in self.channels):
                    break
                self._cond.wait()
            self.repeated += self._count_repeats()
            self._note_written()
            for rc in self.channels:
                rc.released = target
            self._cond.notify_all()

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        for rc in self.channels:
            rc.channel.shutdown()

    def close(self, *, reset: bool = False) -> None:
        """Stop and join every thread (a thread reading the next header gets EOF
        once its channel is shut down), then close every channel; `reset` when
        the migration is abandoned (see `Channel.close`)."""
        with self._cond:
            self._finishing = True
        self.abort()
        for rc in self.channels:
            if rc.thread is not None:
                rc.thread.join()
        for rc in self.channels:
            rc.channel.close(reset=reset)

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
            while self._receive_one(rc):
                pass
        except Exception as exc:
            with self._cond:
                quiet = self._finishing or self._aborted
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
            rc.stats.busy_ns += time.perf_counter_ns() - started
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
        rc.stats.busy_ns += time.perf_counter_ns() - started
        if packet.is_sync:
            rc.stats.sync_packets += 1
            with self._cond:
                rc.synced += 1
                self._cond.notify_all()
                while rc.released < rc.synced and not self._aborted:
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
        try:
            rc.channel.read_iovec(rc.iov)
        except ChannelEOFError as exc:
            if exc.missing != PACKET_HEADER_SIZE:
                raise  # pages or the next header cut short
            rc.ended_after_pages = True  # the stream ended right after them
            return
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
                data = rc.decompressor.decompress(payload, normal * TARGET_PAGE_SIZE, where)
                pages = np.frombuffer(data, dtype=np.uint8).reshape(normal, TARGET_PAGE_SIZE)
                _scatter(array, data_offsets, pages, aligned)
            self._note(rc, name, data_offsets.astype(">u8").tobytes())
            rc.stats.pages += normal
            self._note_ends(rc, packet, name, data_offsets)
        # 9.0's zero pages: as QEMU, those of fresh memory not written since are left alone.
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
