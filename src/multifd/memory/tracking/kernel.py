"""The preferred tracker: the kernel write-protects the block with userfaultfd in
asynchronous mode, and one PAGEMAP_SCAN ioctl returns and re-protects written pages."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import select
import socket
import struct
import threading
from dataclasses import dataclass

import numpy as np

from .. import _linux
from ..bitmap import DirtyBitmap
from ..block import PAGE_SIZE, RAMBlock
from .base import TrackerBase, TrackerUnavailable

_FEATURES_NEEDED = _linux.UFFD_FEATURE_WP_ASYNC | _linux.UFFD_FEATURE_WP_UNPOPULATED
# Needed for shared memory (memfd, /dev/shm, shared anonymous); anonymous works without.
_FEATURES_WANTED = _FEATURES_NEEDED | _linux.UFFD_FEATURE_WP_HUGETLBFS_SHMEM
# Regions per PAGEMAP_SCAN call (24 bytes each); a fuller scan goes on from walk_end.
_REGIONS_PER_SCAN = 16384
# After a lazy start, a helper thread sets up the range this far ahead of the
# first round: mapping in and protecting 64 MiB takes a few ms, which then
# overlaps the round's scan and sending of the range before it.
_COVER_AHEAD = 64 << 20

# Pages of a range that must be mapped already for it to be read in place
# rather than through the alias: all but one in _IN_PLACE_SHARE. The alias maps
# 16 pages per fault; the block, registered for write-protection, one.
_IN_PLACE_SHARE = 16

# The handoff: magic, pid, address and length of the block in the workload, and
# its name, in one fixed-size message carrying the userfaultfd as SCM_RIGHTS.
_HANDOFF = struct.Struct("<8sQQQH256s")
_HANDOFF_MAGIC = b"MFDUFFD1"

# What to do about the failures people actually meet.
_HINTS = {
    # With UFFD_USER_MODE_ONLY only seccomp or an LSM refuses (containers often do).
    ("userfaultfd", errno.EPERM): "blocked by a seccomp or security policy",
    ("userfaultfd", errno.ENOSYS): "kernel built without CONFIG_USERFAULTFD",
    ("UFFDIO_REGISTER", errno.EBUSY): "the range is already tracked by another userfaultfd",
    ("UFFDIO_REGISTER", errno.EINVAL): "not mapped, or memory userfaultfd cannot track",
    ("PAGEMAP_SCAN", errno.ENOTTY): "kernel lacks PAGEMAP_SCAN (Linux 6.7+)",
    ("PAGEMAP_SCAN", errno.EPERM): "range not write-protected in asynchronous mode",
}


def _explain(block_name: str, operation: str, exc: OSError) -> TrackerUnavailable:
    hint = _HINTS.get((operation, exc.errno or 0))
    reason = f"{exc.strerror or exc}" + (f": {hint}" if hint else "")
    return TrackerUnavailable(
        exc.errno or 0, f"RAMBlock {block_name!r}: kernel dirty tracking: {operation}: {reason}"
    )


@functools.cache
def _supported_features() -> int:
    """The UFFDIO_API features this kernel offers (asked once, on a throwaway fd)."""
    fd = _linux.userfaultfd(_linux.O_CLOEXEC | _linux.O_NONBLOCK | _linux.UFFD_USER_MODE_ONLY)
    try:
        api = _linux.UffdioApi(api=_linux.UFFD_API, features=0)
        _linux.ioctl(fd, _linux.UFFDIO_API, api)
        return int(api.features)
    finally:
        os.close(fd)


def _page_span(start: int, length: int) -> tuple[int, int]:
    """The page-aligned address range [base, end) holding bytes [start, start+length)."""
    base = start & ~(PAGE_SIZE - 1)
    end = -(-(start + length) // PAGE_SIZE) * PAGE_SIZE
    return base, end


def _new_uffd(block: RAMBlock) -> int:
    """A userfaultfd of this process, set up for asynchronous write-protection."""
    try:
        fd = _linux.userfaultfd(_linux.O_CLOEXEC | _linux.O_NONBLOCK | _linux.UFFD_USER_MODE_ONLY)
    except OSError as exc:
        raise _explain(block.name, "userfaultfd", exc) from None
    try:
        features = _supported_features()
        if features & _FEATURES_NEEDED != _FEATURES_NEEDED:
            raise OSError(
                errno.EOPNOTSUPP, "no UFFD_FEATURE_WP_ASYNC / WP_UNPOPULATED (Linux 6.7+)"
            )
        api = _linux.UffdioApi(api=_linux.UFFD_API, features=features & _FEATURES_WANTED)
        _linux.ioctl(fd, _linux.UFFDIO_API, api)
    except OSError as exc:
        os.close(fd)
        raise _explain(block.name, "UFFDIO_API", exc) from None
    return fd


def _register(fd: int, block: RAMBlock, base: int, end: int) -> None:
    """Register [base, end) of `block`'s mapping for write-protection."""
    register = _linux.UffdioRegister(
        range=_linux.UffdioRange(start=base, len=end - base),
        mode=_linux.UFFDIO_REGISTER_MODE_WP,
    )
    try:
        _linux.ioctl(fd, _linux.UFFDIO_REGISTER, register)
        if not register.ioctls & _linux.UFFDIO_WRITEPROTECT_IOCTL_BIT:
            raise OSError(errno.EOPNOTSUPP, "UFFDIO_WRITEPROTECT not offered for this memory")
    except OSError as exc:
        raise _explain(block.name, "UFFDIO_REGISTER", exc) from None


