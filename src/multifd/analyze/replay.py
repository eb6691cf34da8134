"""Replays a recorded migration the way a destination would, without threads.

The main stream is decoded record by record; at every sync point (EOS in 7.2's
section mode, MULTIFD_FLUSH in round mode) each multifd channel is read up to
its next SYNC packet, and the packets of that segment are applied in
`packet_num` order, the order the source handed them out. Counting and
optional RAM images come out of the same pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..migration.compression import Decompressor, make_decompressor
from ..wire import (
    TARGET_PAGE_SIZE,
    BufferSource,
    CompressedPage,
    Compression,
    Configuration,
    DeviceState,
    EndOfSection,
    MainStreamDecoder,
    MemSize,
    MultifdFlush,
    PacketLayout,
    Page,
    Reader,
    VMCommand,
    VMDescription,
    WireError,
    XbzrlePage,
    ZeroPage,
    read_init,
    read_packet,
)
from ..wire.devices import expected_devices
from ..wire.errors import Where
from ..wire.multifd import COMPRESSION_MASK, PAGES_PER_PACKET
from ..wire.xbzrle import apply_xbzrle
from .recording import Recording

_COMPRESSION_BY_FLAG = {c.flag: c for c in Compression}


@dataclass
class ChannelStats:
    """One multifd channel, by the id its init packet names."""

    accept_order: int  # 1 for the first multifd connection accepted
    id: int | None = None
    packets: int = 0
    sync_packets: int = 0
    pages: int = 0  # normal pages carried
    zero_pages: int = 0  # zero pages inside packets (9.0 layout)
    bytes: int = 0
    compression: str | None = None  # seen in the first packet carrying pages
    error: str | None = None


@dataclass
class RoundStats:
    """One section of the `ram` stream: from one EOS to the next."""

    index: int
    zero_pages: int = 0  # ZERO records on main, and zero pages inside packets
    normal_pages: int = 0  # pages with data, on main and on every channel
    repeated_pages: int = 0
    multifd_packets: int = 0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Analysis:
    """Everything `multifd analyze` reports about one recording."""

    path: str
    machine_type: str | None = None
    capabilities: tuple[str, ...] = ()
    uuid: str | None = None
    blocks: list[tuple[str, int]] = field(default_factory=list)
    sync_mode: str | None = None  # "section" (sync per EOS, 7.2) or "round" (FLUSH, 8.1+)
    rounds: list[RoundStats] = field(default_factory=list)
    channels: list[ChannelStats] = field(default_factory=list)
    device_sections: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    vmdesc_devices: list[str] | None = None
    main_bytes: int = 0
    completed: bool = False  # the main stream reached QEMU_VM_EOF
    missing_connections: list[str] = field(default_factory=list)
    unsent_pages: int | None = None  # pages of the blocks never sent; None: not known
    extracted: dict | None = None  # folder, files, complete (no error while decoding)
    errors: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def normal(self) -> int:
        return sum(r.normal_pages for r in self.rounds)

    @property
    def duplicate(self) -> int:
        return sum(r.zero_pages for r in self.rounds)

    @property
    def repeated(self) -> int:
        return sum(r.repeated_pages for r in self.rounds)

    @property
    def total(self) -> int:
        return sum(length for _, length in self.blocks)

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "machine_type": self.machine_type,
            "capabilities": list(self.capabilities),
            "uuid": self.uuid,
            "multifd_channels": len(self.channels),
            "sync_mode": self.sync_mode,
            "rounds": len(self.rounds),
            "ram": {
                "normal": self.normal,
                "duplicate": self.duplicate,
                "total": self.total,
                "normal-bytes": self.normal * TARGET_PAGE_SIZE,
                "repeated": self.repeated,
            },
            "per_round": [asdict(r) for r in self.rounds],
            "blocks": [{"name": n, "used_length": length} for n, length in self.blocks],
            "channels": [asdict(c) for c in self.channels],
            "main_bytes": self.main_bytes,
            "device_sections": self.device_sections,
            "commands": self.commands,
            "completed": self.completed,
            "missing_connections": self.missing_connections,
            "unsent_pages": self.unsent_pages,
            "extracted": self.extracted,
            "checks": [asdict(c) for c in self.checks],
            "errors": self.errors,
        }


@dataclass(frozen=True)
class _Delivery:
    """The pages of one packet, ready to apply."""

    packet_num: int
    block: str
    offsets: np.ndarray
    pages: np.ndarray | None  # (n, 4096) uint8, None when the packet has no data
    zero_offsets: np.ndarray


class _ChannelReplay:
    """Reads one multifd channel's packets, a segment at a time."""

    def __init__(self, accept_order: int, file: str, data: bytes, layout: PacketLayout) -> None:
        self.stats = ChannelStats(accept_order)
        self.file = file
        self.source = BufferSource(data)
        self.reader = Reader(self.source)
        self.layout = layout
        self.decompressor: Decompressor | None = None
        self.compression: Compression | None = None
        self.dead = False
        self.stats.bytes = len(data)
        try:
            init = read_init(self.reader)
        except WireError as exc:
            # No channel id yet: the error's own position would say "main channel".
            self.fail(f"multifd init: byte {exc.where.offset or 0:#x}: {exc.message}")
            return
        self.stats.id = init.channel_id
        self.reader.set_context(channel=init.channel_id)

    def fail(self, message: str) -> None:
        self.stats.error = f"{self.file}: {message}"
        self.dead = True

    def segment(self, blocks: dict[str, int], label: str) -> Iterator[_Delivery]:
        """Every packet up to and including the next SYNC packet."""
        while not self.dead:
            if self.source.remaining == 0:
                self.fail(f"channel {self.stats.id}: stream ended before the SYNC of {label}")
                return
            try:
                delivery, sync = self._next(blocks)
            except WireError as exc:
                self.fail(str(exc))
                return
            if delivery is not None:
                yield delivery
            if sync:
                return

    def drain(self) -> tuple[int, int]:
        """After EOF: (SYNC-only packets, pages) left on the channel."""
        syncs = pages = 0
        while not self.dead and self.source.remaining:
            try:
                delivery, sync = self._next({})
            except WireError as exc:
                self.fail(str(exc))
                break
            syncs += sync
            if delivery is not None:
                pages += len(delivery.offsets) + len(delivery.zero_offsets)
        return syncs, pages

    def _next(self, blocks: dict[str, int]) -> tuple[_Delivery | None, bool]:
        self.reader.set_context(packet=self.stats.packets)
        packet = read_packet(self.reader, layout=self.layout)
        self.stats.packets += 1
        self.stats.sync_packets += packet.is_sync
        if packet.page_count == 0:
            return None, packet.is_sync
        where = self.reader.where
        if self.compression is None:
            bits = packet.flags & COMPRESSION_MASK
            if bits not in _COMPRESSION_BY_FLAG:
                raise WireError.bad_field("compression flags", bits, "none, zlib or zstd", where)
            self.compression = _COMPRESSION_BY_FLAG[bits]
            self.stats.compression = self.compression.value
            self.decompressor = make_decompressor(self.compression)
        block, offsets = packet.check_pages(blocks, self.compression, where)
        normal = packet.normal_pages
        payload = self.reader.take(packet.payload_length(self.compression), "packet payload")
        if self.decompressor is not None:
            payload = self.decompressor.decompress(payload, normal * TARGET_PAGE_SIZE, where)
        pages = np.frombuffer(payload, dtype=np.uint8).reshape(normal, TARGET_PAGE_SIZE)
        self.stats.pages += normal
        self.stats.zero_pages += packet.zero_pages
        return (
            _Delivery(packet.packet_num, block, offsets[:normal], pages, offsets[normal:]),
            packet.is_sync,
        )


