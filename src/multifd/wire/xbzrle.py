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


def apply_xbzrle(
    encoded: bytes, page: memoryview, where: Where | None = None, what: str = "XBZRLE delta"
) -> None:
    """Rewrite `page` with the delta `encoded`, refusing any run that overflows.

    `where` is the position of the delta's first byte and `what` names the page
    (block and offset), so that an error says which page of the stream was bad.
    """
    where = where or Where()
    src_len, dst_len = len(encoded), len(page)
    i = d = 0

    def bad(problem: str, at: int) -> WireError:
        located = where if where.offset is None else where.at(where.offset + at)
        return WireError(f"{what}: {problem} at byte {at} of {src_len}", where=located)

    while i < src_len:
        if src_len - i < 2:
            raise bad("ends inside a zero run", i)
        count, used = _uleb128_small(encoded, i)
        if used == 0 or (i and not count):
            raise bad("bad zero run", i)
        i += used
        d += count
        if d > dst_len:
            raise bad(f"zero run overflows the page (to {d} of {dst_len})", i - used)
        if src_len - i < 2:
            raise bad("ends before a data run", i)
        count, used = _uleb128_small(encoded, i)
        if used == 0 or not count:
            raise bad("bad data run", i)
        i += used
        if d + count > dst_len:
            raise bad(f"data run overflows the page (to {d + count} of {dst_len})", i - used)
        if i + count > src_len:
            raise bad(f"data run of {count} bytes runs past the delta's end", i - used)
        page[d : d + count] = encoded[i : i + count]
        d += count
        i += count