def _new_registered_uffd(block: RAMBlock) -> int:
    """A userfaultfd of this process with `block` registered for write-protection."""
    fd = _new_uffd(block)
    try:
        _register(fd, block, *_page_span(block.address, block.used_length))
    except OSError:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class _Remote:
    """A workload's tracking as received: its pid, block address and userfaultfd."""

    pid: int
    address: int
    uffd: int


class KernelTracker(TrackerBase):
    """userfaultfd asynchronous write-protect plus PAGEMAP_SCAN over one block.

    Exact and atomic, with no fault-handler thread; the writer pays about 1 µs on
    its first write to each page in a round. uffd-wp state lives in page tables,
    so it sees the writes of one process (its page tables), whatever memory they
    go to. Needs Linux 6.7+; `probe()` says why not where it does not work.

    `KernelTracker(block)` tracks this process's writes to `block`;
    `KernelTracker.from_remote(block, sock)` those of a workload process that
    called `share_tracking`. Raises TrackerUnavailable, saying why, where the
    kernel or the memory does not allow it. One thread calls start/collect.

    The kernel does no fault-around in a range registered for uffd-wp, so a
    first read there faults a page at a time (about 0.5 s per GiB, far more
    with the send threads running). Where the block is a file or memfd,
    `reader` is therefore a second mapping of it, never registered: the first
    reads fault it in 16 pages at a time, and the block's own page tables are
    only write-protected (unpopulated pages cheaply, as markers). Otherwise
    `reader` is the block, each range mapped in (one madvise) just before it
    is registered, on a helper thread ahead of the first round. Against
    mapping in and protecting the block itself, the alias took 7-15 % less
    time over a fresh 1 GiB mapping (Python→Python, 1, 2 and 4 channels).
    Where this process has the block's pages mapped already (its own workload
    wrote them), `reader_for` reads them in place instead.
    """

    name = "kernel"

    def __init__(self, block: RAMBlock, *, _remote: _Remote | None = None) -> None:
        super().__init__(block)
        self._uffd: int | None = None
        self._pagemap: int | None = None
        self._pidfd: int | None = None
        self._pid = _remote.pid if _remote else None
        address = _remote.address if _remote else block.address
        self._base, self._end = _page_span(address, block.used_length)
        # An unaligned block straddles pages: its page i lies in real pages i and i+1.
        self._straddles = address != self._base
        self._regions = np.empty((_REGIONS_PER_SCAN, 3), dtype=np.uint64)
        # Addresses from here to _end are not registered yet (a local tracker
        # registers when started, or range by range after a lazy start).
        self._registered_to = self._end if _remote else self._base
        self._covered_to = self._end  # below it, pages are tracked since start()
        # The helper covering ahead of the first round, and what it raised.
        self._ahead: threading.Thread | None = None
        self._ahead_error: OSError | None = None
        self._alias: RAMBlock | None = None
        try:
            if _remote is None:
                # Without an alias (out of mappings, say) reads go through the
                # block, mapped in before it is registered: slower, still right.
                with contextlib.suppress(OSError):
                    self._alias = block.alias()
                # Registering fails at once where the memory cannot be tracked
                # (that is when the caller falls back); one page is enough to know.
                self._uffd = _new_uffd(block)
                self._extend_to(min(self._base + PAGE_SIZE, self._end))
            else:
                self._uffd = _remote.uffd  # owned from here on, even if the rest fails
                self._pidfd = os.pidfd_open(_remote.pid)
            path = f"/proc/{'self' if self._pid is None else self._pid}/pagemap"
            self._pagemap = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self._release()
            if isinstance(exc, TrackerUnavailable):
                raise
            hint = ""
            if exc.errno in (errno.EACCES, errno.EPERM):
                hint = " (reading another process's pagemap needs ptrace access to it)"
            raise TrackerUnavailable(
                exc.errno or 0,
                f"RAMBlock {block.name!r}: kernel dirty tracking: {self._pagemap_target()}: "
                f"{exc.strerror or exc}{hint}",
            ) from None

    @staticmethod
    @functools.cache
    def probe() -> str | None:
        """None if kernel tracking works in this process, else why not.

        Tracks a two-page anonymous block through one write; the answer is cached.
        """
        block = RAMBlock.anonymous("kernel-tracking-probe", 2 * PAGE_SIZE)
        try:
            with KernelTracker(block) as tracker:
                tracker.start()
                block.array[PAGE_SIZE] = 1
                seen = tracker.collect().indices().tolist()
                if seen != [1]:
                    return f"kernel dirty tracking: probe write to page 1 reported as {seen}"
        except OSError as exc:
            return str(exc)
        finally:
            block.close()
        return None

    @classmethod
    def from_remote(cls, block: RAMBlock, sock: socket.socket) -> KernelTracker:
        """Receive a workload's tracking (sent by `share_tracking`) for `block`.

        `block` is this process's mapping of the same shared memory; the pages
        reported are the workload's writes through its own mapping.
        """
        if block.closed:  # checked first: the received fd would have no owner
            raise ValueError(f"RAMBlock {block.name!r} is closed: nothing to track")
        return cls(block, _remote=_receive_handoff(block, sock))

    @property
    def reader(self) -> RAMBlock:
        return self._alias if self._alias is not None else self.block

    def reader_for(self, first: int, count: int) -> RAMBlock:
        """The block itself where its own page tables map (nearly) all of pages
        [first, first+count), as they do where a workload in this process has
        written them; the alias otherwise. The alias's first read of a page
        maps it in, three quarters of what reading a fresh GiB costs; reading
        a mapped page in place costs no fault, and each of the few unmapped
        ones one fault (the kernel maps no neighbours along with it there)."""
        if self._alias is None or count <= 0:
            return self.reader
        assert self._pagemap is not None
        base, end = _page_span(self.block.address + first * PAGE_SIZE, count * PAGE_SIZE)
        arg = _linux.PmScanArg(
            size=ctypes.sizeof(_linux.PmScanArg),
            start=base,
            end=end,
            vec=self._regions.ctypes.data,
            vec_len=_REGIONS_PER_SCAN,
            category_mask=_linux.PAGE_IS_PRESENT,
            return_mask=_linux.PAGE_IS_PRESENT,
        )
        try:
            found = _linux.ioctl(self._pagemap, _linux.PAGEMAP_SCAN, arg)
        except OSError:
            return self._alias  # reading there is never wrong, only slower
        regions = self._regions[:found]
        mapped = int((regions[:, 1] - regions[:, 0]).sum()) // PAGE_SIZE
        # A scan that stopped early (a full region vector) counts the rest as
        # unmapped: the alias is then the safe guess.
        unmapped = (end - base) // PAGE_SIZE - mapped
        return self.block if unmapped * _IN_PLACE_SHARE <= mapped + unmapped else self._alias

    def _pagemap_target(self) -> str:
        if self._pid is None:
            return "/proc/self/pagemap"
        return f"/proc/{self._pid}/pagemap (workload process {self._pid})"

    def _fail(self, operation: str, exc: OSError) -> OSError:
        return OSError(
            exc.errno or 0,
            f"RAMBlock {self.block.name!r}: kernel dirty tracking of "
            f"{self._pagemap_target()}: {operation}: {exc.strerror or exc}",
        )

    def _start(self) -> None:
        self._extend_to(self._end)
        self._protect(self._base, self._end)
        self._covered_to = self._end

    def _start_lazily(self) -> None:
        # Nothing is protected yet: each range as the first round reaches it.
        self._covered_to = self._base

    def cover(self, first: int, count: int) -> None:
        end = min(self._base + (first + count + self._straddles) * PAGE_SIZE, self._end)
        # The helper sets _covered_to only once its range is protected: a
        # value read here without waiting for it never runs ahead of the truth.
        if self._ahead is not None and (end > self._covered_to or not self._ahead.is_alive()):
            self._join_ahead()
        if end > self._covered_to:
            self._cover_to(end)
        if self._ahead is None and self._covered_to < self._end and _COVER_AHEAD > 0:
            target = min(self._covered_to + _COVER_AHEAD, self._end)
            self._ahead = threading.Thread(
                target=self._cover_ahead,
                args=(target,),
                name=f"tracker-{self.block.name}",
                daemon=True,
            )
            self._ahead.start()

    def _cover_to(self, end: int) -> None:
        self._extend_to(end)
        self._protect(self._covered_to, end)
        self._covered_to = end

    def _cover_ahead(self, end: int) -> None:
        try:
            self._cover_to(end)
        except OSError as exc:
            self._ahead_error = exc

    def _join_ahead(self) -> None:
        """Wait for the helper; what it raised is raised here."""
        if self._ahead is not None:
            self._ahead.join()
            self._ahead = None
        error, self._ahead_error = self._ahead_error, None
        if error is not None:
            raise error

    def _extend_to(self, end: int) -> None:
        """Register the mapping up to `end` (a lazy start's later ranges),
        mapped in first if it is also where the pages are read."""
        if end > self._registered_to:
            assert self._uffd is not None
            if self._alias is None:
                # Offsets in the block: an unaligned one starts after _base.
                start = max(self._registered_to - self.block.address, 0)
                self.block.populate(start, end - self.block.address - start)
            _register(self._uffd, self.block, self._registered_to, end)
            self._registered_to = end

    def _protect(self, base: int, end: int) -> None:
        if end <= base:
            return
        assert self._uffd is not None
        protect = _linux.UffdioWriteprotect(
            range=_linux.UffdioRange(start=base, len=end - base),
            mode=_linux.UFFDIO_WRITEPROTECT_MODE_WP,
        )
        try:
            _linux.ioctl(self._uffd, _linux.UFFDIO_WRITEPROTECT, protect)
        except OSError as exc:
            raise self._fail("UFFDIO_WRITEPROTECT", exc) from None

    def _collect(self) -> DirtyBitmap:
        assert self._pagemap is not None
        self._join_ahead()
        written = DirtyBitmap((self._end - self._base) // PAGE_SIZE)
        uncovered = self._covered_to
        if uncovered < self._end:
            # Never tracked so far: count as written, and track from now on.
            written.set_runs(
                np.array([(uncovered - self._base) // PAGE_SIZE]),
                np.array([(self._end - uncovered) // PAGE_SIZE]),
            )
            self._extend_to(self._end)
            self._protect(uncovered, self._end)
            self._covered_to = self._end
        else:
            uncovered = self._end
        arg = _linux.PmScanArg(
            size=ctypes.sizeof(_linux.PmScanArg),
            flags=_linux.PM_SCAN_WP_MATCHING | _linux.PM_SCAN_CHECK_WPASYNC,
            end=self._end,
            vec=self._regions.ctypes.data,
            vec_len=_REGIONS_PER_SCAN,
            category_mask=_linux.PAGE_IS_WRITTEN,
            return_mask=_linux.PAGE_IS_WRITTEN,
        )
        arg.end = uncovered
        cursor = self._base
        while cursor < uncovered:
            arg.start = cursor
            try:
                count = _linux.ioctl(self._pagemap, _linux.PAGEMAP_SCAN, arg)
            except OSError as exc:
                raise self._fail("PAGEMAP_SCAN", exc) from None
            regions = self._regions[:count]
            written.set_runs(
                (regions[:, 0] - self._base) // PAGE_SIZE,
                (regions[:, 1] - regions[:, 0]) // PAGE_SIZE,
            )
            if arg.walk_end <= cursor:
                raise self._fail("PAGEMAP_SCAN", OSError(errno.EIO, "the scan made no progress"))
            cursor = arg.walk_end
        self._check_workload_alive()
        if not self._straddles:
            return written
        dirty = DirtyBitmap(self.block.pages)
        np.logical_or(written.array[:-1], written.array[1:], out=dirty.array)
        return dirty

    def _check_workload_alive(self) -> None:
        # Once a workload exits its page tables are gone, and with them the record
        # of what it wrote since the last collect: say so rather than report nothing.
        if self._pidfd is None:
            return
        poller = select.poll()
        poller.register(self._pidfd, select.POLLIN)
        if poller.poll(0):
            raise OSError(
                errno.ESRCH,
                f"RAMBlock {self.block.name!r}: kernel dirty tracking: workload process "
                f"{self._pid} has exited; its writes since the last collect are unknown",
            )

    def _close(self) -> None:
        # Closing anyway: what the helper raised no longer matters.
        with contextlib.suppress(OSError):
            self._join_ahead()
        if self._uffd is not None:
            # Unregistering also drops the write protection, so the application
            # stops paying for faults now, not only when the last fd copy closes.
            unregister = _linux.UffdioRange(start=self._base, len=self._end - self._base)
            # If the mapping or the workload is already gone there is nothing to undo.
            with contextlib.suppress(OSError):
                _linux.ioctl(self._uffd, _linux.UFFDIO_UNREGISTER, unregister)
        self._release()

    def _release(self) -> None:
        if self._alias is not None:
            self._alias.close()
        for attribute in ("_uffd", "_pagemap", "_pidfd"):
            fd = getattr(self, attribute)
            if fd is not None:
                setattr(self, attribute, None)
                os.close(fd)


def share_tracking(sock: socket.socket, block: RAMBlock) -> None:
    """In a workload process: hand the tracking of its writes to `block` to the
    migration source at the other end of the unix socket `sock`.

    Creates a userfaultfd for this process, registers `block` with it, and sends
    it with the pid, address and length (SCM_RIGHTS). The source's
    `KernelTracker.from_remote` receives it; this process keeps no copy.
    """
    uffd = _new_registered_uffd(block)
    try:
        message = _HANDOFF.pack(
            _HANDOFF_MAGIC,
            os.getpid(),
            block.address,
            block.used_length,
            len(block.name.encode()),
            block.name.encode(),
        )
        sent = socket.send_fds(sock, [message], [uffd])
        if sent != len(message):
            raise OSError(errno.EIO, f"sent {sent} of {len(message)} bytes")
    except OSError as exc:
        raise OSError(
            exc.errno or 0, f"RAMBlock {block.name!r}: share_tracking: {exc.strerror or exc}"
        ) from None
    finally:
        os.close(uffd)  # the source's copy keeps the registration alive


def _receive_handoff(block: RAMBlock, sock: socket.socket) -> _Remote:
    def refuse(problem: str) -> TrackerUnavailable:
        return TrackerUnavailable(
            errno.EPROTO, f"RAMBlock {block.name!r}: tracking handoff: {problem}"
        )

    message, fds, _flags, _address = socket.recv_fds(sock, _HANDOFF.size, 1, socket.MSG_WAITALL)
    try:
        while 0 < len(message) < _HANDOFF.size:  # a stream socket may split it
            more = sock.recv(_HANDOFF.size - len(message), socket.MSG_WAITALL)
            if not more:
                break
            message += more
        if len(message) != _HANDOFF.size:
            raise refuse(f"the workload sent {len(message)} of {_HANDOFF.size} bytes, then EOF")
        if len(fds) != 1:
            raise refuse(f"expected one userfaultfd, got {len(fds)} file descriptors")
        magic, pid, address, length, name_length, name = _HANDOFF.unpack(message)
        if magic != _HANDOFF_MAGIC:
            raise refuse(f"bad magic {magic!r}, expected {_HANDOFF_MAGIC!r}")
        remote_name = name[:name_length].decode("utf-8", "replace")
        if length != block.used_length:
            raise refuse(
                f"the workload's block {remote_name!r} has {length:#x} bytes, "
                f"this one {block.used_length:#x}"
            )
        kind = os.readlink(f"/proc/self/fd/{fds[0]}")
        if kind != "anon_inode:[userfaultfd]":
            raise refuse(f"the descriptor received is {kind}, not a userfaultfd")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return _Remote(pid=pid, address=address, uffd=fds[0])