def check_extract_folder(folder: Path) -> None:
    """Raise ValueError, naming what is wrong, if `folder` cannot take the RAM
    images: it must be new (created with its parents) or an empty folder, so
    that nothing already there is overwritten, and writable. Cheap, so callers
    check before a long decode rather than fail in the middle of it."""
    if folder.exists() or folder.is_symlink():
        if not folder.is_dir():
            raise ValueError(f"{folder} exists and is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{folder} is not writable")
        try:
            empty = not any(folder.iterdir())
        except OSError as exc:
            raise ValueError(f"{folder} cannot be listed: {exc.strerror}") from None
        if not empty:
            raise ValueError(
                f"{folder} is not empty (give a new or empty folder: nothing is overwritten)"
            )
        return
    # The nearest existing ancestor is where the missing folders get created.
    ancestor = next(p for p in folder.absolute().parents if p.exists() or p.is_symlink())
    if not ancestor.is_dir():
        raise ValueError(f"{folder} cannot be created: {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{folder} cannot be created: {ancestor} is not writable")


class _PageSet:
    """One bit per page of each block: which pages a pass has seen."""

    # 1 TiB of RAM in 32 MiB of bits; a recording declaring more (hostile, or
    # a giant guest) is decoded without this bookkeeping rather than refused.
    MAX_PAGES = 1 << 28

    def __init__(self, blocks: list[tuple[str, int]]) -> None:
        self.bits = {
            name: np.zeros((length // TARGET_PAGE_SIZE + 7) // 8, dtype=np.uint8)
            for name, length in blocks
        }

    @classmethod
    def fits(cls, blocks: list[tuple[str, int]]) -> bool:
        return sum(length for _, length in blocks) // TARGET_PAGE_SIZE <= cls.MAX_PAGES

    def add(self, block: str, offsets: np.ndarray) -> None:
        pages = np.asarray(offsets, dtype=np.uint64) // TARGET_PAGE_SIZE
        np.bitwise_or.at(
            self.bits[block], (pages >> 3).astype(np.intp), (1 << (pages & 7)).astype(np.uint8)
        )

    def has(self, block: str, offset: int) -> bool:
        page = offset // TARGET_PAGE_SIZE
        return bool(self.bits[block][page >> 3] & (1 << (page & 7)))

    def count(self) -> int:
        return sum(int(np.bitwise_count(bits).sum()) for bits in self.bits.values())


class _Images:
    """RAM blocks rebuilt as sparse files of their used length, written with
    pwrite: the memory used stays that of one packet, whatever the blocks
    claim to be. Nothing is overwritten: every file is created new."""

    def __init__(self, folder: Path, blocks: list[tuple[str, int]]) -> None:
        self.folder = folder
        self.created_folder = not folder.exists()
        self.blocks = dict(blocks)
        self.created: list[Path] = []
        self.fds: dict[str, int] = {}
        self.files: dict[str, str] = {}
        # Pages written with data: a zero page on a page never written is
        # already zero in the sparse file, and writing it would allocate it.
        self.written = _PageSet(blocks) if _PageSet.fits(blocks) else None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for name, length in blocks:
                path = folder / block_file_name(name)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self.created.append(path)
                self.fds[name] = fd
                self.files[name] = path.name
                os.ftruncate(fd, length)
        except OSError:
            self.remove()
            raise

    def write(self, block: str, offsets: np.ndarray, pages: np.ndarray) -> None:
        fd = self.fds[block]
        if not len(offsets):
            return
        if self.written is not None:
            self.written.add(block, offsets)
        # One pwrite per run of adjacent pages (a packet is mostly one run).
        starts = np.flatnonzero(np.diff(offsets.astype(np.int64)) != TARGET_PAGE_SIZE) + 1
        bounds = [0, *starts.tolist(), len(offsets)]
        for first, end in itertools.pairwise(bounds):
            os.pwrite(fd, pages[first:end].data, int(offsets[first]))

    def deliver(self, delivery: _Delivery) -> None:
        if delivery.pages is not None:
            self.write(delivery.block, delivery.offsets, delivery.pages)
        for offset in delivery.zero_offsets.tolist():
            self.fill(delivery.block, offset, 0)

    def fill(self, block: str, offset: int, value: int) -> None:
        if value == 0 and self.written is not None and not self.written.has(block, offset):
            return
        os.pwrite(self.fds[block], bytes([value]) * TARGET_PAGE_SIZE, offset)

    def update(self, block: str, offset: int, encoded: bytes) -> None:
        """Apply an XBZRLE delta to the page as the images hold it."""
        page = bytearray(os.pread(self.fds[block], TARGET_PAGE_SIZE, offset))
        apply_xbzrle(encoded, memoryview(page))
        rows = np.frombuffer(page, np.uint8).reshape(1, TARGET_PAGE_SIZE)
        self.write(block, np.array([offset], dtype=np.uint64), rows)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def finish(self) -> None:
        """Close the files and list them in blocks.json."""
        self.close()
        listing = [
            {"name": name, "used_length": length, "file": self.files[name]}
            for name, length in self.blocks.items()
        ]
        path = self.folder / "blocks.json"
        with open(path, "x") as f:
            self.created.append(path)
            json.dump(listing, f, indent=1)

    def remove(self) -> None:
        """Undo: delete every file this extraction created (and its folder)."""
        self.close()
        for path in self.created:
            path.unlink(missing_ok=True)
        if self.created_folder:
            with contextlib.suppress(OSError):
                self.folder.rmdir()


# Names a file may not take whatever the block is called: the folder itself,
# its parent, and the listing written beside the images.
_RESERVED = {".": "%2E", "..": "%2E%2E", "blocks.json": "blocks%2Ejson"}
_NAME_MAX = 200  # bytes of file name, under every file system's 255


def block_file_name(name: str) -> str:
    """A file name for a RAMBlock idstr, inside the folder whatever the idstr
    holds ("/rom@etc/acpi/tables" has slashes): percent-encoded, so distinct
    names give distinct files. A name too long for a file keeps a readable
    head and a hash of the whole, after "%%" (which percent-encoding never
    writes, so it cannot meet another block's name)."""
    encoded = quote(name, safe="@.-_")
    encoded = _RESERVED.get(encoded, encoded)
    if len(encoded) <= _NAME_MAX:
        return encoded
    head = ""
    for char in name:
        piece = quote(char, safe="@.-_")
        if len(head) + len(piece) > _NAME_MAX - 34:
            break
        head += piece
    return f"{head}%%{hashlib.sha256(name.encode()).hexdigest()[:32]}"


class _Replay:
    def __init__(self, recording: Recording, extract: Path | None, layout: PacketLayout) -> None:
        self.result = Analysis(str(recording.path), main_bytes=len(recording.main))
        self.recording = recording
        self.extract = extract
        self.images: _Images | None = None
        self.sent: _PageSet | None = None  # every page a record or packet carried
        self.main_data_pages = 0  # pages with data on the main channel
        self.ignore_shared = False  # blocks of shared memory are not sent at all
        self.blocks: dict[str, int] = {}
        self.channels = [
            _ChannelReplay(i + 1, recording.file(i + 1), data, layout)
            for i, data in enumerate(recording.channels)
        ]
        self.round = RoundStats(0)
        self.round_mode: bool | None = None

    def run(self) -> Analysis:
        try:
            self._main()
        except WireError as exc:
            self.result.errors.append(f"{self.recording.file(0)}: {exc}")
        self._finish()
        if self.images is not None:
            try:
                self.images.finish()
            except OSError as exc:
                self._extract_failed(exc)
            else:
                self.result.extracted = {
                    "folder": str(self.images.folder),
                    "complete": not self.result.errors,
                    "files": len(self.images.files),
                }
        return self.result

    def _extract_failed(self, exc: OSError) -> None:
        """The images cannot be finished: remove them rather than leave a
        folder that looks like a RAM dump and is not one."""
        folder = self.extract
        if self.images is not None:
            self.images.remove()
            self.images = None
        where = f": {exc.filename}" if exc.filename else ""
        self.result.errors.append(
            f"--extract {folder}: {exc.strerror or exc}{where} "
            "(decoding went on without it; the files it had written are removed)"
        )

    def _image(self, action: Callable[..., object], *args: object) -> None:
        """Call `action(images, *args)` if there are images; a file system
        error ends the extraction, not the decoding."""
        if self.images is None:
            return
        try:
            action(self.images, *args)
        except OSError as exc:
            self._extract_failed(exc)

    def _mark_sent(self, block: str, offsets: np.ndarray) -> None:
        if self.sent is not None and len(offsets):
            self.sent.add(block, offsets)

    def _main(self) -> None:
        decoder = MainStreamDecoder(BufferSource(self.recording.main))
        result = self.result
        for record in decoder:
            if isinstance(record, ZeroPage):
                self.round.zero_pages += 1
                self._mark_sent(record.block, np.array([record.offset], dtype=np.uint64))
                self._image(_Images.fill, record.block, record.offset, record.fill)
            elif isinstance(record, Page | CompressedPage):
                self.round.normal_pages += 1
                self.main_data_pages += 1
                self._mark_sent(record.block, np.array([record.offset], dtype=np.uint64))
                if self.images is not None:
                    data = record.data if isinstance(record, Page) else record.decompress()
                    page = np.frombuffer(data, dtype=np.uint8).reshape(1, TARGET_PAGE_SIZE)
                    offsets = np.array([record.offset], dtype=np.uint64)
                    self._image(_Images.write, record.block, offsets, page)
            elif isinstance(record, XbzrlePage):
                self.round.normal_pages += 1
                self.main_data_pages += 1
                self._mark_sent(record.block, np.array([record.offset], dtype=np.uint64))
                self._image(_Images.update, record.block, record.offset, record.encoded)
            elif isinstance(record, EndOfSection):
                if self.round_mode is None:
                    self.round_mode = False
                if not self.round_mode:
                    self._sync(f"round {self.round.index}")
                result.rounds.append(self.round)
                self.round = RoundStats(len(result.rounds))
            elif isinstance(record, MultifdFlush):
                if self.round_mode is None:
                    self.round_mode = True
                if not self.round_mode:
                    raise WireError("MULTIFD_FLUSH in a stream that syncs at every EOS")
                self._sync(f"the flush in round {self.round.index}")
            elif isinstance(record, MemSize):
                self._mem_size(record, decoder.reader.where)
            elif isinstance(record, Configuration):
                result.machine_type = record.machine_type
                result.capabilities = record.capabilities
                if record.uuid is not None:
                    result.uuid = record.uuid.hex()
            elif isinstance(record, DeviceState):
                result.device_sections.append(record.header.idstr)
            elif isinstance(record, VMCommand):
                result.commands.append(record.command.name)
            elif isinstance(record, VMDescription):
                devices = expected_devices(record)
                result.vmdesc_devices = None if devices is None else [n for n, _ in devices]
        result.completed = decoder.state.name == "DONE"

    def _mem_size(self, record: MemSize, where: Where) -> None:
        blocks = [(b.name, b.used_length) for b in record.blocks]
        if self.result.blocks and blocks != self.result.blocks:
            # QEMU sends the list once, in the setup section; the images, the
            # counts and the coverage are all laid out on the first one.
            raise WireError(
                f"a second MEM_SIZE block list {[n for n, _ in blocks]} differs from the "
                f"first {[n for n, _ in self.result.blocks]} (or their lengths do)",
                where=where,
            )
        if self.result.blocks:
            return
        self.blocks = dict(blocks)
        self.result.blocks = blocks
        # With x-ignore-shared each entry carries an address and shared blocks
        # are never sent: "every page sent" does not hold.
        self.ignore_shared = any(b.addr is not None for b in record.blocks)
        if _PageSet.fits(blocks):
            self.sent = _PageSet(blocks)
        if self.extract is not None:
            try:
                self.images = _Images(self.extract, blocks)
            except OSError as exc:
                self._extract_failed(exc)

    def _sync(self, label: str) -> None:
        """Read every channel up to its SYNC and apply the segment in send order."""
        if not self.channels:
            return
        streams = [c.segment(self.blocks, label) for c in self.channels if not c.dead]
        # A QEMU 7.2 source sends the last page of a full packet again at the
        # head of a later packet of the same segment (read again from guest
        # memory, so the bytes may differ); QEMU counts it once, so do we.
        tails: set[tuple[str, int]] = set()
        for delivery in heapq.merge(*streams, key=lambda d: d.packet_num):
            self.round.multifd_packets += 1
            self.round.zero_pages += len(delivery.zero_offsets)
            count = len(delivery.offsets)
            if count:
                if (delivery.block, int(delivery.offsets[0])) in tails:
                    self.round.repeated_pages += 1
                    count -= 1
                if len(delivery.offsets) == PAGES_PER_PACKET:
                    tails.add((delivery.block, int(delivery.offsets[-1])))
            self.round.normal_pages += count
            self._mark_sent(delivery.block, delivery.offsets)
            self._mark_sent(delivery.block, delivery.zero_offsets)
            self._image(_Images.deliver, delivery)

    def _finish(self) -> None:
        result = self.result
        if self.round.zero_pages or self.round.normal_pages:
            result.rounds.append(self.round)
        if self.channels:
            result.sync_mode = {None: None, False: "section", True: "round"}[self.round_mode]
        leftovers: list[str] = []
        for channel in self.channels:
            syncs, pages = channel.drain()
            if pages:
                leftovers.append(
                    f"channel {channel.stats.id}: {pages} pages after the last sync point"
                )
            elif syncs > 1:
                leftovers.append(f"channel {channel.stats.id}: {syncs} SYNC packets after EOF")
        result.channels = sorted(
            (c.stats for c in self.channels),
            key=lambda s: (s.id is None, s.id if s.id is not None else s.accept_order),
        )
        for stats in result.channels:
            if stats.error:
                result.errors.append(stats.error)
        result.errors.extend(leftovers)
        result.missing_connections = list(self.recording.missing)
        for name in self.recording.missing:
            result.errors.append(
                f"{name}: missing (the multifd connections are numbered from conn1): "
                "the pages that channel carried are not in this recording"
            )
        if self.sent is not None and not self.ignore_shared:
            result.unsent_pages = result.total // TARGET_PAGE_SIZE - self.sent.count()
        self._checks(leftovers)

    def _checks(self, leftovers: list[str]) -> None:
        result = self.result
        checks = result.checks
        checks.append(
            Check(
                "main stream",
                result.completed,
                "decoded through QEMU_VM_EOF" if result.completed else "did not reach QEMU_VM_EOF",
            )
        )
        if self.channels:
            ids = sorted(c.stats.id for c in self.channels if c.stats.id is not None)
            checks.append(
                Check(
                    "channel ids",
                    ids == list(range(len(self.channels))),
                    f"ids {ids} for {len(self.channels)} channels",
                )
            )
            points = len(result.rounds) if result.sync_mode == "section" else None
            healthy = all(c.stats.error is None for c in self.channels) and not leftovers
            detail = "every sync point matched by one SYNC on every channel"
            if points is not None:
                counts = {
                    c.stats.id: c.stats.sync_packets
                    for c in sorted(self.channels, key=lambda c: c.stats.accept_order)
                    if c.stats.id is not None
                }
                counts = dict(sorted(counts.items()))
                healthy = healthy and all(n == points for n in counts.values())
                detail = f"{points} EOS; SYNC packets per channel {counts}"
            checks.append(Check("sync", healthy, detail))
        if result.unsent_pages is not None:
            checks.append(self._coverage_check())
        offset_errors = [e for e in result.errors if "offset" in e]
        checks.append(
            Check(
                "offsets",
                not offset_errors,
                "every page offset inside its block" if not offset_errors else offset_errors[0],
            )
        )
        if result.vmdesc_devices is not None:
            same = result.vmdesc_devices == result.device_sections
            checks.append(
                Check(
                    "device state",
                    same,
                    f"{len(result.device_sections)} device sections, as the vmdesc lists"
                    if same
                    else "device sections differ from the vmdesc device list",
                )
            )

    def _coverage_check(self) -> Check:
        """Every page of every block is sent at least once (the first round
        sends them all): what is not was lost, with the channels that carried it."""
        result = self.result
        unsent = result.unsent_pages or 0
        pages = result.total // TARGET_PAGE_SIZE
        if not unsent:
            return Check("coverage", True, f"every one of the {pages} pages sent")
        detail = f"{unsent} of {pages} pages ({_size(unsent * TARGET_PAGE_SIZE)}) never sent"
        if not self.channels and self.main_data_pages == 0:
            # A 7.2 multifd source puts only zero pages on the main channel.
            detail += (
                ": the main stream carries no page data, as with multifd; were the "
                "multifd channels (conn1.bin …) recorded? Without them that RAM is lost"
            )
        elif result.missing_connections:
            detail += f": lost with {', '.join(result.missing_connections)}"
        elif not result.completed or result.errors:
            detail += ": the recording stops early or has errors"
        return Check("coverage", False, detail)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def analyze(
    recording: Recording,
    *,
    extract: str | Path | None = None,
    layout: PacketLayout = PacketLayout.V9_0,
) -> Analysis:
    """Decode every channel of `recording`; with `extract`, write each RAM block
    into that folder as a file of its used length (last write wins), and
    blocks.json listing them. The folder must be new or empty
    (`check_extract_folder`, ValueError otherwise)."""
    folder = None if extract is None else Path(extract)
    if folder is not None:
        check_extract_folder(folder)
    return _Replay(recording, folder, layout).run()
