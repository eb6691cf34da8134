"""Big-endian primitives over a `ByteSource`, with the byte offset kept for errors."""

from __future__ import annotations

import struct
from dataclasses import replace

from .errors import Where, WireError
from .source import ByteSource

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")


class Reader:
    """Pulls fields from a `ByteSource` and turns every short read into a `WireError`."""

    def __init__(self, source: ByteSource, where: Where | None = None, offset: int = 0) -> None:
        self.source = source
        self.offset = offset
        self._where = where or Where()

    @property
    def where(self) -> Where:
        return self._where.at(self.offset)

    def where_at(self, offset: int) -> Where:
        return self._where.at(offset)

    def set_context(self, **fields: object) -> None:
        """Name the section or packet being read, for the errors that follow."""
        self._where = replace(self._where, **fields)

    def take(self, n: int, what: str) -> bytes:
        start = self.offset
        try:
            data = self.source.read_exact(n)
        except EOFError as exc:
            raise WireError(
                f"truncated {what}: needs {n} bytes ({exc})", where=self._where.at(start)
            ) from None
        self.offset += n
        return data

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def be16(self, what: str) -> int:
        return _U16.unpack(self.take(2, what))[0]

    def be32(self, what: str) -> int:
        return _U32.unpack(self.take(4, what))[0]

    def be64(self, what: str) -> int:
        return _U64.unpack(self.take(8, what))[0]

    def counted_string(self, what: str) -> str:
        """A 1-byte length and that many bytes: QEMU's idstr encoding (1–255 bytes)."""
        start = self.offset
        raw = self.take(self.u8(what), what)
        if raw and raw.isascii() and b"\0" not in raw:
            return raw.decode("ascii")
        return decode_name(raw, what, self._where.at(start))


def decode_name(raw: bytes, what: str, where: Where) -> str:
    """An idstr as QEMU accepts it: 1–255 bytes of UTF-8 text without NUL."""
    if not raw:
        raise WireError.bad_field(f"{what} length", 0, "1 to 255 bytes", where)
    if b"\0" in raw:
        raise WireError.bad_field(what, raw, "no NUL byte inside a name", where)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError.bad_field(what, raw, "UTF-8 text", where) from None


def counted_string(name: str) -> bytes:
    """Encode an idstr as a counted string."""
    raw = name.encode("utf-8")
    if not 1 <= len(raw) <= 255 or b"\0" in raw:
        raise ValueError(f"name {name!r} must be 1 to 255 bytes of UTF-8 without NUL")
    return bytes([len(raw)]) + raw


def be16(value: int) -> bytes:
    return _U16.pack(value)


def be32(value: int) -> bytes:
    return _U32.pack(value)


def be64(value: int) -> bytes:
    return _U64.pack(value)
