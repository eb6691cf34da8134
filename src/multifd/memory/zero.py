"""Zero-page detection: which pages of a batch are all zero bytes, so that they
travel as a flag instead of 4096 bytes (QEMU's RAM_SAVE_FLAG_ZERO / zero_pages)."""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt

from .block import PAGE_SIZE, RAMBlock

# Pages per step of a whole-block scan.
_CHUNK_PAGES = 1024
# Scattered pages are gathered through one small buffer per thread, reused,
# never a copy of the whole batch: a quarter of a GiB checked at random took
# 67-91 ms that way and takes 16-21 ms this way (contiguous batches, checked in
# place after the first-word filter, are no faster or slower for it).
_GATHER_PAGES = 256
_scratch = threading.local()


def is_zero_rows(
    rows: npt.NDArray[np.uint64], pages: npt.NDArray[np.intp]
) -> npt.NDArray[np.bool_]:
    """Whether each row of `rows` listed in `pages` (indices known to be in
    range) is all zero, gathered `_GATHER_PAGES` rows at a time."""
    buffer: npt.NDArray[np.uint64] | None = getattr(_scratch, "buffer", None)
    if buffer is None:
        buffer = _scratch.buffer = np.empty((_GATHER_PAGES, PAGE_SIZE // 8), dtype=np.uint64)
    zero = np.empty(len(pages), dtype=np.bool_)
    for first in range(0, len(pages), _GATHER_PAGES):
        chunk = pages[first : first + _GATHER_PAGES]
        # mode="clip": with "raise", numpy gathers into a temporary and copies
        # it into `out` again; the indices are in range here.
        gathered = np.take(rows, chunk, axis=0, out=buffer[: len(chunk)], mode="clip")
        np.equal(np.bitwise_or.reduce(gathered, axis=1), 0, out=zero[first : first + len(chunk)])
    return zero


def _zero_rows(rows: npt.NDArray[np.uint64]) -> npt.NDArray[np.bool_]:
    # A page whose first word is not zero is not a zero page: reading that word
    # reads one cache line of the page. Only the rest are read in full. On
    # mostly random data that reads a fraction of the memory a full scan does,
    # and memory bandwidth, not arithmetic, is what the scan waits for.
    candidates = np.flatnonzero(rows[:, 0] == 0)
    if 2 * len(candidates) > len(rows):  # mostly zero: in place beats gathering
        zero: npt.NDArray[np.bool_] = np.bitwise_or.reduce(rows, axis=1) == 0
        return zero
    zero = np.zeros(len(rows), dtype=np.bool_)
    if len(candidates):
        zero[candidates] = is_zero_rows(rows, candidates)
    return zero


def zero_mask(
    block: RAMBlock, indices: npt.ArrayLike | range | None = None
) -> npt.NDArray[np.bool_]:
    """For each page index in `indices` (default: every page), whether it is all zero.

    The result has one bool per index, in the order given. Pages are viewed as
    rows of 512 uint64 and OR-reduced per row, whole batches at a time. A
    `range` of step 1 is checked in place with no numpy call on the indices:
    each of those (on more than 500 values) lets go of the GIL, and a thread
    that takes it meanwhile keeps the caller waiting.
    """
    rows = block.page_rows(np.uint64)
    if indices is None:
        indices = range(block.pages)
    if isinstance(indices, range) and indices.step == 1:
        first, stop = indices.start, indices.stop
        if first >= stop:
            return np.empty(0, dtype=np.bool_)
        if first < 0 or stop > block.pages:
            raise IndexError(
                f"RAMBlock {block.name!r}: zero check of pages {first}..{stop - 1} "
                f"outside 0..{block.pages - 1}"
            )
        if stop - first <= _CHUNK_PAGES:
            return _zero_rows(rows[first:stop])
        mask = np.empty(stop - first, dtype=np.bool_)
        for start in range(first, stop, _CHUNK_PAGES):
            end = min(start + _CHUNK_PAGES, stop)
            mask[start - first : end - first] = _zero_rows(rows[start:end])
        return mask
    pages = np.asarray(indices, dtype=np.int64).reshape(-1)
    if pages.size == 0:
        return np.empty(0, dtype=np.bool_)
    # argmin/argmax and an index: a third of what a reduction costs per call.
    low, high = int(pages[pages.argmin()]), int(pages[pages.argmax()])
    if low < 0 or high >= block.pages:
        raise IndexError(
            f"RAMBlock {block.name!r}: zero check of pages {low}..{high} "
            f"outside 0..{block.pages - 1}"
        )
    # A run of adjacent pages (the common batch) is checked in place, without a copy.
    if high - low + 1 == pages.size and pages[0] == low and np.all(np.diff(pages) == 1):
        return _zero_rows(rows[low : high + 1])
    # Scattered pages: their first words, then the candidates in full; never
    # a copy of the whole batch.
    pages = pages.astype(np.intp, copy=False)
    mask = np.zeros(pages.size, dtype=np.bool_)
    candidates = np.flatnonzero(rows[pages, 0] == 0)
    if len(candidates):
        mask[candidates] = is_zero_rows(rows, pages[candidates])
    return mask
