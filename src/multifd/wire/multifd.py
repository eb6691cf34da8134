"""A multifd channel's bytes: the 64-byte init, then packets (spec section 3).

Each packet is a fixed 1344-byte header (x86: 128 offset slots whatever the
page count) followed by a payload whose length depends on the compression.
Two header layouts exist: 7.2's, and 9.0's, which adds `zero_pages`.
"""

from __future__ import annotations

import functools
import struct
import uuid as uuid_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, IntFlag

import numpy as np

from .errors import Where, WireError
from .profile import PAGES_PER_PACKET, TARGET_PAGE_SIZE
from .reader import Reader

MULTIFD_MAGIC = 0x11223344
MULTIFD_VERSION = 1
INIT_SIZE = 64
HEADER_FIXED_SIZE = 320
PACKET_HEADER_SIZE = HEADER_FIXED_SIZE + 8 * PAGES_PER_PACKET  # 1344
RAMBLOCK_FIELD_SIZE = 256
# QEMU's zlib/zstd receivers size their buffer at twice the packet's page bytes.
MAX_COMPRESSED_PAYLOAD = 2 * PAGES_PER_PACKET * TARGET_PAGE_SIZE

_INIT = struct.Struct(">II16sB7s32s")
_HEAD_7_2 = struct.Struct(">IIIIIIQ32s256s")
_HEAD_9_0 = struct.Struct(">IIIIIIQII24s256s")


class PacketFlag(IntFlag):
    SYNC = 0x01
    ZLIB = 0x02
    ZSTD = 0x04
    QPL = 0x08
    UADK = 0x10
    QATZIP = 0x20
    DEVICE_STATE = 0x40


COMPRESSION_MASK_7_2 = 0x0E
COMPRESSION_MASK = 0x3E


class Compression(Enum):
    """`multifd-compression`, with the packet flag bits each method sets."""

    NONE = "none"
    ZLIB = "zlib"
    ZSTD = "zstd"

    @property
    def flag(self) -> int:
        return _COMPRESSION_FLAGS[self.value]


# Plain ints: IntFlag arithmetic costs microseconds, paid on every packet.
_COMPRESSION_FLAGS = {"none": 0, "zlib": int(PacketFlag.ZLIB), "zstd": int(PacketFlag.ZSTD)}
_SYNC = int(PacketFlag.SYNC)


class PacketLayout(Enum):
    """Which header layout: 7.2's, or 9.0's with `zero_pages` at byte 32."""

    V7_2 = "7.2"
    V9_0 = "9.0"


@dataclass(frozen=True)
class MultiFDInit:
    """MultiFDInit_t: the first 64 bytes of every multifd channel."""

    uuid: bytes  # the source's 16-byte qemu_uuid (zero unless -uuid was given)
    channel_id: int
    magic: int = MULTIFD_MAGIC
    version: int = MULTIFD_VERSION

    def pack(self) -> bytes:
        return _INIT.pack(self.magic, self.version, self.uuid, self.channel_id, b"", b"")

    @classmethod
    def unpack(cls, data: bytes, where: Where | None = None) -> MultiFDInit:
        where = where or Where()
        base = where.offset or 0
        if len(data) != INIT_SIZE:
            raise WireError.bad_field("init packet length", len(data), "64 bytes", where)
        magic, version, raw_uuid, channel_id, _, _ = _INIT.unpack(data)
        if magic != MULTIFD_MAGIC:
            raise WireError.bad_field(
                "multifd init magic", magic, f"{MULTIFD_MAGIC:#x}", where.at(base)
            )
        if version != MULTIFD_VERSION:
            raise WireError.bad_field(
                "multifd init version", version, str(MULTIFD_VERSION), where.at(base + 4)
            )
        return cls(raw_uuid, channel_id, magic, version)

    @property
    def uuid_text(self) -> str:
        return str(uuid_module.UUID(bytes=self.uuid))

    def check(self, expected_uuid: bytes, channels: int, where: Where | None = None) -> None:
        """The destination's checks: same UUID, an id below the channel count."""
        where = where or Where(channel=self.channel_id)
        if self.uuid != expected_uuid:
            raise WireError(
                f"multifd: received uuid '{self.uuid_text}' and expected uuid "
                f"'{uuid_module.UUID(bytes=expected_uuid)}' for channel {self.channel_id}",
                where=where.at(8),
                field="uuid",
                value=self.uuid_text,
                expected=str(uuid_module.UUID(bytes=expected_uuid)),
            )
        if self.channel_id >= channels:
            raise WireError.bad_field(
                "channel id", self.channel_id, f"below multifd-channels ({channels})", where.at(24)
            )


