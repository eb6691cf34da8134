"""Records of the iterable ``ram`` section (spec section 2).

Each record starts with a be64 whose low 12 bits are RAM_SAVE_FLAG_* and whose
high bits are a byte offset inside a RAMBlock. Which block a page belongs to is
either named (a counted string) or, with CONTINUE, "the same as the previous
page record": that state spans sections, so it lives in `RamStreamState`.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntFlag

import numpy as np

from .errors import Where, WireError
from .profile import TARGET_PAGE_SIZE, WireProfile
from .reader import Reader, be16, be32, be64, counted_string

RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION = 4
FLAG_MASK = TARGET_PAGE_SIZE - 1
# compressBound(TARGET_PAGE_SIZE): the largest COMPRESS_PAGE payload QEMU takes.
MAX_COMPRESSED_PAGE = 4096 + (4096 >> 12) + (4096 >> 14) + (4096 >> 25) + 13
# A block list longer than this is not a VM: refuse it before reading on.
MAX_RAM_BLOCKS = 4096


class RamFlag(IntFlag):
    FULL = 0x01
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80
    COMPRESS_PAGE = 0x100
    MULTIFD_FLUSH = 0x200


# Plain ints for the per-record path: IntFlag arithmetic costs microseconds.
_ZERO, _MEM_SIZE, _PAGE, _EOS, _CONTINUE = 0x02, 0x04, 0x08, 0x10, 0x20
_XBZRLE, _HOOK, _COMPRESS_PAGE, _FLUSH = 0x40, 0x80, 0x100, 0x200
# One CONTINUE ZERO record: be64 offset|flags, then the fill byte.
_ZERO_RECORD = np.dtype([("header", ">u8"), ("fill", "u1")])
ENCODING_FLAG_XBZRLE = 0x01


@dataclass(frozen=True)
class RamBlockEntry:
    """One block of the MEM_SIZE list."""

    name: str
    used_length: int
    page_size: int | None = None  # sent only for postcopy with a non-host page size
    addr: int | None = None  # guest physical address, sent only with x-ignore-shared

    def pack(self) -> bytes:
        out = counted_string(self.name) + be64(self.used_length)
        if self.page_size is not None:
            out += be64(self.page_size)
        if self.addr is not None:
            out += be64(self.addr)
        return out


@dataclass(frozen=True)
class MemSize:
    """RAM_SAVE_FLAG_MEM_SIZE: the block list, first thing of the setup section."""

    blocks: tuple[RamBlockEntry, ...]

    @property
    def total(self) -> int:
        return sum(b.used_length for b in self.blocks)

    def pack(self) -> bytes:
        return be64(self.total | _MEM_SIZE) + b"".join(b.pack() for b in self.blocks)


def _page_header(flag: int, block: str, offset: int, continued: bool) -> bytes:
    if continued:
        return be64(offset | flag | _CONTINUE)
    return be64(offset | flag) + counted_string(block)


@dataclass(frozen=True)
class ZeroPage:
    """RAM_SAVE_FLAG_ZERO: a page whose every byte is `fill` (QEMU sends 0)."""

    block: str
    offset: int
    fill: int = 0
    continued: bool = False

    def pack(self) -> bytes:
        return _page_header(_ZERO, self.block, self.offset, self.continued) + bytes([self.fill])


@dataclass(frozen=True)
class ZeroPageRun:
    """Many CONTINUE ZERO records in a row (fill 0), decoded at once.

    Not a record type of its own on the wire: the decoder emits it instead of
    single `ZeroPage`s when it can see the records already buffered, so a
    destination applies thousands of zero pages with one numpy operation.
    """

    block: str
    offsets: np.ndarray  # byte offsets, uint64

    def pack(self) -> bytes:
        return encode_zero_pages(self.block, self.offsets, continued=True)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ZeroPageRun)
            and other.block == self.block
            and np.array_equal(other.offsets, self.offsets)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Page:
    """RAM_SAVE_FLAG_PAGE: one page of raw bytes on the main channel."""

    block: str
    offset: int
    data: bytes
    continued: bool = False

    def pack(self) -> bytes:
        return _page_header(_PAGE, self.block, self.offset, self.continued) + self.data


@dataclass(frozen=True)
class XbzrlePage:
    """RAM_SAVE_FLAG_XBZRLE: a page delta against the destination's cache."""

    block: str
    offset: int
    encoded: bytes
    continued: bool = False

    def pack(self) -> bytes:
        return (
            _page_header(_XBZRLE, self.block, self.offset, self.continued)
            + bytes([ENCODING_FLAG_XBZRLE])
            + be16(len(self.encoded))
            + self.encoded
        )


