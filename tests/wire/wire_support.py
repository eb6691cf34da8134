"""Shared helpers for the wire-layer tests: the QEMU 7.2 recordings, bounded
decoding, and hypothesis strategies that build valid records and streams."""

from __future__ import annotations

import json
import lzma
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from multifd.wire import (
    PAGES_PER_PACKET,
    TARGET_PAGE_SIZE,
    BufferSource,
    Command,
    CompressedPage,
    Compression,
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    Hook,
    MainRecord,
    MainStreamDecoder,
    MemSize,
    MultifdFlush,
    MultiFDInit,
    MultiFDPacket,
    PacketLayout,
    Page,
    RamBlockEntry,
    Reader,
    SectionFooter,
    SectionPart,
    SectionStart,
    Subsection,
    VMCommand,
    VMDescription,
    WireError,
    XbzrlePage,
    ZeroPage,
    read_init,
    read_packet,
)
from multifd.wire.reader import be32
from multifd.wire.stream import COMMAND_LENGTHS, CONFIG_PAGE_BITS

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "qemu-7.2"
RECORDING_NAMES = sorted(p.name for p in FIXTURES.iterdir() if (p / "conn0.bin.xz").is_file())
MULTIFD_RECORDING_NAMES = [n for n in RECORDING_NAMES if (FIXTURES / n / "conn1.bin.xz").is_file()]

# Hypothesis settings for the wire tests: no deadline (CI machines vary; a hang
# shows up as a bounded-iteration failure instead), examples kept few so the
# whole directory stays fast.
PROPERTY = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(PROPERTY, max_examples=100)


# -- decoding helpers ----------------------------------------------------------


def pack_all(records: list[Any] | tuple[Any, ...]) -> bytes:
    return b"".join(r.pack() for r in records)


def decode_main(data: bytes, **options: Any) -> list[MainRecord]:
    """Every record of a main stream. Each record consumes at least one byte,
    so more records than bytes would mean the decoder loops without progress."""
    records: list[MainRecord] = []
    decoder = MainStreamDecoder(BufferSource(data), **options)
    while (record := decoder.next_record()) is not None:
        records.append(record)
        assert len(records) <= len(data) + 1, "decoder made no progress"
    return records


def decode_until_error(data: bytes, **options: Any) -> tuple[list[MainRecord], WireError | None]:
    """The records decoded before the first `WireError`, and that error (or None).
    Any exception other than `WireError` propagates and fails the test."""
    records: list[MainRecord] = []
    decoder = MainStreamDecoder(BufferSource(data), **options)
    try:
        while (record := decoder.next_record()) is not None:
            records.append(record)
            assert len(records) <= len(data) + 1, "decoder made no progress"
    except WireError as exc:
        return records, exc
    return records, None


@dataclass
class ChannelCapture:
    """A multifd channel decoded: its init, then each packet header and payload."""

    init: MultiFDInit
    packets: list[tuple[MultiFDPacket, bytes]] = field(default_factory=list)

    def pack(self) -> bytes:
        return self.init.pack() + b"".join(p.pack() + payload for p, payload in self.packets)

    @property
    def sync_count(self) -> int:
        return sum(p.is_sync for p, _ in self.packets)


def decode_channel(data: bytes, channel: int | None = None) -> ChannelCapture:
    """Init, then header + payload until the bytes run out (nocomp, 7.2 layout)."""
    source = BufferSource(data)
    reader = Reader(source)
    if channel is not None:
        reader.set_context(channel=channel)
    capture = ChannelCapture(read_init(reader))
    while source.remaining:
        packet = read_packet(reader, layout=PacketLayout.V7_2)
        payload = reader.take(packet.payload_length(Compression.NONE), "payload")
        capture.packets.append((packet, payload))
        assert len(capture.packets) <= len(data), "channel decoder made no progress"
    return capture


# -- the recordings --------------------------------------------------------------


