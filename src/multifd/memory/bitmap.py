"""Which pages of a RAMBlock are dirty: a numpy bool per page, and runs of
adjacent dirty pages so that they can be sent as one memoryview."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

IndexArray = npt.NDArray[np.int64]


def _as_indices(values: npt.ArrayLike) -> IndexArray:
    return np.asarray(values, dtype=np.int64).reshape(-1)


def coalesce_runs(indices: npt.ArrayLike) -> tuple[IndexArray, IndexArray]:
    """Strictly increasing page indices → (starts, lengths) of maximal runs.

    `coalesce_runs([3, 4, 5, 9])` is `([3, 9], [3, 1])`.
    """
    pages = _as_indices(indices)
    if pages.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    steps = np.diff(pages)
    if steps.size and steps.min() <= 0:
        raise ValueError("coalesce_runs: page indices must be strictly increasing")
    breaks = np.flatnonzero(steps != 1) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks - 1, [pages.size - 1]))
    return pages[first], pages[last] - pages[first] + 1


def runs_to_indices(starts: npt.ArrayLike, lengths: npt.ArrayLike) -> IndexArray:
    """(starts, lengths) of runs → every page index they cover, in run order."""
    first = _as_indices(starts)
    count = _as_indices(lengths)
    if first.shape != count.shape:
        raise ValueError(f"runs: {first.size} starts but {count.size} lengths")
    if count.size and count.min() < 0:
        raise ValueError("runs: negative run length")
    # Each output position is its run's start plus its distance from the run's
    # first output position: one repeat and one arange, whatever the run count.
    offsets = np.cumsum(count) - count
    pages: IndexArray = np.arange(int(count.sum()), dtype=np.int64) + np.repeat(
        first - offsets, count
    )
    return pages


class DirtyBitmap:
    """One bool per page of a block; True means the page must be sent.

    Every operation works on whole arrays; nothing loops over pages in Python.
    """

    __slots__ = ("_dirty",)

    def __init__(self, pages: int, *, dirty: bool = False) -> None:
        if pages < 0:
            raise ValueError(f"DirtyBitmap: negative page count {pages}")
        self._dirty = np.full(pages, dirty, dtype=np.bool_)

    @classmethod
    def from_indices(cls, pages: int, indices: npt.ArrayLike) -> DirtyBitmap:
        bitmap = cls(pages)
        bitmap.set_indices(indices)
        return bitmap

    @property
    def pages(self) -> int:
        return self._dirty.size

    @property
    def array(self) -> npt.NDArray[np.bool_]:
        """The bools themselves (a live view, not a copy)."""
        return self._dirty

    def _check_range(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.pages:
            raise IndexError(
                f"DirtyBitmap: pages {first}..{first + count - 1} outside 0..{self.pages - 1}"
            )

    def _check_indices(self, pages: IndexArray) -> None:
        if pages.size and (pages.min() < 0 or pages.max() >= self.pages):
            raise IndexError(
                f"DirtyBitmap: page index {int(pages.min())}..{int(pages.max())} "
                f"outside 0..{self.pages - 1}"
            )

    def set_range(self, first: int, count: int = 1) -> None:
        self._check_range(first, count)
        self._dirty[first : first + count] = True

    def clear_range(self, first: int, count: int = 1) -> None:
        self._check_range(first, count)
        self._dirty[first : first + count] = False

    def set_indices(self, indices: npt.ArrayLike) -> None:
        pages = _as_indices(indices)
        self._check_indices(pages)
        self._dirty[pages] = True

    def set_runs(self, starts: npt.ArrayLike, lengths: npt.ArrayLike) -> None:
        self.set_indices(runs_to_indices(starts, lengths))

    def set_all(self) -> None:
        self._dirty.fill(True)

    def clear_all(self) -> None:
        self._dirty.fill(False)

    def count(self) -> int:
        return int(np.count_nonzero(self._dirty))

    def any(self) -> bool:
        return bool(self._dirty.any())

    def indices(self) -> IndexArray:
        """The dirty page indices, increasing."""
        return np.flatnonzero(self._dirty).astype(np.int64, copy=False)

    def batches(self, max_pages: int) -> Iterator[IndexArray]:
        """The dirty page indices in increasing slices of at most `max_pages`."""
        if max_pages < 1:
            raise ValueError(f"DirtyBitmap.batches: max_pages must be >= 1, got {max_pages}")
        pages = self.indices()
        for first in range(0, pages.size, max_pages):
            yield pages[first : first + max_pages]

    def runs(self) -> tuple[IndexArray, IndexArray]:
        """(starts, lengths) of the maximal runs of dirty pages."""
        return coalesce_runs(self.indices())

    def copy(self) -> DirtyBitmap:
        other = DirtyBitmap(0)
        other._dirty = self._dirty.copy()
        return other

    def __ior__(self, other: DirtyBitmap) -> DirtyBitmap:
        if other.pages != self.pages:
            raise ValueError(f"DirtyBitmap: cannot merge {other.pages} pages into {self.pages}")
        np.logical_or(self._dirty, other._dirty, out=self._dirty)
        return self

    def __repr__(self) -> str:
        return f"DirtyBitmap(pages={self.pages}, dirty={self.count()})"
