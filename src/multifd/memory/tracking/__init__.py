"""Dirty-page trackers: which pages of a RAMBlock were written since the last
round, by the kernel (userfaultfd + PAGEMAP_SCAN), by hashing, or by marking.
"""

from .base import DirtyTracker, TrackerBase, TrackerUnavailable
from .choose import PREFERENCES, choose_tracker
from .explicit import ExplicitTracker
from .hashing import HashTracker, page_hashes, verify_keys
from .kernel import KernelTracker, share_tracking

__all__ = [
    "PREFERENCES",
    "DirtyTracker",
    "ExplicitTracker",
    "HashTracker",
    "KernelTracker",
    "TrackerBase",
    "TrackerUnavailable",
    "choose_tracker",
    "page_hashes",
    "share_tracking",
    "verify_keys",
]
