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


@dataclass(frozen=True)
class Recording:
    """The bytes of every connection of one migration, main first."""

    path: Path
    main: bytes
    channels: tuple[bytes, ...]  # multifd connections in accept order


def _read(path: Path) -> bytes:
    if path.suffix == ".xz":
        try:
            return lzma.decompress(path.read_bytes())
        except lzma.LZMAError as exc:
            raise ValueError(f"{path}: not a valid .xz file ({exc})") from None
    return path.read_bytes()


def load_recording(path: str | Path) -> Recording:
    """Load a recording folder or a single main-stream file."""
    path = Path(path)
    if path.is_file():
        return Recording(path, _read(path), ())
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    found: dict[int, Path] = {}
    for entry in path.iterdir():
        match = _CONN.match(entry.name)
        if match is None:
            continue
        index = int(match.group(1))
        if index in found:
            raise ValueError(f"{path}: both {found[index].name} and {entry.name} exist")
        found[index] = entry
    if 0 not in found:
        raise ValueError(f"{path}: no conn0.bin or conn0.bin.xz (the main channel)")
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ValueError(f"{path}: conn{missing[0]}.bin is missing (connections are numbered)")
    data = [_read(found[i]) for i in sorted(found)]
    return Recording(path, data[0], tuple(data[1:]))
