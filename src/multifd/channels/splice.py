"""Writing RAM pages into a unix socket without copying them: vmsplice(2) lends
the pages to a pipe, splice(2) moves them from the pipe into the socket, and the
peer's read is the only copy. A sendmsg copies every byte into the socket first:
on one host, with the reader copying too, that halves what the CPUs must move.

Lent memory is read when the peer reads it, not when it is written here, so a
caller lends only memory that stays mapped, and whose later changes it accepts
on the wire. RAM pages qualify: a write after the round collected a page is
tracked, and the page goes again in the next round.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from ._libc import vmsplice
from .iovec import IOV_MAX, IOVec

# Each lent page takes a slot of the pipe; /proc/sys/fs/pipe-max-size (1 MiB by
# default) caps what an unprivileged process may ask for, hence the fallbacks.
PIPE_SIZES = (1 << 20, 256 << 10)
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_SPLICE_F_NONBLOCK = 0x02
_SIOCOUTQ = 0x5411


class SplicePipe:
    """The pipe between a channel's writer and its unix socket.

    `put` and `lend_iovec` fill the pipe (a copy, or references to pages) without
    blocking and take what fits; `drain_some` moves everything queued into the
    socket, blocking as the socket's own send timeout allows. One thread at a
    time, the channel's writer.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe2(os.O_CLOEXEC)
        # Only the write end: splice(2) turns an O_NONBLOCK on either of its
        # files into MSG_DONTWAIT on the socket, and the socket must block.
        os.set_blocking(self._write_fd, False)
        for size in PIPE_SIZES:
            with contextlib.suppress(OSError):
                fcntl.fcntl(self._write_fd, _F_SETPIPE_SZ, size)
                break
        # Ranges one lending offers: an empty pipe takes them all (a range of
        # at most a page fills one slot, or two where it straddles pages; a
        # batch has a header, the only such range, every 129), so that the
        # ranges lent are dropped whole, without working out where one ended.
        slots = fcntl.fcntl(self._write_fd, _F_GETPIPE_SZ) // _PAGE_SIZE
        self._lend_rows = max(1, slots - slots // 64 - 1)
        self.queued = 0  # bytes in the pipe, not yet in the socket

    def put(self, view: memoryview) -> int:
        """Copy a prefix of `view` into the pipe; returns its length (0: full)."""
        try:
            n = os.write(self._write_fd, view)
        except BlockingIOError:
            return 0
        self.queued += n
        return n

    def lend_iovec(self, iov: IOVec) -> int:
        """Lend ranges of `iov` to the pipe, as many as an empty pipe takes;
        returns how many bytes went in (0: full). What did not go in is still
        in `iov`, advanced."""
        rows = min(iov.count, IOV_MAX, self._lend_rows)
        try:
            n = vmsplice(self._write_fd, iov.address, rows, _SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return 0
        self.queued += n
        if n == iov.total:
            iov.advance(n)
        elif n == (offered := iov.head_bytes(rows)):
            iov.drop(rows, offered)
        else:  # a pipe not empty, or a range that filled more slots than thought
            iov.advance(n)
        return n

    def drain_some(self, socket_fd: int) -> int:
        """Move queued bytes into the socket: one splice(2), which may move part
        of them; returns how many it moved."""
        n = os.splice(self._read_fd, socket_fd, self.queued)
        self.queued -= n
        return n

    def close(self) -> None:
        """Release the pipe, and with it any pages it still holds."""
        for fd in (self._read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def unsent_bytes(socket_fd: int) -> int:
    """Bytes written into a unix stream socket that its peer has not read yet
    (SIOCOUTQ): while they are there, lent pages are still referenced."""
    out = bytearray(4)
    fcntl.ioctl(socket_fd, _SIOCOUTQ, out)
    return int.from_bytes(out, "little", signed=True)
