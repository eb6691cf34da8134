"""Zero-page detection: which pages of a batch are all zero bytes, so that they
travel as a flag instead of 4096 bytes (QEMU's RAM_SAVE_FLAG_ZERO / zero_pages)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from .block import RAMBlock

# Gathering scattered pages copies them; 1024 pages (4 MiB) bounds that copy.
_CHUNK_PAGES = 1024


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
        zero[candidates] = np.bitwise_or.reduce(rows[candidates], axis=1) == 0
    return zero


def zero_mask(block: RAMBlock, indices: npt.ArrayLike | None = None) -> npt.NDArray[np.bool_]:
    """For each page index in `indices` (default: every page), whether it is all zero.

    The result has one bool per index, in the order given. Pages are viewed as
    rows of 512 uint64 and OR-reduced per row, whole batches at a time.
    """
    rows = block.page_rows(np.uint64)
    if indices is None:
        mask = np.empty(block.pages, dtype=np.bool_)
        for first in range(0, block.pages, _CHUNK_PAGES):
            mask[first : first + _CHUNK_PAGES] = _zero_rows(rows[first : first + _CHUNK_PAGES])
        return mask
    pages = np.asarray(indices, dtype=np.int64).reshape(-1)
    if pages.size == 0:
        return np.empty(0, dtype=np.bool_)
    low, high = int(pages.min()), int(pages.max())
    if low < 0 or high >= block.pages:
        raise IndexError(
            f"RAMBlock {block.name!r}: zero check of pages {low}..{high} "
            f"outside 0..{block.pages - 1}"
        )
    # A run of adjacent pages (the common batch) is checked in place, without a copy.
    if high - low + 1 == pages.size and pages[0] == low and np.all(np.diff(pages) == 1):
        return _zero_rows(rows[low : high + 1])
    mask = np.empty(pages.size, dtype=np.bool_)
    for first in range(0, pages.size, _CHUNK_PAGES):
        chunk = pages[first : first + _CHUNK_PAGES]
        mask[first : first + chunk.size] = _zero_rows(rows[chunk])
    return mask