class Recording:
    """One recorded QEMU 7.2 migration: raw bytes, meta.json, decoded lazily."""

    def __init__(self, folder: Path) -> None:
        self.name = folder.name
        self.meta: dict[str, Any] = json.loads((folder / "meta.json").read_text())
        self.main = lzma.decompress((folder / "conn0.bin.xz").read_bytes())
        # Multifd channels in accept order (conn1 … connN), not in channel-id order.
        count = len(list(folder.glob("conn*.bin.xz"))) - 1
        self.channel_bytes = [
            lzma.decompress((folder / f"conn{i}.bin.xz").read_bytes()) for i in range(1, count + 1)
        ]

    @cached_property
    def records(self) -> list[MainRecord]:
        return decode_main(self.main)

    @cached_property
    def channels(self) -> list[ChannelCapture]:
        return [decode_channel(data) for data in self.channel_bytes]

    @cached_property
    def blocks(self) -> dict[str, int]:
        mem_size = next(r for r in self.records if isinstance(r, MemSize))
        return {b.name: b.used_length for b in mem_size.blocks}

    def offset_of(self, index: int) -> int:
        """Byte offset of record `index` in the main stream."""
        return len(pack_all(self.records[:index]))


class RecordingStore:
    """Loads each recording once per test session."""

    def __init__(self) -> None:
        self._loaded: dict[str, Recording] = {}

    def __getitem__(self, name: str) -> Recording:
        if name not in self._loaded:
            self._loaded[name] = Recording(FIXTURES / name)
        return self._loaded[name]


# -- strategies: names and small fields -------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)

# An idstr: 1–255 bytes of UTF-8 without NUL (QEMU's counted string).
idstrs = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=40),
    st.just("x" * 255),
    st.just("é" * 127),
)
# Device idstrs as QEMU makes them: printable ASCII paths such as "0000:00:1f.0/ICH9LPC".
device_idstrs = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40
)
machine_types = st.text(st.characters(max_codepoint=0x7F), min_size=1, max_size=256)
page_data = st.binary(max_size=16).map(lambda seed: (seed * 4096)[:4096].ljust(4096, b"\xa5"))
# Opaque device bodies never contain 0x7e, so only the real footer looks like one.
device_bodies = st.binary(max_size=48).map(lambda b: b.replace(b"\x7e", b"\x7d"))


@st.composite
def configurations(draw: st.DrawFn) -> Configuration:
    capabilities = draw(
        st.lists(
            st.one_of(st.sampled_from(["x-ignore-shared", "validate-uuid"]), idstrs),
            max_size=5,
            unique=True,
        )
    )
    uuid = draw(st.none() | st.binary(min_size=16, max_size=16))
    config = Configuration.build(draw(machine_types), capabilities=tuple(capabilities), uuid=uuid)
    subsections = list(config.subsections)
    if draw(st.booleans()):
        subsections.append(Subsection(CONFIG_PAGE_BITS, 1, be32(draw(st.integers(12, 16)))))
    return Configuration(config.machine_type, tuple(draw(st.permutations(subsections))))


@st.composite
def vm_commands(draw: st.DrawFn) -> VMCommand:
    """A command with the length QEMU's mig_cmd_args table requires."""
    command = draw(st.sampled_from([c for c in Command if c is not Command.INVALID]))
    if command is Command.PACKAGED:
        package = draw(st.binary(max_size=64))
        return VMCommand(command, be32(len(package)), package)
    length = COMMAND_LENGTHS[command]
    if length >= 0:
        return VMCommand(command, draw(st.binary(min_size=length, max_size=length)))
    return VMCommand(command, draw(st.binary(max_size=64)))


@st.composite
def block_lists(
    draw: st.DrawFn, *, ignore_shared: bool = False, max_blocks: int = 4
) -> tuple[MemSize, frozenset[str]]:
    """A MEM_SIZE record and the names whose entry carries a page size."""
    names = draw(st.lists(idstrs, min_size=1, max_size=max_blocks, unique=True))
    page_size_blocks = frozenset(draw(st.sets(st.sampled_from(names))))
    entries = tuple(
        RamBlockEntry(
            name,
            draw(st.integers(1, 1 << 20)) * TARGET_PAGE_SIZE,
            page_size=draw(u64) if name in page_size_blocks else None,
            addr=draw(u64) if ignore_shared else None,
        )
        for name in names
    )
    return MemSize(entries), page_size_blocks


class PageRecordMaker:
    """Draws page records that a decoder can follow: offsets inside the MEM_SIZE
    blocks, CONTINUE only after a named record (the block carries over sections)."""

    def __init__(self, mem_size: MemSize) -> None:
        self.blocks = {b.name: b.used_length for b in mem_size.blocks}
        self.last: str | None = None

    def draw(self, draw: st.DrawFn) -> ZeroPage | Page | XbzrlePage | CompressedPage:
        continued = self.last is not None and draw(st.booleans())
        block = self.last if continued else draw(st.sampled_from(sorted(self.blocks)))
        assert block is not None
        self.last = block
        pages = self.blocks[block] // TARGET_PAGE_SIZE
        offset = draw(st.integers(0, pages - 1)) * TARGET_PAGE_SIZE
        kind = draw(st.sampled_from(["zero", "page", "xbzrle", "compressed"]))
        if kind == "zero":
            return ZeroPage(block, offset, draw(st.integers(0, 255)), continued)
        if kind == "page":
            return Page(block, offset, draw(page_data), continued)
        if kind == "xbzrle":
            return XbzrlePage(block, offset, draw(st.binary(max_size=64)), continued)
        return CompressedPage(block, offset, draw(st.binary(min_size=1, max_size=64)), continued)


