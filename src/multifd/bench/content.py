"""The RAM content every scenario migrates: a file in shared memory, 75 % random
pages and 25 % zero pages from a fixed seed, filled once and hashed once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..demo.workload import fill
from ..memory import RAMBlock
from .options import DATA_FRACTION, SEED

BLOCK_NAME = "mem"  # QEMU's name for RAM given with -machine memory-backend=mem


@dataclass(frozen=True)
class Content:
    path: Path
    size: int
    sha256: str

    def block(self) -> RAMBlock:
        """A fresh shared mapping of the file, named as QEMU names it."""
        return RAMBlock.from_file(BLOCK_NAME, self.path, self.size)


def make_content(folder: Path, size: int) -> Content:
    path = folder / "source.ram"
    with RAMBlock.from_file(BLOCK_NAME, path, size, create=True) as block:
        fill(block.array, DATA_FRACTION, seed=SEED)
        digest = block.sha256()
    return Content(path, size, digest)
