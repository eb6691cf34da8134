"""Zero-page detection over whole batches against a known mask: contiguous runs,
scattered pages, the whole block, mostly zero or mostly data, and a single
non-zero byte anywhere in a page."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from memory_support import BlockMaker, MiB

from multifd.memory import PAGE_SIZE, is_zero_rows, zero_mask


@pytest.mark.parametrize("share", [0.4, 0.9], ids=["mostly-zero", "mostly-data"])
@pytest.mark.parametrize("kind", ["anonymous", "memfd", "bytearray"])
def test_zero_mask_matches_a_known_pattern(make_block: BlockMaker, kind: str, share: float) -> None:
    """Mostly zero pages are checked in place; mostly data pages by their first
    word, and in full only where it is zero (here most non-zero pages have
    their first word zero, the case that check must not get wrong)."""
    block = make_block(kind, 6 * MiB)  # more than one chunk of _CHUNK_PAGES
    rng = np.random.default_rng(3)
    nonzero = rng.random(block.pages) < share
    # One non-zero byte per chosen page, at any offset (also the first and last byte).
    offsets = rng.integers(0, PAGE_SIZE, block.pages)
    offsets[:2] = (0, PAGE_SIZE - 1)
    rows = block.page_rows()
    pages = np.flatnonzero(nonzero)
    rows[pages, offsets[pages]] = rng.integers(1, 256, pages.size)

    assert np.array_equal(zero_mask(block), ~nonzero)
    scattered = rng.permutation(block.pages)[:300]
    assert np.array_equal(zero_mask(block, scattered), ~nonzero[scattered])
    assert np.array_equal(zero_mask(block, np.arange(200, 328)), ~nonzero[200:328])
    many = np.arange(0, block.pages, 1)[::-1]  # more than one chunk, reversed order
    assert np.array_equal(zero_mask(block, many), ~nonzero[many])
    # Ranges: one chunk, more than one (ending mid-chunk), a stride (as indices).
    assert np.array_equal(zero_mask(block, range(200, 328)), ~nonzero[200:328])
    assert np.array_equal(zero_mask(block, range(7, block.pages - 3)), ~nonzero[7:-3])
    assert np.array_equal(zero_mask(block, range(1, 900, 7)), ~nonzero[1:900:7])


def test_zero_mask_edges(make_block: BlockMaker) -> None:
    block = make_block("anonymous", 16 * PAGE_SIZE, name="pc.ram")
    assert zero_mask(block, []).shape == (0,)
    assert zero_mask(block, [5]).tolist() == [True]
    block.page(5)[PAGE_SIZE - 1] = 1
    assert zero_mask(block, [5, 5, 4]).tolist() == [False, False, True]
    with pytest.raises(IndexError, match=r"'pc.ram': zero check of pages 0..16 outside 0..15"):
        zero_mask(block, [0, 16])
    assert zero_mask(block, range(3, 3)).shape == (0,)
    assert zero_mask(block, range(4, 6)).tolist() == [True, False]
    with pytest.raises(IndexError, match=r"'pc.ram': zero check of pages 14..16 outside 0..15"):
        zero_mask(block, range(14, 17))
    with pytest.raises(IndexError, match=r"'pc.ram': zero check of pages -1..0 outside 0..15"):
        zero_mask(block, range(-1, 1))


def test_is_zero_rows_gathers_in_steps_and_per_thread(make_block: BlockMaker) -> None:
    """Scattered pages, more than one gather buffer's worth, repeats and any
    order; two threads at once each get their own buffer (a shared one would
    mix their pages up)."""
    block = make_block("anonymous", 4 * MiB)
    rows = block.page_rows(np.uint64)
    rng = np.random.default_rng(5)
    nonzero = rng.random(block.pages) < 0.5
    pages = np.flatnonzero(nonzero)
    rows[pages, rng.integers(0, PAGE_SIZE // 8, pages.size)] = 1 << 63  # one bit, anywhere
    picks = [rng.integers(0, block.pages, 700).astype(np.intp) for _ in range(2)]
    results: list[list[np.ndarray]] = [[], []]

    def check(n: int) -> None:
        for _ in range(20):
            results[n].append(is_zero_rows(rows, picks[n]))

    threads = [threading.Thread(target=check, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for n in range(2):
        assert len(results[n]) == 20
        for result in results[n]:
            assert np.array_equal(result, ~nonzero[picks[n]])
