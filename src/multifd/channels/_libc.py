"""The system calls the socket module lacks, or offers only per Python buffer:
vmsplice(2), and recvmsg(2) on a struct iovec table (see iovec.py)."""

from __future__ import annotations

import ctypes
import os

from .._syscalls import LIBC, last_error


class _MsgHdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


# A C library without vmsplice (not Linux) only loses the lending of pages.
_vmsplice = getattr(LIBC, "vmsplice", None)
HAVE_VMSPLICE = _vmsplice is not None and hasattr(os, "splice")
if _vmsplice is not None:
    _vmsplice.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint)
    _vmsplice.restype = ctypes.c_ssize_t
_recvmsg = LIBC.recvmsg
_recvmsg.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_recvmsg.restype = ctypes.c_ssize_t


def vmsplice(fd: int, iovecs: int, count: int, flags: int) -> int:
    """vmsplice(2) of `count` struct iovec at address `iovecs`."""
    assert _vmsplice is not None, "check HAVE_VMSPLICE first"
    n = _vmsplice(fd, iovecs, count, flags)
    if n < 0:
        raise last_error("vmsplice")
    return int(n)


class RecvMsg:
    """recvmsg(2) into a struct iovec table; one per reading thread (the
    msghdr is reused)."""

    def __init__(self) -> None:
        self._header = _MsgHdr()
        self._pointer = ctypes.addressof(self._header)

    def __call__(self, fd: int, iovecs: int, count: int, flags: int) -> int:
        self._header.msg_iov = iovecs
        self._header.msg_iovlen = count
        n = _recvmsg(fd, self._pointer, flags)
        if n < 0:
            raise last_error("recvmsg")
        return int(n)
