"""XBZRLE page deltas: runs of unchanged bytes and runs of new bytes (QEMU xbzrle.c).

The delta applies to the destination's current copy of the page, so decoding
takes that page and rewrites it in place.
"""

from __future__ import annotations

from .errors import Where, WireError


def _uleb128_small(src: bytes, i: int) -> tuple[int, int]:
    """A 1- or 2-byte ULEB128 value (below 2**14) and the bytes it took."""
    first = src[i]
    if not first & 0x80:
        return first, 1
    second = src[i + 1]
    if second & 0x80:
        return -1, 0
    return (first & 0x7F) | (second << 7), 2


def apply_xbzrle(encoded: bytes, page: memoryview, where: Where | None = None) -> None:
    """Rewrite `page` with the delta `encoded`, refusing any run that overflows."""
    where = where or Where()
    src_len, dst_len = len(encoded), len(page)
    i = d = 0
    while i < src_len:
        if src_len - i < 2:
            raise WireError("XBZRLE delta ends inside a zero run", where=where)
        count, used = _uleb128_small(encoded, i)
        if used == 0 or (i and not count):
            raise WireError(f"XBZRLE delta: bad zero run at byte {i}", where=where)
        i += used
        d += count
        if d > dst_len or src_len - i < 2:
            raise WireError(f"XBZRLE delta: zero run overflows the page at byte {i}", where=where)
        count, used = _uleb128_small(encoded, i)
        if used == 0 or not count:
            raise WireError(f"XBZRLE delta: bad data run at byte {i}", where=where)
        i += used
        if d + count > dst_len or i + count > src_len:
            raise WireError(f"XBZRLE delta: data run overflows at byte {i}", where=where)
        page[d : d + count] = encoded[i : i + count]
        d += count
        i += count
