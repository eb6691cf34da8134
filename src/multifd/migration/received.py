"""Which pages the destination has written during this migration (QEMU's
receivedmap), kept for the blocks that were untouched when it began.

Fresh memory is zero. So a zero page for a page of such a block that this
migration has not written needs neither a check nor a write: QEMU 9.0 does the
same with multifd zero pages, and trusts its fresh RAM. On this machine the
check read 256 MiB per GiB of the benchmark's content (25 % zero pages), a
third of what the receive threads spent copying from the sockets. Pages of
any other block are checked one by one, as QEMU 7.2 does.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from ..memory import RAMBlock
from ..wire import TARGET_PAGE_SIZE


class ReceivedPages:
    """Per block: a bool per page, set once this migration wrote the page; or
    None for a block that was not untouched (every page may hold anything).

    The receive threads mark the pages they wrote now and then, and the rest
    of a round's at its sync (`MultifdReceiver.sync`), before any record of
    the next round: only a later round can bring the same page as zero. Marks
    are bytes set to True, and the migration thread reads only the pages of
    zero records, which no receive thread writes in the same round.
    """

    def __init__(self, blocks: Mapping[str, RAMBlock]) -> None:
        self._written: dict[str, np.ndarray | None] = {
            name: np.zeros(block.pages, dtype=np.bool_) if block.take_untouched() else None
            for name, block in blocks.items()
        }

    def wrote(self, name: str, offsets: np.ndarray) -> None:
        """Pages written at byte `offsets` (a page at an unaligned offset
        touches two)."""
        written = self._written.get(name)
        if written is None:
            return
        page = TARGET_PAGE_SIZE
        written[offsets // page] = True
        unaligned = offsets[offsets % page != 0]
        if len(unaligned):
            written[np.minimum((unaligned + page - 1) // page, len(written) - 1)] = True

    def wrote_page(self, name: str, offset: int) -> None:
        written = self._written.get(name)
        if written is not None:
            written[offset // TARGET_PAGE_SIZE] = True
            if offset % TARGET_PAGE_SIZE:
                written[min(offset // TARGET_PAGE_SIZE + 1, len(written) - 1)] = True

    def page_may_be_written(self, name: str, offset: int) -> bool:
        """Whether the page at byte `offset` may hold something other than zeros."""
        written = self._written.get(name)
        if written is None:
            return True
        first = offset // TARGET_PAGE_SIZE
        last = min(-(-offset // TARGET_PAGE_SIZE), len(written) - 1)
        return bool(written[first] or written[last])

    def may_be_written(self, name: str, pages: np.ndarray) -> np.ndarray:
        """The pages (indices) among `pages` that may hold something other
        than zeros."""
        written = self._written.get(name)
        return pages if written is None else pages[written[pages]]
