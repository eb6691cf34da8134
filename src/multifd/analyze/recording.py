"""A recorded migration on disk: the main stream and the multifd channels.

A folder holds ``conn0.bin`` (main) and ``conn1.bin`` … (multifd channels in
accept order), each possibly xz-compressed; a single file is a main stream.
"""

from __future__ import annotations

import lzma
import re
from dataclasses import dataclass
from pathlib import Path

_CONN = re.compile(r"^conn(\d+)\.bin(\.xz)?$")


class RecordingError(ValueError):
    """A recording that cannot be read at all; the message names the file."""


@dataclass(frozen=True)
class Recording:
    """The bytes of every connection of one migration, main first."""

    path: Path
    main: bytes
    channels: tuple[bytes, ...]  # multifd connections in accept order
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


def _read(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecordingError(f"{path}: cannot be read: {exc.strerror}") from None
    if path.suffix != ".xz":
        return raw
    try:
        return lzma.decompress(raw, format=lzma.FORMAT_XZ)
    except lzma.LZMAError as exc:
        raise RecordingError(f"{path}: not a valid .xz file ({exc})") from None


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
