"""The Linux kernel interfaces the memory layer calls through ctypes: madvise,
userfaultfd and its ioctls, and PAGEMAP_SCAN, with their structure layouts."""

from __future__ import annotations

import ctypes
import errno
import os
import platform

from .._syscalls import LIBC, last_error

# Debian's kernel headers predate PAGEMAP_SCAN and UFFD_FEATURE_WP_ASYNC (6.7), so
# the layouts are spelled out from the kernel UAPI (include/uapi/linux/fs.h and
# userfaultfd.h); ../shared/notes/limits.md section A1 lists them too.

PAGE_SIZE = 4096

# madvise(2)
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23

# userfaultfd(2) flags
O_CLOEXEC = os.O_CLOEXEC
O_NONBLOCK = os.O_NONBLOCK
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA

# UFFDIO_API feature bits
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15

UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
# Bit of `_UFFDIO_WRITEPROTECT` in the `ioctls` mask UFFDIO_REGISTER returns.
UFFDIO_WRITEPROTECT_IOCTL_BIT = 1 << 0x06

# PAGEMAP_SCAN flags and page categories
PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3

# Per-architecture number of the userfaultfd syscall; 282 is the generic table.
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282, "arm64": 282, "riscv64": 282}


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


_IOC_WRITE = 1
_IOC_READ = 2


class UffdioApi(ctypes.Structure):
    _fields_ = (
        ("api", ctypes.c_uint64),
        ("features", ctypes.c_uint64),
        ("ioctls", ctypes.c_uint64),
    )


class UffdioRange(ctypes.Structure):
    _fields_ = (("start", ctypes.c_uint64), ("len", ctypes.c_uint64))


class UffdioRegister(ctypes.Structure):
    _fields_ = (("range", UffdioRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64))


class UffdioWriteprotect(ctypes.Structure):
    _fields_ = (("range", UffdioRange), ("mode", ctypes.c_uint64))


class PmScanArg(ctypes.Structure):
    _fields_ = (
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("walk_end", ctypes.c_uint64),
        ("vec", ctypes.c_uint64),
        ("vec_len", ctypes.c_uint64),
        ("max_pages", ctypes.c_uint64),
        ("category_inverted", ctypes.c_uint64),
        ("category_mask", ctypes.c_uint64),
        ("category_anyof_mask", ctypes.c_uint64),
        ("return_mask", ctypes.c_uint64),
    )


_RW = _IOC_READ | _IOC_WRITE
UFFDIO_API = _ioc(_RW, UFFD_API, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _ioc(_RW, UFFD_API, 0x00, ctypes.sizeof(UffdioRegister))
UFFDIO_UNREGISTER = _ioc(_IOC_READ, UFFD_API, 0x01, ctypes.sizeof(UffdioRange))
UFFDIO_WRITEPROTECT = _ioc(_RW, UFFD_API, 0x06, ctypes.sizeof(UffdioWriteprotect))
PAGEMAP_SCAN = _ioc(_RW, ord("f"), 16, ctypes.sizeof(PmScanArg))


LIBC.syscall.restype = ctypes.c_long
LIBC.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
LIBC.ioctl.restype = ctypes.c_int
LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
LIBC.madvise.restype = ctypes.c_int


# Failures raise OSError(errno, strerror); the callers say which operation failed.
def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2)."""
    if LIBC.madvise(address, length, advice) != 0:
        raise last_error()


def userfaultfd(flags: int) -> int:
    """userfaultfd(2): a new userfaultfd for this process's address space."""
    number = _SYS_USERFAULTFD.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"syscall number unknown on {platform.machine()}")
    fd = LIBC.syscall(ctypes.c_long(number), ctypes.c_int(flags))
    if fd < 0:
        raise last_error()
    return int(fd)


def ioctl(fd: int, request: int, arg: ctypes.Structure) -> int:
    """ioctl(2) with a pointer to `arg` (which the kernel may fill in)."""
    result = LIBC.ioctl(fd, request, ctypes.addressof(arg))
    if result < 0:
        raise last_error()
    return int(result)
