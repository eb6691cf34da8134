"""The package's one C library handle: both layers' calls go through it, and a
failed call's errno becomes an OSError that names the call."""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

from multifd import _syscalls
from multifd.channels import _libc
from multifd.memory import _linux


def test_one_handle_for_every_layer() -> None:
    assert _libc.LIBC is _linux.LIBC is _syscalls.LIBC


def test_the_error_names_the_call_and_keeps_errno() -> None:
    ctypes.set_errno(errno.EAGAIN)
    error = _syscalls.last_error("vmsplice")
    assert error.errno == errno.EAGAIN
    assert error.strerror == f"vmsplice: {os.strerror(errno.EAGAIN)}"
    ctypes.set_errno(errno.EPERM)
    assert _syscalls.last_error().strerror == os.strerror(errno.EPERM)


def test_a_failed_madvise_raises_its_errno() -> None:
    # An unaligned address: EINVAL from the kernel, as an OSError.
    with pytest.raises(OSError) as raised:
        _linux.madvise(1, 4096, _linux.MADV_POPULATE_READ)
    assert raised.value.errno == errno.EINVAL