@dataclass
class SyntheticStream:
    """A main stream built from records, and the decoder options it needs."""

    records: list[MainRecord]
    page_size_blocks: frozenset[str] = frozenset()

    def pack(self) -> bytes:
        return pack_all(self.records)


@st.composite
def main_streams(draw: st.DrawFn, *, devices: bool = True) -> SyntheticStream:
    """A whole valid main stream: header, configuration, commands, the ram
    section (START, PART…, END) and, if `devices`, opaque FULL sections, EOF
    and the vmdesc."""
    config = draw(configurations())
    records: list[MainRecord] = [FileHeader(), config]
    records += draw(st.lists(vm_commands(), max_size=2))
    mem_size, page_size_blocks = draw(
        block_lists(ignore_shared="x-ignore-shared" in config.capabilities)
    )
    maker = PageRecordMaker(mem_size)
    sid = draw(u32)
    records += [SectionStart(sid, "ram", 0, 4), mem_size]
    records += [maker.draw(draw) for _ in range(draw(st.integers(0, 3)))]
    records += [EndOfSection(), SectionFooter(sid)]
    parts = draw(st.integers(0, 3))
    for i in range(parts):
        records.append(SectionPart(sid, end=i == parts - 1 and draw(st.booleans())))
        for _ in range(draw(st.integers(0, 4))):
            extra = draw(st.sampled_from(["page", "page", "page", "flush", "hook"]))
            if extra == "flush":
                records.append(MultifdFlush())
            elif extra == "hook":
                records.append(Hook())
            else:
                records.append(maker.draw(draw))
        records += [EndOfSection(), SectionFooter(sid)]
        records += draw(st.lists(vm_commands(), max_size=1))
    headers = []
    if devices:
        for _ in range(draw(st.integers(0, 3))):
            header = SectionStart(draw(u32), draw(device_idstrs), draw(u32), draw(u32), full=True)
            headers.append(header)
            records += [DeviceState(header, draw(device_bodies)), SectionFooter(header.section_id)]
    records.append(EndOfFile())
    if draw(st.booleans()):
        if headers or draw(st.booleans()):
            listed = [{"name": h.idstr, "instance_id": h.instance_id} for h in headers]
            text = json.dumps({"page_size": TARGET_PAGE_SIZE, "devices": listed})
            records.append(VMDescription(text.encode()))
        else:
            records.append(VMDescription(draw(st.binary(max_size=64))))
    return SyntheticStream(records, page_size_blocks)


@st.composite
def multifd_inits(draw: st.DrawFn) -> MultiFDInit:
    return MultiFDInit(draw(st.binary(min_size=16, max_size=16)), draw(st.integers(0, 255)))


@st.composite
def multifd_packets(draw: st.DrawFn, layout: PacketLayout) -> MultiFDPacket:
    """A header that passes QEMU's structural checks in `layout`."""
    compression_mask = 0x0E if layout is PacketLayout.V7_2 else 0x3E
    flags = draw(st.integers(0, 0xFF)) & (0x01 | compression_mask)
    alloc = draw(st.integers(0, PAGES_PER_PACKET))
    normal = draw(st.integers(0, alloc))
    zero = draw(st.integers(0, alloc - normal)) if layout is PacketLayout.V9_0 else 0
    name = draw(st.one_of(idstrs, st.just(""))).encode()
    return MultiFDPacket(
        flags=flags,
        pages_alloc=alloc,
        normal_pages=normal,
        next_packet_size=draw(u32),
        packet_num=draw(u64),
        ramblock=draw(
            st.one_of(st.just(name.ljust(256, b"\0")), st.binary(min_size=256, max_size=256))
        ),
        offset_slots=draw(st.binary(min_size=8 * PAGES_PER_PACKET, max_size=8 * PAGES_PER_PACKET)),
        zero_pages=zero,
        layout=layout,
    )
