"""The tracker of last resort: the application says what it wrote, with
`block.mark_dirty(offset, length)`, and nothing else is seen.
"""

from __future__ import annotations

from ..bitmap import DirtyBitmap
from .base import TrackerBase


class ExplicitTracker(TrackerBase):
    """Reports exactly the pages marked since the last collect (thread-safe)."""

    name = "explicit"

    def _start(self) -> None:
        """Marks are the whole story; the base class already forgot the old ones."""

    def _collect(self) -> DirtyBitmap:
        # The base class adds the marks to what this returns.
        return DirtyBitmap(self.block.pages)

    def _close(self) -> None:
        """Nothing of its own to release; the base class closes the mark log."""
