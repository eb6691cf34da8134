"""Splitting opaque device state into its FULL sections, with the vmdesc tail.

A device section's length is not on the wire: only its vmstate layout knows it.
QEMU streams end with EOF, then the vmdesc JSON; every FULL section ends with a
footer ``7e <section id>``. Knowing where the tail begins (from its length
field) and which device comes next (from the JSON's device list, in stream
order) pins every boundary without knowing any device layout (spec 1.6).
"""

from __future__ import annotations

import json
import struct

from .errors import Where, WireError
from .reader import Reader, decode_name
from .source import BufferSource
from .stream import (
    DeviceState,
    EndOfFile,
    RecordType,
    SectionFooter,
    SectionStart,
    VMDescription,
)

_FOOTER = struct.Struct(">BI")
_LAST = ("", -1)  # "the section after this one is EOF"


def find_vmdesc_tail(blob: bytes) -> int | None:
    """Index of the EOF byte when `blob` ends with EOF, VMDESCRIPTION and its JSON."""
    # The JSON is ASCII and starts with '{'; walk back over candidate lengths.
    end = len(blob)
    pos = blob.rfind(b"\x00\x06", 0, end - 5)
    while pos >= 0:
        length = int.from_bytes(blob[pos + 2 : pos + 6], "big")
        if pos + 6 + length == end and blob[pos + 6 : pos + 7] == b"{":
            return pos
        pos = blob.rfind(b"\x00\x06", 0, pos)
    return None


def ends_with_vmdesc(blob: bytes) -> bool:
    """Whether `blob` ends with EOF, VMDESCRIPTION and a whole JSON document: the
    end of a main stream, even while its sender keeps the connection open."""
    if not blob.endswith(b"}"):
        return False
    eof_at = find_vmdesc_tail(blob)
    if eof_at is None:
        return False
    try:
        json.loads(blob[eof_at + 6 :])
    except ValueError:
        return False
    return True


def expected_devices(vmdesc: VMDescription | None) -> list[tuple[str, int]] | None:
    """(name, instance_id) of every device in the vmdesc, in stream order."""
    if vmdesc is None:
        return None
    try:
        devices = json.loads(vmdesc.json)["devices"]
        return [(str(d["name"]), int(d["instance_id"])) for d in devices]
    # The JSON comes off the wire: Infinity as an instance id (OverflowError) or
    # deep nesting (RecursionError) must mean "no usable list", not a crash.
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None


def _header_at(blob: bytes, pos: int) -> SectionStart | None:
    """The FULL section header at `pos`, if the bytes there look like one."""
    if pos + 6 > len(blob) or blob[pos] != RecordType.SECTION_FULL:
        return None
    length = blob[pos + 5]
    end = pos + 6 + length + 8
    if length == 0 or end > len(blob):
        return None
    raw = blob[pos + 6 : pos + 6 + length]
    if not all(0x20 <= c < 0x7F for c in raw):
        return None
    section_id = int.from_bytes(blob[pos + 1 : pos + 5], "big")
    instance_id = int.from_bytes(blob[pos + 6 + length : pos + 10 + length], "big")
    version_id = int.from_bytes(blob[pos + 10 + length : end], "big")
    return SectionStart(section_id, raw.decode("ascii"), instance_id, version_id, full=True)


def split_device_state(
    blob: bytes, where: Where | None = None
) -> list[DeviceState | SectionFooter | EndOfFile | VMDescription]:
    """Split everything from the first opaque FULL section to the end of the stream.

    `blob` starts at a FULL section's type byte and runs to the end of the main
    stream. Returns the records in order: device states with their footers,
    EOF, and the vmdesc when present.
    """
    where = where or Where()
    base = where.offset or 0
    eof_at = find_vmdesc_tail(blob)
    vmdesc: VMDescription | None = None
    if eof_at is not None:
        vmdesc = VMDescription(blob[eof_at + 6 :])
    elif blob[-1:] == b"\x00":
        eof_at = len(blob) - 1
    else:
        raise WireError(
            "device state does not end with QEMU_VM_EOF (and an optional vmdesc JSON)",
            where=where.at(base + len(blob)),
            field="end of stream",
            value=blob[-8:],
            expected="00, or 00 06 <len> <JSON>",
        )
    names = expected_devices(vmdesc)
    records: list[DeviceState | SectionFooter | EndOfFile | VMDescription] = []
    pos = 0
    index = 0
    while pos < eof_at:
        at = where.at(base + pos)
        if blob[pos] != RecordType.SECTION_FULL:
            raise WireError.bad_field(
                "record type", blob[pos], "0x04 (SECTION_FULL) among device state", at
            )
        # Parse the header strictly, so a bad one gets a precise message.
        reader = Reader(BufferSource(blob[pos + 1 : eof_at]), where, base + pos + 1)
        section_id = reader.be32("section id")
        name_len_at = reader.where
        name_len = reader.u8("idstr length")
        idstr = decode_name(reader.take(name_len, "idstr"), "idstr", name_len_at)
        instance_id = reader.be32("instance id")
        version_id = reader.be32("version id")
        header = SectionStart(section_id, idstr, instance_id, version_id, full=True)
        body_at = pos + 1 + (reader.offset - (base + pos + 1))
        footer = _FOOTER.pack(RecordType.SECTION_FOOTER, section_id)
        want = None
        if names is not None and (idstr, instance_id) in names[index:]:
            index = names.index((idstr, instance_id), index)
            want = names[index + 1] if index + 1 < len(names) else _LAST
        end = _find_footer(blob, body_at, eof_at, footer, want)
        if end is None:
            raise WireError(
                f'device section "{idstr}" (id {section_id}): no footer 7e {section_id:08x} '
                "followed by the next device or EOF",
                where=where.at(base + body_at),
                field="section footer",
                value=section_id,
                expected="a footer before the next section",
            )
        records.append(DeviceState(header, blob[body_at:end]))
        records.append(SectionFooter(section_id))
        pos = end + 5
    records.append(EndOfFile())
    if vmdesc is not None:
        records.append(vmdesc)
    return records


def _find_footer(
    blob: bytes, start: int, eof_at: int, footer: bytes, want: tuple[str, int] | None
) -> int | None:
    """The footer that ends a section: the first one followed by what the vmdesc
    says comes next (`want`; `_LAST` for EOF), else the first one followed by EOF
    or a plausible FULL header."""
    fallback: int | None = None
    pos = blob.find(footer, start, eof_at)
    while pos >= 0:
        after = pos + len(footer)
        header = _header_at(blob, after) if after != eof_at else None
        plausible = after == eof_at or header is not None
        if want is None and plausible:
            return pos
        if want is _LAST and after == eof_at:
            return pos
        if header is not None and (header.idstr, header.instance_id) == want:
            return pos
        if plausible and fallback is None:
            fallback = pos
        pos = blob.find(footer, pos + 1, eof_at)
    return fallback
