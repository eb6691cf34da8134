"""What every dirty tracker offers the migration (`DirtyTracker`), and the part
they share: rounds, explicit marks merged into every collect, and closing once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol, Self, runtime_checkable

from ..bitmap import DirtyBitmap
from ..block import MarkLog, RAMBlock


class TrackerUnavailable(OSError):
    """A tracker cannot work for this block here; the message says why.

    Built as `TrackerUnavailable(errno, message)`; `str()` is the message alone,
    so that it reads well as a fallback reason.
    """

    def __str__(self) -> str:
        return str(self.strerror)


@runtime_checkable
class DirtyTracker(Protocol):
    """Finds the pages of one block written since the last look.

    `start()` begins tracking (every page counts as clean from then on);
    `collect()` returns the pages written since the last `start()` or `collect()`
    and, in the same step, makes them clean again.

    `start(lazy=True)` lets a tracker defer its setup to `cover(first, count)`,
    which the first round calls, in page order, before it reads each range: the
    setup's cost then overlaps the sending instead of delaying its start. A page
    not yet covered when `collect()` runs counts as written.
    """

    name: str  # "kernel", "hash" or "explicit"
    block: RAMBlock
    fallback_reason: str | None  # why a better tracker was not used, if one was not

    @property
    def reader(self) -> RAMBlock:
        """Where to read the tracked pages: the block, or another mapping of
        the same memory that tracking does not slow down (see KernelTracker)."""
        ...

    def reader_for(self, first: int, count: int) -> RAMBlock:
        """Where to read pages [first, first+count) now: `reader`, or the block
        itself where that is cheaper."""
        ...

    def start(self, *, lazy: bool = False) -> None: ...

    def cover(self, first: int, count: int) -> None: ...

    def collect(self) -> DirtyBitmap: ...

    def close(self) -> None: ...


class TrackerBase(ABC):
    """Shared behaviour; subclasses provide `_start`, `_collect` and `_close`
    (`start`, `collect` and `close` call them in the right state).

    Pages marked with `block.mark_dirty` are added to every collect, whatever the
    tracker, so an application can report writes a tracker cannot see.
    """

    name: ClassVar[str]

    def __init__(self, block: RAMBlock) -> None:
        if block.closed:
            raise ValueError(f"RAMBlock {block.name!r} is closed: nothing to track")
        self.block = block
        self.fallback_reason: str | None = None
        self._marks: MarkLog | None = None
        self._closed = False

    def start(self, *, lazy: bool = False) -> None:
        if self._closed:
            raise ValueError(f"{self}: start() after close()")
        if self._marks is None:
            self._marks = self.block.mark_log()
        else:
            self._marks.take()  # earlier marks are part of what start() forgets
        if lazy:
            self._start_lazily()
        else:
            self._start()

    @property
    def reader(self) -> RAMBlock:
        return self.block

    def reader_for(self, first: int, count: int) -> RAMBlock:
        return self.reader

    def cover(self, first: int, count: int) -> None:
        """Pages [first, first+count) are about to be read: track them from now
        on if a lazy start has not yet. Trackers without deferred setup have
        nothing to do."""
        return None

    def _start_lazily(self) -> None:
        self._start()

    def collect(self) -> DirtyBitmap:
        if self._closed:
            raise ValueError(f"{self}: collect() after close()")
        if self._marks is None:
            raise ValueError(f"{self}: collect() before start()")
        dirty = self._collect()
        dirty |= self._marks.take()
        return dirty

    def close(self) -> None:
        """Release every resource of the tracker; closing twice is fine."""
        if self._closed:
            return
        self._closed = True
        if self._marks is not None:
            self._marks.close()
            self._marks = None
        self._close()

    @abstractmethod
    def _start(self) -> None: ...

    @abstractmethod
    def _collect(self) -> DirtyBitmap: ...

    @abstractmethod
    def _close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of RAMBlock {self.block.name!r}>"