@dataclass(frozen=True)
class CompressedPage:
    """RAM_SAVE_FLAG_COMPRESS_PAGE: a zlib-compressed page (old `compress` capability)."""

    block: str
    offset: int
    compressed: bytes
    continued: bool = False

    def pack(self) -> bytes:
        return (
            _page_header(_COMPRESS_PAGE, self.block, self.offset, self.continued)
            + be32(len(self.compressed))
            + self.compressed
        )

    def decompress(self, where: Where | None = None) -> bytes:
        """The page; QEMU inflates into the page itself, so a stream that would
        give more than a page is refused without inflating the rest."""
        what = f'compressed page {self.offset:#x} of block "{self.block}"'
        inflater = zlib.decompressobj()
        try:
            page = inflater.decompress(self.compressed, TARGET_PAGE_SIZE)
        except zlib.error as exc:
            raise WireError(f"{what}: {exc}", where=where) from None
        if not inflater.eof:
            problem = (
                f"inflates to more than a page of {TARGET_PAGE_SIZE} bytes"
                if inflater.unconsumed_tail
                else f"zlib stream is cut short (it gave {len(page)} bytes and no end)"
            )
            raise WireError(f"{what}: {problem} (QEMU: decompress data failed)", where=where)
        if len(page) != TARGET_PAGE_SIZE:
            raise WireError(
                f"{what}: decompressed to {len(page)} bytes, not {TARGET_PAGE_SIZE}", where=where
            )
        return page


@dataclass(frozen=True)
class Hook:
    """RAM_SAVE_FLAG_HOOK: an RDMA control point; carries nothing."""

    def pack(self) -> bytes:
        return be64(_HOOK)


@dataclass(frozen=True)
class EndOfSection:
    """RAM_SAVE_FLAG_EOS: the end of this section's RAM data (a sync point in 7.2)."""

    def pack(self) -> bytes:
        return be64(_EOS)


