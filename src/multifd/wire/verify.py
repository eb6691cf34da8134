"""Our verified-memory device section: one 64-bit hash per page of every block.

Sent only with the `x-verify` capability, after the last RAM round; its body
starts with a length-bearing layout (like app-state), so a Python destination
reads it as a known device and compares its own memory before resuming.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import Where, WireError
from .reader import Reader, counted_string
from .source import BufferSource
from .stream import MAX_DEVICE_STATE, SectionStart

VERIFY_IDSTR = "multifd/verify"
VERIFY_VERSION = 1
_HEAD = struct.Struct(">QI")  # hash-key seed, block count
_BLOCK = struct.Struct(">Q")  # pages in the block
# The hashes are 8 bytes per 4 KiB page: 256 MiB of them cover 128 GiB of RAM.
MAX_VERIFY_BLOCKS = 4096
_HASHES = np.dtype(">u8")


@dataclass(frozen=True)
class BlockHashes:
    name: str
    hashes: npt.NDArray[np.uint64]


@dataclass(frozen=True)
class VerifySection:
    """The seed both ends draw the hash keys from, and the source's page hashes."""

    seed: int
    blocks: tuple[BlockHashes, ...]

    def header(self, section_id: int) -> SectionStart:
        return SectionStart(section_id, VERIFY_IDSTR, 0, VERIFY_VERSION, full=True)

    def body(self) -> bytes:
        parts = [_HEAD.pack(self.seed, len(self.blocks))]
        for block in self.blocks:
            parts.append(counted_string(block.name))
            parts.append(_BLOCK.pack(len(block.hashes)))
            parts.append(block.hashes.astype(_HASHES).tobytes())
        return b"".join(parts)

    @classmethod
    def from_body(cls, body: bytes, where: Where | None = None) -> VerifySection:
        """Parse a section body. It is checked again here: after an opaque
        QEMU device section, ours come split from the stream's tail, unread.
        Error offsets count from `where.offset` (the body's first byte if None)."""
        where = where or Where()
        reader = Reader(BufferSource(body), where, where.offset or 0)
        read_verify(reader)
        used = reader.offset - (where.offset or 0)
        if used != len(body):
            raise WireError(
                f"verify section has {len(body) - used} bytes after its hashes",
                where=reader.where,
                field="verify section length",
                value=len(body),
                expected=str(used),
            )
        seed, count = _HEAD.unpack_from(body)
        pos = _HEAD.size
        blocks = []
        for _ in range(count):
            name_len = body[pos]
            name = body[pos + 1 : pos + 1 + name_len].decode()
            pos += 1 + name_len
            (pages,) = _BLOCK.unpack_from(body, pos)
            pos += _BLOCK.size
            hashes = np.frombuffer(body, dtype=_HASHES, count=pages, offset=pos)
            blocks.append(BlockHashes(name, hashes.astype(np.uint64)))
            pos += pages * 8
        return cls(seed, tuple(blocks))

    def vmdesc_entry(self) -> dict:
        return {
            "name": VERIFY_IDSTR,
            "instance_id": 0,
            "vmsd_name": VERIFY_IDSTR,
            "version": VERIFY_VERSION,
            "fields": [
                {"name": "seed", "type": "uint64", "size": 8},
                {"name": "blocks", "type": "uint32", "size": 4},
                {"name": "hashes", "type": "buffer", "size": len(self.body()) - _HEAD.size},
            ],
        }


def read_verify(reader: Reader) -> bytes:
    """A `DeviceReader` for the verify section: returns its raw body, bounded
    before anything is allocated (a block count or page count off the wire)."""
    head = reader.take(_HEAD.size, "verify header")
    _, count = _HEAD.unpack(head)
    if count > MAX_VERIFY_BLOCKS:
        raise WireError.bad_field(
            "verify block count", count, f"at most {MAX_VERIFY_BLOCKS}", reader.where
        )
    parts = [head]
    total = len(head)
    for _ in range(count):
        name = reader.counted_string("verify block name")
        pages = reader.be64("verify page count")
        total += 1 + len(name.encode()) + _BLOCK.size + pages * 8
        if total > MAX_DEVICE_STATE:
            raise WireError.bad_field(
                f'verify page count of block "{name}"',
                pages,
                f"hashes of at most {MAX_DEVICE_STATE} bytes in all",
                reader.where,
            )
        parts += [counted_string(name), _BLOCK.pack(pages), reader.take(pages * 8, "page hashes")]
    return b"".join(parts)
