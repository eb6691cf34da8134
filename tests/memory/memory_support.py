"""Shared helpers for the memory-layer tests: blocks of every kind, the known
write pattern the trackers must report, and open-fd counting."""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import numpy.typing as npt

from multifd.memory import RAMBlock

MiB = 1 << 20
# The pattern every tracker must report exactly: pages 3, 7 and 100..120.
PATTERN = np.array([3, 7, *range(100, 121)], dtype=np.int64)

KERNEL_KINDS = ("anonymous", "shared-anonymous", "memfd", "shm-file", "disk-file")
ALL_KINDS = (*KERNEL_KINDS, "bytearray", "numpy", "mmap")


def write_pages(block: RAMBlock, pages: npt.ArrayLike) -> None:
    """Change the first byte of each page (an increment: always a real change)."""
    block.page_rows()[np.asarray(pages, dtype=np.int64), 0] += 1


def present_pages(block: RAMBlock) -> int:
    """How many of the block's pages this process's page tables map
    (/proc/self/pagemap, bit 63: present)."""
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(block.address // mmap.PAGESIZE * 8)
        entries = np.frombuffer(pagemap.read(block.pages * 8), dtype=np.uint64)
    return int(np.count_nonzero(entries >> np.uint64(63)))


def mapping_fields(block: RAMBlock) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds the block's first page."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head, _, rest = line.partition(" ")
            if "-" in head and not head.endswith(":"):
                if inside:
                    break
                low, high = (int(bound, 16) for bound in head.split("-"))
                inside = low <= block.address < high
            elif inside:
                fields[head.rstrip(":")] = rest.strip()
    return fields


def anonymous_thp_mode() -> str:
    """The kernel's transparent huge page mode for anonymous memory
    (always, madvise or never), "never" where it has no THP."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode:
            return mode.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


class BlockMaker:
    """Builds blocks of any kind and closes whatever it built at the end."""

    def __init__(self, scratch: Path) -> None:
        self._scratch = scratch
        self._closers: list[Callable[[], None]] = []
        self._shm_paths: list[Path] = []

    def __call__(self, kind: str, size: int = 4 * MiB, name: str | None = None) -> RAMBlock:
        name = name or f"test.{kind}"
        if kind == "anonymous":
            block = RAMBlock.anonymous(name, size)
        elif kind == "shared-anonymous":
            block = RAMBlock.anonymous(name, size, shared=True)
        elif kind == "memfd":
            block = RAMBlock.memfd(name, size)
        elif kind == "shm-file":
            path = Path("/dev/shm") / f"multifd-test-{os.getpid()}-{len(self._shm_paths)}"
            self._shm_paths.append(path)
            block = RAMBlock.from_file(name, path, size, create=True)
        elif kind == "disk-file":
            block = RAMBlock.from_file(name, self._scratch / f"{name}.ram", size, create=True)
        elif kind == "bytearray":
            block = RAMBlock.from_buffer(name, bytearray(size))
        elif kind == "numpy":
            block = RAMBlock.from_buffer(name, np.zeros(size // 8, dtype=np.float64))
        elif kind == "mmap":
            mapping = mmap.mmap(-1, size)
            block = RAMBlock.from_buffer(name, mapping)
            self._closers.append(mapping.close)
        else:
            raise ValueError(kind)
        self._closers.insert(0, block.close)
        return block

    def close(self) -> None:
        for close in self._closers:
            close()
        for path in self._shm_paths:
            path.unlink(missing_ok=True)


@contextmanager
def no_fd_leak() -> Iterator[None]:
    before = open_fds()
    yield
    assert open_fds() == before
