"""A recorded migration on disk: the main stream and the multifd channels.

A folder holds ``conn0.bin`` (main) and ``conn1.bin`` … (multifd channels in
accept order), each possibly xz-compressed; a single file is a main stream.
"""

from __future__ import annotations

import lzma
import mmap
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_CONN = re.compile(r"^conn(\d+)\.bin(\.xz)?$")


class RecordingError(ValueError):
    """A recording that cannot be read at all; the message names the file."""


@dataclass(frozen=True)
class Recording:
    """The bytes of every connection of one migration, main first."""

    path: Path
    # Each connection's bytes (an mmap or bytes: anything with the buffer protocol).
    main: bytes | mmap.mmap
    channels: tuple[bytes | mmap.mmap, ...]  # multifd connections in accept order
    # The file each connection came from, main first, for the errors that name it.
    files: tuple[str, ...] = ()
    # Multifd connections absent from the numbering (conn2.bin when conn1 and
    # conn3 are there): what they carried is not in the recording.
    missing: tuple[str, ...] = ()

    def file(self, index: int) -> str:
        """The file name of connection `index` (0 is main)."""
        if index < len(self.files):
            return self.files[index]
        return "main stream" if index == 0 else f"connection {index}"


_CHUNK = 1 << 20


def _read(path: Path) -> mmap.mmap | bytes:
    """The connection's bytes, mapped rather than read: a recording of
    hundreds of MiB stays in the page cache, not in this process's heap. An
    .xz file is decompressed a chunk at a time into an unlinked temporary file."""
    try:
        with open(path, "rb") as f:
            if path.suffix == ".xz":
                return _decompress(path, f)
            return _map(f)
    except OSError as exc:
        raise RecordingError(f"{path}: cannot be read: {exc.strerror or exc}") from None


def _map(f: BinaryIO) -> mmap.mmap | bytes:
    if os.fstat(f.fileno()).st_size == 0:
        return b""  # mmap refuses an empty file
    return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


def _decompress(path: Path, f: BinaryIO) -> mmap.mmap | bytes:
    with tempfile.TemporaryFile() as out:
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        read = 0  # bytes of the .xz file fed to the decompressor
        while not decompressor.eof:
            chunk = b""
            if decompressor.needs_input:
                chunk = f.read(_CHUNK)
                read += len(chunk)
                if not chunk:
                    raise RecordingError(
                        f"{path}: byte {read:#x}: the xz stream is truncated "
                        "(the file ends before its end marker)"
                    )
            try:
                out.write(decompressor.decompress(chunk, _CHUNK))
            except lzma.LZMAError as exc:
                raise RecordingError(
                    f"{path}: not a valid .xz file ({exc}, within its first {read:#x} bytes)"
                ) from None
        trailing = len(decompressor.unused_data)
        if trailing or f.read(1):
            raise RecordingError(
                f"{path}: byte {read - trailing:#x}: bytes after the end of the xz stream"
            )
        out.flush()
        return _map(out)


def load_recording(path: str | Path) -> Recording:
    """Load a recording folder or a single main-stream file (RecordingError if
    neither can be read)."""
    path = Path(path)
    if path.is_file():
        return Recording(path, _read(path), (), (path.name,))
    if not path.is_dir():
        raise RecordingError(f"{path}: no such file or folder")
    found: dict[int, Path] = {}
    try:
        entries = list(path.iterdir())
    except OSError as exc:
        raise RecordingError(f"{path}: cannot be listed: {exc.strerror}") from None
    for entry in entries:
        match = _CONN.match(entry.name)
        if match is None:
            continue
        index = int(match.group(1))
        if index in found:
            raise RecordingError(f"{path}: both {found[index].name} and {entry.name} exist")
        found[index] = entry
    if 0 not in found:
        raise RecordingError(f"{path}: no conn0.bin or conn0.bin.xz (the main channel)")
    # A lost connection is reported by the analysis, which can say what it
    # cost; the channels that are there are still worth decoding.
    missing = tuple(f"conn{i}.bin" for i in range(1, max(found)) if i not in found)
    order = sorted(found)
    data = [_read(found[i]) for i in order]
    return Recording(path, data[0], tuple(data[1:]), tuple(found[i].name for i in order), missing)
