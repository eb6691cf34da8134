"""Picking a block's dirty tracker: the kernel's where it works, else hashing,
or the one the caller insists on; the choice and any fallback reason are kept.
"""

from __future__ import annotations

from ..block import RAMBlock
from .base import TrackerBase, TrackerUnavailable
from .explicit import ExplicitTracker
from .hashing import HashTracker
from .kernel import KernelTracker

PREFERENCES = ("auto", "kernel", "hash", "explicit")


def choose_tracker(block: RAMBlock, preference: str = "auto") -> TrackerBase:
    """A tracker for `block`, not started yet.

    "auto" takes the kernel tracker if it works for this block and sees all its
    writers, and otherwise the hash tracker, with `fallback_reason` saying why:
    the kernel tracker reads this process's page tables, so it misses another
    process's writes to a file, shared or handed-out memfd block (a workload
    in another process can share its own tracking: `KernelTracker.from_remote`).
    Explicit marking is never chosen automatically: it sees only what the
    application reports. Naming a tracker forces it, for a caller that knows
    who writes; TrackerUnavailable says why it cannot work.
    """
    if preference == "kernel":
        return KernelTracker(block)
    if preference == "hash":
        return HashTracker(block)
    if preference == "explicit":
        return ExplicitTracker(block)
    if preference != "auto":
        raise ValueError(
            f"RAMBlock {block.name!r}: unknown dirty tracker {preference!r}; "
            f"choose one of {', '.join(PREFERENCES)}"
        )
    reason = KernelTracker.probe()
    if reason is None and block.may_be_written_elsewhere:
        reason = (
            f"RAMBlock {block.name!r} ({block.kind}) may be written by another process, "
            "whose writes the kernel tracker of this one does not see"
        )
    if reason is None:
        try:
            return KernelTracker(block)
        except TrackerUnavailable as exc:
            reason = str(exc)
    tracker = HashTracker(block)
    tracker.fallback_reason = reason
    return tracker
