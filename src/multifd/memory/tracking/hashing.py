"""The fallback tracker that needs nothing from the kernel: a 64-bit hash of every
page each round, compared with the previous round's (8 bytes of state per page)."""

from __future__ import annotations

import os
import threading

import numpy as np
import numpy.typing as npt

from ..bitmap import DirtyBitmap
from ..block import PAGE_SIZE, RAMBlock
from .base import TrackerBase

_WORDS_PER_PAGE = PAGE_SIZE // 4
# 1024 pages (4 MiB) per step keeps the hashing temporaries small.
_CHUNK_PAGES = 1024
# Threads hashing one block side by side: one per CPU, up to four.
_HASH_THREADS = min(os.cpu_count() or 1, 4)


def _draw_keys(rng: np.random.Generator) -> npt.NDArray[np.uint64]:
    """Random odd 64-bit keys, one per 32-bit word of a page.

    The hash is multilinear over 32-bit words with 64-bit keys, sum(w_i * k_i) mod
    2^64, which misses a given change with probability at most 2^-32 (Lemire &
    Kaser, "Strongly universal string hashing is fast"). Hashing whole 64-bit words
    instead would always miss a change that flips the top bit of two words, such
    as negating two doubles. The one pattern left at 2^-32, flipping the top bit
    of exactly two words i and j, happens when k_i = ±k_j mod 2^33; such keys are
    redrawn, so that pattern is never missed.
    """
    while True:
        keys = rng.integers(0, 2**64, _WORDS_PER_PAGE, dtype=np.uint64, endpoint=False)
        keys |= np.uint64(1)
        low = keys & np.uint64((1 << 33) - 1)
        negated = (np.uint64(1 << 33) - low) & np.uint64((1 << 33) - 1)
        if np.unique(np.concatenate((low, negated))).size == 2 * _WORDS_PER_PAGE:
            return keys


def verify_keys(seed: int) -> npt.NDArray[np.uint64]:
    """The page-hash keys both ends of a verified migration draw from one seed."""
    return _draw_keys(np.random.default_rng(seed))


def page_hashes(block: RAMBlock, keys: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """One 64-bit hash per page of the whole block (the tracker's hash).

    Parts of the block are hashed by threads side by side (numpy releases the
    GIL): x-verify hashes the whole memory while the workload is stopped, so
    the time it takes is downtime.
    """
    hashes = np.empty(block.pages, dtype=np.uint64)
    words = block.page_rows(np.uint32)

    def hash_pages(start: int, stop: int) -> None:
        for first in range(start, stop, _CHUNK_PAGES):
            out = hashes[first : min(first + _CHUNK_PAGES, stop)]
            np.einsum(
                "ij,j->i",
                words[first : first + out.size],
                keys,
                out=out,
                dtype=np.uint64,
                casting="safe",
            )

    parts = min(_HASH_THREADS, -(-block.pages // _CHUNK_PAGES))
    if parts <= 1:
        hash_pages(0, block.pages)
        return hashes
    step = -(-block.pages // parts)
    threads = [
        threading.Thread(target=hash_pages, args=(i * step, min((i + 1) * step, block.pages)))
        for i in range(1, parts)
    ]
    for thread in threads:
        thread.start()
    try:
        hash_pages(0, step)
    finally:
        for thread in threads:
            thread.join()
    return hashes


class HashTracker(TrackerBase):
    """A page is dirty when its hash differs from the one of the last round.

    It reads the whole block on every collect (about 5-6 GB/s on one core here),
    so the kernel tracker is preferred wherever it works.

    Writes racing a collect are not lost: a page hashed before a write differs
    from its later contents, so the next collect reports it.
    """

    name = "hash"

    def __init__(self, block: RAMBlock, *, seed: int | None = None) -> None:
        super().__init__(block)
        self._keys = _draw_keys(np.random.default_rng(seed))
        self._hashes = np.zeros(block.pages, dtype=np.uint64)

    def _hash(self, first: int, out: npt.NDArray[np.uint64]) -> None:
        words = self.block.page_rows(np.uint32)[first : first + out.size]
        np.einsum("ij,j->i", words, self._keys, out=out, dtype=np.uint64, casting="safe")

    def _start(self) -> None:
        for first in range(0, self.block.pages, _CHUNK_PAGES):
            self._hash(first, self._hashes[first : first + _CHUNK_PAGES])

    def _collect(self) -> DirtyBitmap:
        dirty = DirtyBitmap(self.block.pages)
        fresh = np.empty(_CHUNK_PAGES, dtype=np.uint64)
        for first in range(0, self.block.pages, _CHUNK_PAGES):
            previous = self._hashes[first : first + _CHUNK_PAGES]
            current = fresh[: previous.size]
            self._hash(first, current)
            np.not_equal(current, previous, out=dirty.array[first : first + previous.size])
            previous[:] = current
        return dirty

    def _close(self) -> None:
        self._hashes = np.zeros(0, dtype=np.uint64)