def read_init(reader: Reader) -> MultiFDInit:
    start = reader.offset
    return MultiFDInit.unpack(reader.take(INIT_SIZE, "multifd init packet"), reader.where.at(start))


@dataclass(frozen=True)
class MultiFDPacket:
    """MultiFDPacket_t, both layouts.

    `offset_slots` keeps all 128 be64 slots as sent: QEMU 7.2 reuses its packet
    buffer, so slots past the page count hold stale offsets, and byte-exact
    re-encoding needs them. `ramblock` keeps the raw 256-byte name field.
    """

    flags: int
    pages_alloc: int
    normal_pages: int
    next_packet_size: int
    packet_num: int
    ramblock: bytes = bytes(RAMBLOCK_FIELD_SIZE)
    offset_slots: bytes = bytes(8 * PAGES_PER_PACKET)
    zero_pages: int = 0
    layout: PacketLayout = PacketLayout.V7_2

    @classmethod
    def for_pages(
        cls,
        block: str,
        offsets: Sequence[int] | np.ndarray,
        *,
        flags: int,
        packet_num: int,
        payload_size: int,
        zero_offsets: Sequence[int] | np.ndarray = (),
        layout: PacketLayout = PacketLayout.V7_2,
    ) -> MultiFDPacket:
        """A data packet: `offsets` are normal pages, `zero_offsets` (9.0) zero pages."""
        normal = np.asarray(offsets, dtype=">u8")
        zero = np.asarray(zero_offsets, dtype=">u8")
        count = len(normal) + len(zero)
        if count > PAGES_PER_PACKET:
            raise ValueError(f"{count} pages do not fit in one packet ({PAGES_PER_PACKET})")
        if len(zero) and layout is not PacketLayout.V9_0:
            raise ValueError("zero pages inside packets need the 9.0 layout")
        slots = np.zeros(PAGES_PER_PACKET, dtype=">u8")
        slots[: len(normal)] = normal
        slots[len(normal) : count] = zero
        name = block.encode("utf-8")
        return cls(
            flags=flags,
            pages_alloc=PAGES_PER_PACKET,
            normal_pages=len(normal),
            next_packet_size=payload_size,
            packet_num=packet_num,
            ramblock=name.ljust(RAMBLOCK_FIELD_SIZE, b"\0"),
            offset_slots=slots.tobytes(),
            zero_pages=len(zero),
            layout=layout,
        )

    @classmethod
    def sync(cls, packet_num: int, *, layout: PacketLayout = PacketLayout.V7_2) -> MultiFDPacket:
        """A SYNC packet that carries no page (QEMU 9.0+ shape; 7.2 accepts it)."""
        return cls(
            flags=PacketFlag.SYNC,
            pages_alloc=PAGES_PER_PACKET if layout is PacketLayout.V7_2 else 0,
            normal_pages=0,
            next_packet_size=0,
            packet_num=packet_num,
            layout=layout,
        )

    def pack(self) -> bytes:
        if self.layout is PacketLayout.V7_2:
            fixed = _HEAD_7_2.pack(
                MULTIFD_MAGIC,
                MULTIFD_VERSION,
                self.flags,
                self.pages_alloc,
                self.normal_pages,
                self.next_packet_size,
                self.packet_num,
                b"",
                self.ramblock,
            )
        else:
            fixed = _HEAD_9_0.pack(
                MULTIFD_MAGIC,
                MULTIFD_VERSION,
                self.flags,
                self.pages_alloc,
                self.normal_pages,
                self.next_packet_size,
                self.packet_num,
                self.zero_pages,
                0,
                b"",
                self.ramblock,
            )
        return fixed + self.offset_slots

    @classmethod
    def unpack(
        cls,
        data: bytes,
        *,
        layout: PacketLayout = PacketLayout.V7_2,
        where: Where | None = None,
    ) -> MultiFDPacket:
        """Decode a header and make QEMU's structural checks (magic, version, counts)."""
        where = where or Where()
        base = where.offset or 0
        if len(data) != PACKET_HEADER_SIZE:
            raise WireError.bad_field(
                "packet header length", len(data), f"{PACKET_HEADER_SIZE} bytes", where
            )
        if layout is PacketLayout.V7_2:
            magic, version, flags, alloc, normal, size, num, _, ramblock = _HEAD_7_2.unpack_from(
                data
            )
            zero = 0
        else:
            magic, version, flags, alloc, normal, size, num, zero, _, _, ramblock = (
                _HEAD_9_0.unpack_from(data)
            )
        if magic != MULTIFD_MAGIC:
            raise WireError(
                f"multifd: received packet magic {magic:x} expected {MULTIFD_MAGIC:x}",
                where=where.at(base),
                field="magic",
                value=magic,
                expected=f"{MULTIFD_MAGIC:#x}",
            )
        if version != MULTIFD_VERSION:
            raise WireError(
                f"multifd: received packet version {version} expected {MULTIFD_VERSION}",
                where=where.at(base + 4),
                field="version",
                value=version,
                expected=str(MULTIFD_VERSION),
            )
        # A plain int: `~` on an IntFlag inverts only the defined bits, which
        # would let bits 0x80 and above through.
        known = int(PacketFlag.SYNC) | (
            COMPRESSION_MASK_7_2 if layout is PacketLayout.V7_2 else COMPRESSION_MASK
        )
        if flags & PacketFlag.DEVICE_STATE and layout is PacketLayout.V9_0:
            raise WireError(
                "device-state packet (MULTIFD_FLAG_DEVICE_STATE, QEMU 10.0+) is not supported",
                where=where.at(base + 8),
                field="flags",
                value=flags,
                expected="RAM packets only",
            )
        if flags & ~known:
            raise WireError.bad_field(
                "flags",
                flags,
                f"only bits {known:#x} (SYNC and compression)",
                where.at(base + 8),
            )
        if alloc > PAGES_PER_PACKET:
            raise WireError(
                f"multifd: received packet with size {alloc} and expected a size of "
                f"{PAGES_PER_PACKET}",
                where=where.at(base + 12),
                field="pages_alloc",
                value=alloc,
                expected=f"at most {PAGES_PER_PACKET}",
            )
        if normal > alloc:
            raise WireError(
                f"multifd: received packet with {normal} pages and expected maximum pages "
                f"are {alloc}",
                where=where.at(base + 16),
                field="normal_pages",
                value=normal,
                expected=f"at most pages_alloc ({alloc})",
            )
        if zero > alloc - normal:
            raise WireError(
                f"multifd: received packet with {zero} zero pages, expected maximum "
                f"{alloc - normal}",
                where=where.at(base + 32),
                field="zero_pages",
                value=zero,
                expected=f"at most {alloc - normal}",
            )
        return cls(
            flags=flags,
            pages_alloc=alloc,
            normal_pages=normal,
            next_packet_size=size,
            packet_num=num,
            ramblock=ramblock,
            offset_slots=bytes(data[HEADER_FIXED_SIZE:]),
            zero_pages=zero,
            layout=layout,
        )

    @property
    def is_sync(self) -> bool:
        return bool(self.flags & _SYNC)

    @property
    def page_count(self) -> int:
        return self.normal_pages + self.zero_pages

    @property
    def compression_bits(self) -> int:
        return self.flags & COMPRESSION_MASK

    def block_name(self, where: Where | None = None, offset: int | None = None) -> str:
        """The ramblock field up to its NUL (QEMU forces byte 255 to NUL); an
        error names `where`, at `offset` when given."""
        raw = self.ramblock[: RAMBLOCK_FIELD_SIZE - 1].split(b"\0", 1)[0]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            where = where or Where()
            if offset is not None:
                where = where.at(offset)
            raise WireError.bad_field("ramblock", raw, "UTF-8 text", where) from None

    def offsets(self) -> np.ndarray:
        """Every meaningful slot: normal pages first, then (9.0) zero pages."""
        return np.frombuffer(self.offset_slots, dtype=">u8", count=self.page_count)

    def payload_length(self, compression: Compression) -> int:
        """Bytes that follow the header. 7.2 derives it from normal_pages for `none`
        and ignores next_packet_size (which is stale in SYNC packets)."""
        if self.normal_pages == 0:
            return 0
        if compression is Compression.NONE:
            return self.normal_pages * TARGET_PAGE_SIZE
        return self.next_packet_size

    def check_pages(
        self,
        blocks: Mapping[str, int],
        compression: Compression,
        where: Where | None = None,
    ) -> tuple[str, np.ndarray]:
        """The checks QEMU makes before touching memory: compression method, known
        block, every offset inside it. Returns the block name and the offsets."""
        where = where or Where()
        base = where.offset or 0
        if self.page_count == 0:
            return "", np.empty(0, dtype=np.uint64)
        if self.compression_bits != compression.flag:
            raise WireError(
                # QEMU compares and prints the compression bits alone.
                f"multifd: flags received {self.compression_bits:#x} flags expected "
                f"{compression.flag:#x} "
                f"(multifd-compression is {compression.value})",
                where=where.at(base + 8),
                field="flags",
                value=self.flags,
                expected=f"compression {compression.value}",
            )
        name = self.block_name(where, base + 64)
        if name not in blocks:
            raise WireError(
                f"multifd: unknown ram block {name}",
                where=where.at(base + 64),
                field="ramblock",
                value=name,
                expected="a block of the MEM_SIZE list",
            )
        offsets = self.offsets().astype(np.uint64)
        limit = blocks[name] - TARGET_PAGE_SIZE
        if offsets.max() > limit:
            i = int(np.flatnonzero(offsets > limit)[0])
            raise WireError(
                f"multifd: offset too long: offset {int(offsets[i]):#x} beyond block "
                f'"{name}" (used_length {blocks[name]:#x})',
                where=where.at(base + HEADER_FIXED_SIZE + 8 * i),
                field=f"offset[{i}]",
                value=int(offsets[i]),
                expected=f"at most {limit:#x}",
            )
        if compression is not Compression.NONE and self.next_packet_size > MAX_COMPRESSED_PAYLOAD:
            raise WireError.bad_field(
                "next_packet_size",
                self.next_packet_size,
                f"at most {MAX_COMPRESSED_PAYLOAD} bytes of compressed pages",
                where.at(base + 20),
            )
        return name, offsets


