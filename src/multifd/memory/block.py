"""RAMBlock: a named, page-aligned region of memory that a migration sends or fills,
backed by anonymous memory, a shared file, a memfd, or the application's own buffer."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any, Self

import numpy as np
import numpy.typing as npt

from . import _linux
from .bitmap import DirtyBitmap

PAGE_SIZE = _linux.PAGE_SIZE
MAX_NAME_BYTES = 255  # QEMU's RAMBlock idstr is char[256], NUL-terminated
# memfd_create(2) names are at most 249 bytes (NAME_MAX minus "memfd:").
_MEMFD_NAME_BYTES = 249


def validate_name(name: str) -> str:
    """Check a block name against QEMU's idstr rules; returns it unchanged."""
    if not isinstance(name, str):
        raise TypeError(f"RAMBlock name must be a str, got {type(name).__name__}")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"RAMBlock name {name[:40]!r}: not valid UTF-8 (QEMU idstr)") from None
    if not 1 <= len(encoded) <= MAX_NAME_BYTES:
        raise ValueError(
            f"RAMBlock name {name[:40]!r}: must be 1-{MAX_NAME_BYTES} bytes of UTF-8 "
            f"(QEMU idstr), got {len(encoded)} bytes"
        )
    if "\0" in name:
        raise ValueError(f"RAMBlock name {name!r}: must not contain NUL (QEMU idstr)")
    return name


