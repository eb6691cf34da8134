"""The memory layer: RAM blocks and the buffers behind them, dirty bitmaps,
dirty-page trackers and zero-page detection. No channel I/O happens here.
"""

from .bitmap import DirtyBitmap, coalesce_runs, runs_to_indices
from .block import (
    MAX_NAME_BYTES,
    PAGE_SIZE,
    FileTooShortError,
    MarkLog,
    RAMBlock,
    validate_name,
    validate_size,
)
from .tracking import (
    PREFERENCES,
    DirtyTracker,
    ExplicitTracker,
    HashTracker,
    KernelTracker,
    TrackerBase,
    TrackerUnavailable,
    choose_tracker,
    page_hashes,
    share_tracking,
    verify_keys,
)
from .zero import is_zero_rows, zero_mask

__all__ = [
    "MAX_NAME_BYTES",
    "PAGE_SIZE",
    "PREFERENCES",
    "DirtyBitmap",
    "DirtyTracker",
    "ExplicitTracker",
    "FileTooShortError",
    "HashTracker",
    "KernelTracker",
    "MarkLog",
    "RAMBlock",
    "TrackerBase",
    "TrackerUnavailable",
    "choose_tracker",
    "coalesce_runs",
    "is_zero_rows",
    "page_hashes",
    "runs_to_indices",
    "share_tracking",
    "validate_name",
    "validate_size",
    "verify_keys",
    "zero_mask",
]