# magic, version, flags, pages_alloc, normal_pages, next_packet_size, packet_num
_HEAD_START = struct.Struct(">IIIIIIQ")
_RAMBLOCK_AT = HEADER_FIXED_SIZE - RAMBLOCK_FIELD_SIZE


def _header_dtype(layout: PacketLayout) -> np.dtype:
    """One packet header as a numpy record: the struct layouts above, field by field."""
    fields: list = [
        ("magic", ">u4"),
        ("version", ">u4"),
        ("flags", ">u4"),
        ("pages_alloc", ">u4"),
        ("normal_pages", ">u4"),
        ("next_packet_size", ">u4"),
        ("packet_num", ">u8"),
    ]
    if layout is PacketLayout.V7_2:
        fields.append(("unused", "V32"))
    else:
        fields += [("zero_pages", ">u4"), ("unused", "V28")]
    fields += [("ramblock", f"S{RAMBLOCK_FIELD_SIZE}"), ("offsets", ">u8", (PAGES_PER_PACKET,))]
    dtype = np.dtype(fields)
    assert dtype.itemsize == PACKET_HEADER_SIZE
    return dtype


_HEADER_DTYPES = {layout: _header_dtype(layout) for layout in PacketLayout}


def page_packet_headers(
    block: str,
    offsets: np.ndarray,
    first_packet_num: int,
    *,
    flags: int,
    payload_sizes: np.ndarray | None = None,
    layout: PacketLayout = PacketLayout.V7_2,
) -> np.ndarray:
    """The headers of the data packets that carry the normal pages at byte
    `offsets`, PAGES_PER_PACKET to a packet (the last may hold fewer), numbered
    from `first_packet_num`: one (packets, PACKET_HEADER_SIZE) uint8 array,
    each row what `MultiFDPacket.for_pages(...).pack()` gives for its packet.
    `payload_sizes` (one per packet) default to the pages' bytes, uncompressed.

    A batch at a time: building packet objects one by one cost more Python
    than the kernel spends moving a packet's pages."""
    offsets = np.asarray(offsets, dtype=np.uint64)
    n = len(offsets)
    if not n:
        raise ValueError("a data packet needs at least one page")
    count = -(-n // PAGES_PER_PACKET)
    headers = _full_packet_headers(block, count, flags, layout).copy()
    headers["packet_num"] += np.uint64(first_packet_num)
    full = n // PAGES_PER_PACKET
    slots = headers["offsets"]
    slots[:full] = offsets[: full * PAGES_PER_PACKET].reshape(full, PAGES_PER_PACKET)
    if full < count:  # a last packet of fewer pages
        rest = n - full * PAGES_PER_PACKET
        slots[full, :rest] = offsets[full * PAGES_PER_PACKET :]
        headers["normal_pages"][full] = rest
        headers["next_packet_size"][full] = rest * TARGET_PAGE_SIZE
    if payload_sizes is not None:
        headers["next_packet_size"] = payload_sizes
    return headers.view(np.uint8).reshape(count, PACKET_HEADER_SIZE)


@functools.lru_cache(maxsize=64)
def _full_packet_headers(block: str, count: int, flags: int, layout: PacketLayout) -> np.ndarray:
    """`count` headers of full packets of uncompressed pages of `block`,
    numbered from 0, with no offsets yet: what page_packet_headers copies and
    completes (filling every field for every batch cost as much as the rest
    of a channel's Python per batch)."""
    headers = np.zeros(count, dtype=_HEADER_DTYPES[layout])
    headers["magic"] = MULTIFD_MAGIC
    headers["version"] = MULTIFD_VERSION
    headers["flags"] = flags
    headers["pages_alloc"] = PAGES_PER_PACKET
    headers["normal_pages"] = PAGES_PER_PACKET
    headers["next_packet_size"] = PAGES_PER_PACKET * TARGET_PAGE_SIZE
    headers["packet_num"] = np.arange(count, dtype=np.uint64)
    headers["ramblock"] = block.encode("utf-8")
    headers.flags.writeable = False  # a shared template: copied, never changed
    return headers


def plain_pages_header(header: bytes | bytearray) -> tuple[int, int, bytes] | None:
    """The receiver's shortcut for the common packet: an uncompressed packet of
    normal pages in the 7.2 layout, with no flag set and counts QEMU accepts.
    Returns (normal_pages, packet_num, raw ramblock field), or None for
    anything else: `unpack` and `check_pages` then decide, and name what is
    wrong. The offsets are still the caller's to check against the block
    (`check_pages` does that on the full path)."""
    magic, version, flags, alloc, normal, _, num = _HEAD_START.unpack_from(header)
    if (
        magic != MULTIFD_MAGIC
        or version != MULTIFD_VERSION
        or flags
        or alloc > PAGES_PER_PACKET
        or not 0 < normal <= alloc
    ):
        return None
    return normal, num, bytes(header[_RAMBLOCK_AT:HEADER_FIXED_SIZE])


def read_packet(reader: Reader, *, layout: PacketLayout = PacketLayout.V7_2) -> MultiFDPacket:
    start = reader.offset
    header = reader.take(PACKET_HEADER_SIZE, "packet header")
    return MultiFDPacket.unpack(header, layout=layout, where=reader.where.at(start))
