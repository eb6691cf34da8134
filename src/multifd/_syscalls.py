"""The C library through ctypes, for the system calls that Python's os, socket
and fcntl modules lack: one handle for the package, whose layers each declare
the calls they make (channels/_libc.py, memory/_linux.py). ctypes keeps errno
per thread and releases the GIL around each call."""

from __future__ import annotations

import ctypes
import os

LIBC = ctypes.CDLL(None, use_errno=True)


def last_error(call: str | None = None) -> OSError:
    """The OSError of this thread's last failed call (its errno), named after
    `call` when given."""
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}" if call else os.strerror(err))