def validate_size(name: str, size: int) -> int:
    """`size` if a block named `name` may have it, else a ValueError saying why."""
    if size <= 0 or size % PAGE_SIZE:
        rounded = max(PAGE_SIZE, -(-size // PAGE_SIZE) * PAGE_SIZE)
        raise ValueError(
            f"RAMBlock {name!r}: size {size} bytes is not a non-zero multiple of the "
            f"page size {PAGE_SIZE} (nearest valid: {rounded})"
        )
    # mmap lengths and file offsets are signed: beyond this the call cannot even be made.
    if size > sys.maxsize:
        raise ValueError(
            f"RAMBlock {name!r}: size {size} bytes is more than this machine can map "
            f"(at most {sys.maxsize // PAGE_SIZE * PAGE_SIZE})"
        )
    return size


@contextlib.contextmanager
def _naming(name: str, doing: str) -> Iterator[None]:
    """An OSError from a system call says which block, and what it was doing."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, f"RAMBlock {name!r}: {doing}: {exc.strerror}") from None


class FileTooShortError(ValueError):
    """`from_file` without `create`: the file holds fewer bytes than the block's size."""

    def __init__(self, name: str, path: str, length: int, size: int) -> None:
        self.name = name
        self.path = path
        self.length = length
        self.size = size
        super().__init__(
            f"RAMBlock {name!r}: file {path!r} has {length} bytes, fewer than "
            f"size {size}; pass create=True to extend it"
        )


class MarkLog:
    """The pages marked with `RAMBlock.mark_dirty` since this log was last taken.

    A block feeds every open log, so several trackers can each see every mark.
    """

    def __init__(self, block: RAMBlock) -> None:
        self._block = block
        self._lock = threading.Lock()
        self._marked = DirtyBitmap(block.pages)

    def mark(self, first: int, count: int) -> None:
        with self._lock:
            self._marked.set_range(first, count)

    def take(self) -> DirtyBitmap:
        """The marks so far; the log starts empty again (atomically)."""
        fresh = DirtyBitmap(self._marked.pages)
        with self._lock:
            marked, self._marked = self._marked, fresh
        return marked

    def close(self) -> None:
        self._block._drop_mark_log(self)


class RAMBlock:
    """A named region of memory of `pages` pages of 4096 bytes.

    Naming and sizes follow QEMU: the name is an idstr of 1-255 bytes of UTF-8,
    the size a whole number of 4 KiB target pages.

    Build one with `anonymous`, `from_file`, `memfd` or `from_buffer`. `close()`
    releases what the block created (mapping, fd); a buffer the application passed
    in stays the application's. If views of the memory are still alive at close,
    the mapping is unmapped when the last of them goes away.
    """

    def __init__(
        self,
        name: str,
        memory: Any,
        *,
        kind: str = "buffer",
        mapping: mmap.mmap | None = None,
        fd: int | None = None,
        path: str | None = None,
    ) -> None:
        """Wrap `memory` (any writable, contiguous buffer) as a block; the
        keyword arguments are for the constructors, which own what they pass."""
        self._name = validate_name(name)
        try:
            array = np.frombuffer(memory, dtype=np.uint8)
        except (TypeError, ValueError, BufferError) as exc:
            raise ValueError(
                f"RAMBlock {name!r}: memory must be a contiguous buffer: {exc}"
            ) from None
        if not array.flags.writeable:
            raise ValueError(f"RAMBlock {name!r}: memory is read-only; a writable buffer is needed")
        self._pages = validate_size(name, array.size) // PAGE_SIZE
        self._array: npt.NDArray[np.uint8] | None = array
        self._buffer: memoryview | None = array.data
        self._address = int(array.ctypes.data)
        self._kind = kind
        self._mapping = mapping
        self._fd = fd
        self._path = path
        self._mark_logs: list[MarkLog] = []
        self._mark_logs_lock = threading.Lock()
        # Zeroed memory that no writable view or descriptor has been handed out
        # for yet (see take_untouched): the constructors that make it say so.
        self._untouched = False
        self._fd_handed_out = False

    # -- constructors ----------------------------------------------------------------

    @classmethod
    def anonymous(cls, name: str, size: int, *, shared: bool = False) -> RAMBlock:
        """Fresh zeroed anonymous memory; `shared=True` survives fork() as shared memory."""
        validate_name(name)
        validate_size(name, size)
        flags = mmap.MAP_SHARED if shared else mmap.MAP_PRIVATE
        with _naming(name, f"map {size} bytes of anonymous memory"):
            mapping = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # Transparent huge pages where the kernel allows them, as QEMU asks for
        # its RAM: pages written at scattered offsets (a destination receiving a
        # later round) then miss the TLB far less; received that way, 1 GiB took
        # 0.46-0.50 s of CPU instead of 0.70-0.85 s. Write tracking stays exact:
        # the first tracked write to a huge page splits it.
        with contextlib.suppress(OSError):  # THP off or absent in this kernel
            mapping.madvise(mmap.MADV_HUGEPAGE)
        kind = "shared-anonymous" if shared else "anonymous"
        return cls(name, mapping, kind=kind, mapping=mapping)._fresh()

    @classmethod
    def from_file(
        cls,
        name: str,
        path: str | os.PathLike[str],
        size: int | None = None,
        *,
        create: bool = False,
    ) -> RAMBlock:
        """A shared mapping of a file (e.g. under /dev/shm); writes reach the file.

        `size` defaults to the file's size. With `create=True` a missing file is
        created and a shorter one extended to `size`; the file is never removed.
        """
        validate_name(name)
        if size is not None:
            validate_size(name, size)
        path = os.fspath(path)
        flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
        with _naming(name, f"open {path!r}"):
            fd = os.open(path, flags, 0o600)
        # Kept open for `alias()`; the mapping alone would keep the file alive.
        try:
            length = os.fstat(fd).st_size
            fresh = length == 0  # what ftruncate adds to an empty file reads as zeros
            if size is None:
                if length == 0:
                    raise ValueError(f"RAMBlock {name!r}: file {path!r} is empty; pass size=")
                size = validate_size(name, length)
            elif length < size:
                if not create:
                    raise FileTooShortError(name, path, length, size)
                with _naming(name, f"extend {path!r} to {size} bytes"):
                    os.ftruncate(fd, size)
            with _naming(name, f"map {size} bytes of {path!r}"):
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        block = cls(name, mapping, kind="file", mapping=mapping, fd=fd, path=path)
        return block._fresh() if fresh else block

    @classmethod
    def memfd(cls, name: str, size: int) -> RAMBlock:
        """Shared memory with no path (memfd_create); `fd` lets another process map it
        (for example as /proc/<pid>/fd/<fd>, or passed over a unix socket)."""
        validate_name(name)
        validate_size(name, size)
        label = f"multifd:{name}".encode()[:_MEMFD_NAME_BYTES].decode("utf-8", "ignore")
        fd = os.memfd_create(label, os.MFD_CLOEXEC)
        try:
            with _naming(name, f"map {size} bytes of shared memory"):
                os.ftruncate(fd, size)
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        return cls(name, mapping, kind="memfd", mapping=mapping, fd=fd)._fresh()

    @classmethod
    def from_buffer(cls, name: str, memory: Any) -> RAMBlock:
        """The application's own writable buffer (bytearray, numpy array, mmap…),
        used in place: no copy, and `close()` leaves it alone."""
        return cls(name, memory)

    def _fresh(self) -> Self:
        self._untouched = True
        return self

    # -- what it is ------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def kind(self) -> str:
        """'anonymous', 'shared-anonymous', 'file', 'memfd' or 'buffer'."""
        return self._kind

    @property
    def used_length(self) -> int:
        return self.pages * PAGE_SIZE

    @property
    def page_size(self) -> int:
        return PAGE_SIZE

    @property
    def pages(self) -> int:
        return self._pages

    @property
    def address(self) -> int:
        """Virtual address of the first byte in this process (for kernel interfaces)."""
        return self._address

    @property
    def fd(self) -> int | None:
        """The memfd of a `memfd` block, else None."""
        if self._kind != "memfd":
            return None
        self._untouched = False  # another process may map it and write
        self._fd_handed_out = True
        return self._fd

    @property
    def may_be_written_elsewhere(self) -> bool:
        """Whether another process may write this memory: a file (anyone may
        map it), shared anonymous memory (a forked child), a memfd whose
        descriptor was handed out. A dirty tracker that reads this process's
        page tables sees none of their writes."""
        return self._kind in ("file", "shared-anonymous") or self._fd_handed_out

    @property
    def path(self) -> str | None:
        """The file of a `from_file` block, else None."""
        return self._path

    @property
    def closed(self) -> bool:
        return self._buffer is None

    @property
    def buffer(self) -> memoryview:
        """The whole block as a writable 1-D memoryview of bytes."""
        if self._buffer is None:
            raise ValueError(f"RAMBlock {self._name!r} is closed")
        self._untouched = False
        return self._buffer

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """The whole block as a writable numpy uint8 array (a view, not a copy)."""
        array = self._open_array()
        self._untouched = False
        return array

    def _open_array(self) -> npt.NDArray[np.uint8]:
        if self._array is None:
            raise ValueError(f"RAMBlock {self._name!r} is closed")
        return self._array

    def alias(self) -> RAMBlock | None:
        """A second shared mapping of this block's memory (file and memfd
        blocks; None for the others), to read it through page tables of its
        own: a dirty tracker registered on the block's mapping turns off the
        kernel's fault-around there and would make every first read fault a
        page at a time. Writes through an alias reach the block untracked, so
        only read through it. The alias is closed on its own; closing the
        block does not unmap it."""
        if self._buffer is None:
            raise ValueError(f"RAMBlock {self._name!r} is closed")
        if self._fd is None:
            return None
        with _naming(self._name, "alias"):
            mapping = mmap.mmap(self._fd, self.used_length, flags=mmap.MAP_SHARED)
        return RAMBlock(self._name, mapping, kind=self._kind, mapping=mapping, path=self._path)

    def take_untouched(self) -> bool:
        """Whether the block still holds the zeros it was made with, as far as
        it can tell: fresh memory (`anonymous`, `memfd`, a file `from_file`
        created) for which no writable view (`array`, `buffer`, `page`,
        `page_rows`) or descriptor (`fd`) has been handed out. A destination
        asks once, before it writes: it then need not check or clear a zero
        page it has not written itself (as QEMU trusts its fresh RAM). Later
        calls say False: the caller has taken the memory over."""
        untouched, self._untouched = self._untouched, False
        return untouched

    def page_rows(self, dtype: npt.DTypeLike = np.uint8) -> npt.NDArray[Any]:
        """The block as a (pages, page_size // itemsize) array of `dtype`, no copy."""
        words = self.array.view(dtype)
        return words.reshape(self.pages, -1)

    def page(self, index: int, count: int = 1) -> memoryview:
        """A writable view of `count` pages from page `index`."""
        if index < 0 or count < 1 or index + count > self.pages:
            raise IndexError(
                f"RAMBlock {self._name!r}: pages {index}..{index + count - 1} "
                f"outside 0..{self.pages - 1}"
            )
        return self.buffer[index * PAGE_SIZE : (index + count) * PAGE_SIZE]

    def sha256(self) -> str:
        """Hex SHA-256 of the whole block, to compare two blocks' contents."""
        if self._buffer is None:
            raise ValueError(f"RAMBlock {self._name!r} is closed")
        return hashlib.sha256(self._buffer).hexdigest()

    # -- preparing and marking -------------------------------------------------------

    def prefault(self) -> None:
        """Fault every page in writable, so that later writes (a destination
        receiving pages) do not pay the first-touch fault, 2.5-3x the copy cost.

        Uses MADV_POPULATE_WRITE (Linux 5.14+), which leaves the contents alone;
        otherwise adds 0 to one byte per page, which must not race other writers.
        """
        if self._populate(_linux.MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE"):
            return
        array = self._open_array()  # adding 0 leaves an untouched block untouched
        array[::PAGE_SIZE] += 0
        array[-1:] += 0  # an unaligned buffer's last byte may sit in one more page

    def populate(self, offset: int = 0, length: int | None = None) -> None:
        """Map bytes [offset, offset+length) (default: all) in for reading,
        contents untouched, safe while the workload writes: one
        madvise(MADV_POPULATE_READ) instead of a fault per page (or per 16
        pages) when a round first reads them."""
        end = self.used_length if length is None else min(offset + length, self.used_length)
        if end <= offset:
            return
        if self._populate(_linux.MADV_POPULATE_READ, "MADV_POPULATE_READ", offset, end):
            return
        array = self._open_array()[offset:end]
        int(array[::PAGE_SIZE].sum()) + int(array[-1])

    def _populate(self, advice: int, label: str, offset: int = 0, end: int | None = None) -> bool:
        """madvise(advice) over bytes [offset, end) of the block (default: all);
        False where the kernel lacks it."""
        end = self.used_length if end is None else end
        start = (self._address + offset) & ~(PAGE_SIZE - 1)
        end = -(-(self._address + end) // PAGE_SIZE) * PAGE_SIZE
        try:
            _linux.madvise(start, end - start, advice)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise OSError(
                    exc.errno, f"RAMBlock {self._name!r}: madvise({label}): {exc.strerror}"
                ) from None
            return False
        return True

    def mark_dirty(self, offset: int, length: int) -> None:
        """Tell the trackers that bytes [offset, offset+length) were written.

        Every page the range touches becomes dirty. Thread-safe.
        """
        if offset < 0 or length < 0 or offset + length > self.used_length:
            raise ValueError(
                f"RAMBlock {self._name!r}: mark_dirty({offset:#x}, {length:#x}) outside "
                f"the block (used_length {self.used_length:#x})"
            )
        if length == 0:
            return
        first = offset // PAGE_SIZE
        count = (offset + length - 1) // PAGE_SIZE - first + 1
        with self._mark_logs_lock:
            for log in self._mark_logs:
                log.mark(first, count)

    def mark_log(self) -> MarkLog:
        """A new log of the pages marked from now on; `close()` it when done."""
        log = MarkLog(self)
        with self._mark_logs_lock:
            self._mark_logs.append(log)
        return log

    def _drop_mark_log(self, log: MarkLog) -> None:
        with self._mark_logs_lock:
            if log in self._mark_logs:
                self._mark_logs.remove(log)

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Release the mapping and fd this block created; closing twice is fine."""
        if self._buffer is None:
            return
        buffer, self._buffer, self._array = self._buffer, None, None
        # A view still held elsewhere (a page() slice, a numpy array) keeps the
        # mapping exported; it is then unmapped when the last such view dies.
        with contextlib.suppress(BufferError):
            buffer.release()
        del buffer
        if self._mapping is not None:
            with contextlib.suppress(BufferError):
                self._mapping.close()
            self._mapping = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.used_length:#x} bytes"
        return f"<RAMBlock {self._name!r} {self._kind} {state}>"