@dataclass(frozen=True)
class MultifdFlush:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH (8.1+): every multifd channel syncs here."""

    def pack(self) -> bytes:
        return be64(_FLUSH)


RamRecord = (
    MemSize
    | ZeroPage
    | ZeroPageRun
    | Page
    | XbzrlePage
    | CompressedPage
    | Hook
    | EndOfSection
    | MultifdFlush
)
PageRecord = ZeroPage | Page | XbzrlePage | CompressedPage


@dataclass
class RamStreamState:
    """What the `ram` decoder remembers across records and sections.

    `blocks` comes from the MEM_SIZE list (name → used_length); `last_block` is
    QEMU's last_recv_block, which is not reset at section boundaries.
    `page_size_blocks` names the blocks whose MEM_SIZE entry carries a page size
    (postcopy with a non-host page size); `ignore_shared` adds the address field.
    """

    profile: WireProfile | None = None
    page_size_blocks: frozenset[str] = frozenset()
    ignore_shared: bool = False
    blocks: dict[str, int] = field(default_factory=dict)
    last_block: str | None = None

    def read_record(self, reader: Reader) -> RamRecord:
        start = reader.offset
        header = reader.be64("RAM record header")
        flags = header & FLAG_MASK
        addr = header & ~FLAG_MASK
        kind = flags & ~_CONTINUE
        if kind == _ZERO:
            block = self._read_block(reader, flags, start)
            self._check_offset(reader, block, addr, start)
            fill = reader.u8("zero page fill byte")
            if fill and self.profile is not None and self.profile.zero_fill_must_be_zero:
                raise WireError(
                    f"Found a zero page with value {fill}", where=reader.where_at(start)
                )
            return ZeroPage(block, addr, fill, flags == _ZERO | _CONTINUE)
        if kind == _MEM_SIZE:
            return self._read_mem_size(reader, addr)
        if kind == _EOS:
            return EndOfSection()
        if kind == _FLUSH and (self.profile is None or self.profile.flush):
            return MultifdFlush()
        if kind == _HOOK:
            return Hook()
        if kind not in (_PAGE, _XBZRLE, _COMPRESS_PAGE):
            raise WireError(
                f"Unknown combination of migration flags: {flags:#x}",
                where=reader.where_at(start),
                field="flags",
                value=flags,
                expected="one of ZERO, MEM_SIZE, PAGE, EOS, XBZRLE, COMPRESS_PAGE, HOOK",
            )

        block = self._read_block(reader, flags, start)
        self._check_offset(reader, block, addr, start)
        continued = bool(flags & _CONTINUE)
        if kind == _PAGE:
            return Page(block, addr, reader.take(TARGET_PAGE_SIZE, "page data"), continued)
        if kind == _XBZRLE:
            encoding = reader.u8("XBZRLE encoding flag")
            if encoding != ENCODING_FLAG_XBZRLE:
                raise WireError.bad_field(
                    "XBZRLE encoding flag", encoding, "0x01", reader.where.at(reader.offset - 1)
                )
            length = reader.be16("XBZRLE length")
            if length > TARGET_PAGE_SIZE:
                raise WireError.bad_field(
                    "XBZRLE length", length, "at most 4096 (len overflow)", reader.where
                )
            return XbzrlePage(block, addr, reader.take(length, "XBZRLE data"), continued)
        length = reader.be32("compressed page length")
        if not 0 < length <= MAX_COMPRESSED_PAGE:
            raise WireError.bad_field(
                "compressed page length", length, f"1 to {MAX_COMPRESSED_PAGE}", reader.where
            )
        return CompressedPage(block, addr, reader.take(length, "compressed page"), continued)

    def read_zero_run(self, reader: Reader, buffered: memoryview) -> ZeroPageRun | None:
        """The CONTINUE ZERO records (fill 0) at the start of `buffered`, bytes
        the source already holds, as one run; None if fewer than two are there."""
        if self.last_block is None:
            return None
        count = len(buffered) // _ZERO_RECORD.itemsize
        if count < 2:
            return None
        records = np.frombuffer(buffered, dtype=_ZERO_RECORD, count=count)
        header = records["header"]
        matches = ((header & np.uint64(FLAG_MASK)) == (_ZERO | _CONTINUE)) & (records["fill"] == 0)
        run = count if matches.all() else int(np.argmin(matches))
        if run < 2:
            return None
        offsets = header[:run] & ~np.uint64(FLAG_MASK)
        limit = self.blocks[self.last_block]
        beyond = np.flatnonzero(offsets >= limit)
        if len(beyond):
            # Consume up to the bad record so the error names its exact position.
            first = int(beyond[0])
            reader.take(first * _ZERO_RECORD.itemsize, "zero page records")
            self._check_offset(reader, self.last_block, int(offsets[first]), reader.offset)
        reader.take(run * _ZERO_RECORD.itemsize, "zero page records")
        return ZeroPageRun(self.last_block, offsets.astype(np.uint64))

    def _check_offset(self, reader: Reader, block: str, addr: int, start: int) -> None:
        if addr >= self.blocks[block]:
            raise WireError(
                f"Illegal RAM offset {addr:#x} in block {block!r} "
                f"(used_length {self.blocks[block]:#x})",
                where=reader.where_at(start),
                field="offset",
                value=addr,
                expected=f"below {self.blocks[block]:#x}",
            )

    def _read_block(self, reader: Reader, flags: int, start: int) -> str:
        if flags & _CONTINUE:
            if self.last_block is None:
                raise WireError(
                    "RAM_SAVE_FLAG_CONTINUE with no previous block "
                    "(QEMU: 'Ack, bad migration stream!')",
                    where=reader.where_at(start),
                )
            return self.last_block
        name_at = reader.offset
        name = reader.counted_string("RAM block name")
        if name not in self.blocks:
            raise WireError(
                f'Unknown ramblock "{name}", cannot load'
                + ("" if self.blocks else " (no MEM_SIZE block list was received)"),
                where=reader.where_at(name_at),
                field="RAM block name",
                value=name,
                expected="a block of the MEM_SIZE list",
            )
        self.last_block = name
        return name

    def _read_mem_size(self, reader: Reader, total: int) -> MemSize:
        blocks: list[RamBlockEntry] = []
        seen = 0
        while seen < total:
            if len(blocks) >= MAX_RAM_BLOCKS:
                raise WireError(
                    f"MEM_SIZE block list longer than {MAX_RAM_BLOCKS} blocks", where=reader.where
                )
            at = reader.where
            name = reader.counted_string("RAM block name")
            used_length = reader.be64(f"used_length of block {name!r}")
            page_size = (
                reader.be64(f"page size of block {name!r}")
                if name in self.page_size_blocks
                else None
            )
            addr = reader.be64(f"address of block {name!r}") if self.ignore_shared else None
            if name in (b.name for b in blocks):
                raise WireError.bad_field("RAM block name", name, "each block listed once", at)
            if used_length == 0 or used_length % TARGET_PAGE_SIZE:
                raise WireError.bad_field(
                    f"used_length of block {name!r}",
                    used_length,
                    "a non-zero multiple of 4096",
                    at,
                )
            seen += used_length
            if seen > total:
                raise WireError(
                    f"MEM_SIZE block lengths add up to {seen:#x}, beyond the announced "
                    f"total {total:#x} (at block {name!r})",
                    where=at,
                    field="MEM_SIZE total",
                    value=total,
                    expected=f"the sum of the block lengths, at least {seen:#x}",
                )
            blocks.append(RamBlockEntry(name, used_length, page_size, addr))
        self.blocks = {b.name: b.used_length for b in blocks}
        # A later MEM_SIZE may drop the block a CONTINUE would refer to: forget
        # it, so CONTINUE gets the "no previous block" error, not a KeyError.
        if self.last_block not in self.blocks:
            self.last_block = None
        return MemSize(tuple(blocks))


class RamRecordEncoder:
    """Builds page records the way a QEMU source does: CONTINUE when the block repeats."""

    def __init__(self) -> None:
        self.last_block: str | None = None

    def _continues(self, block: str) -> bool:
        same = block == self.last_block
        self.last_block = block
        return same

    def zero(self, block: str, offset: int) -> ZeroPage:
        return ZeroPage(block, offset, 0, self._continues(block))

    def page(self, block: str, offset: int, data: bytes) -> Page:
        return Page(block, offset, data, self._continues(block))


def block_table(entries: Mapping[str, int] | MemSize) -> dict[str, int]:
    """name → used_length, from a MEM_SIZE record or a mapping."""
    if isinstance(entries, MemSize):
        return {b.name: b.used_length for b in entries.blocks}
    return dict(entries)


def page_record_size(
    record: ZeroPage | ZeroPageRun | Page | XbzrlePage | CompressedPage,
) -> int:
    """Bytes a page record took on the main channel, header included: what
    QEMU counts as RAM transferred for it (ram_transferred_add)."""
    if isinstance(record, ZeroPageRun):
        return _ZERO_RECORD.itemsize * len(record.offsets)
    header = 8 if record.continued else 8 + len(counted_string(record.block))
    if isinstance(record, ZeroPage):
        return header + 1
    if isinstance(record, Page):
        return header + len(record.data)
    if isinstance(record, XbzrlePage):
        return header + 3 + len(record.encoded)  # the encoding byte, a be16 length
    return header + 4 + len(record.compressed)  # a be32 length


def encode_zero_pages(block: str, offsets: np.ndarray, *, continued: bool) -> bytes:
    """ZERO records for many pages of one block at once, as `ZeroPage.pack` would
    write them: the first names the block unless `continued`, the rest CONTINUE."""
    if not len(offsets):
        return b""
    records = np.empty(len(offsets), dtype=_ZERO_RECORD)
    records["header"] = offsets.astype(np.uint64) | np.uint64(_ZERO | _CONTINUE)
    records["fill"] = 0
    if continued:
        return records.tobytes()
    first = ZeroPage(block, int(offsets[0]), 0, False).pack()
    return first + records[1:].tobytes()
