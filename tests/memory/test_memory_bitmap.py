"""DirtyBitmap and runs: ranges, counts, batches of indices, and coalescing
adjacent dirty pages into (start, length) runs."""

from __future__ import annotations

import numpy as np
import pytest

from multifd.memory import DirtyBitmap, coalesce_runs, runs_to_indices


def test_ranges_indices_and_counts() -> None:
    bitmap = DirtyBitmap(1000)
    assert bitmap.count() == 0 and not bitmap.any()
    bitmap.set_range(10, 5)
    bitmap.set_indices([3, 999])
    bitmap.clear_range(12)
    assert bitmap.indices().tolist() == [3, 10, 11, 13, 14, 999]
    assert bitmap.count() == 6 and bitmap.any()
    assert bitmap.indices().dtype == np.int64
    bitmap.set_all()
    assert bitmap.count() == 1000
    bitmap.clear_all()
    assert bitmap.count() == 0
    assert repr(DirtyBitmap(8, dirty=True)) == "DirtyBitmap(pages=8, dirty=8)"


def test_out_of_range_is_an_error_not_a_silent_clip() -> None:
    bitmap = DirtyBitmap(16)
    with pytest.raises(IndexError, match=r"pages 15..16 outside 0..15"):
        bitmap.set_range(15, 2)
    with pytest.raises(IndexError, match=r"page index -1..3 outside 0..15"):
        bitmap.set_indices([-1, 3])
    with pytest.raises(IndexError, match=r"outside 0..15"):
        bitmap.set_indices([16])


def test_batches_split_indices_in_order() -> None:
    bitmap = DirtyBitmap.from_indices(1000, np.arange(0, 1000, 3))
    batches = list(bitmap.batches(128))
    assert [len(batch) for batch in batches] == [128, 128, 78]
    assert np.array_equal(np.concatenate(batches), np.arange(0, 1000, 3))
    assert list(DirtyBitmap(10).batches(128)) == []
    with pytest.raises(ValueError, match="max_pages must be >= 1"):
        next(bitmap.batches(0))


def test_runs_coalesce_adjacent_pages() -> None:
    starts, lengths = coalesce_runs([3, 4, 5, 9, 11, 12])
    assert starts.tolist() == [3, 9, 11] and lengths.tolist() == [3, 1, 2]
    bitmap = DirtyBitmap.from_indices(200, [3, 7, *range(100, 121), 199])
    starts, lengths = bitmap.runs()
    assert starts.tolist() == [3, 7, 100, 199] and lengths.tolist() == [1, 1, 21, 1]
    empty_starts, empty_lengths = coalesce_runs([])
    assert empty_starts.size == 0 and empty_lengths.size == 0
    with pytest.raises(ValueError, match="strictly increasing"):
        coalesce_runs([3, 3, 4])


def test_runs_and_indices_round_trip_on_random_bitmaps() -> None:
    rng = np.random.default_rng(7)
    for density in (0.01, 0.3, 0.9):
        dirty = np.flatnonzero(rng.random(5000) < density)
        starts, lengths = coalesce_runs(dirty)
        assert np.array_equal(runs_to_indices(starts, lengths), dirty)
        rebuilt = DirtyBitmap(5000)
        rebuilt.set_runs(starts, lengths)
        assert np.array_equal(rebuilt.indices(), dirty)
        assert np.all(starts[1:] > starts[:-1] + lengths[:-1])  # maximal: a gap between runs


def test_merge_and_copy() -> None:
    a = DirtyBitmap.from_indices(10, [1, 2])
    b = DirtyBitmap.from_indices(10, [2, 8])
    c = a.copy()
    a |= b
    assert a.indices().tolist() == [1, 2, 8]
    assert c.indices().tolist() == [1, 2]
    with pytest.raises(ValueError, match="cannot merge 11 pages into 10"):
        a |= DirtyBitmap(11)
