"""What the daemons take on their command line: RAM blocks as NAME=SIZE[@PATH],
capabilities as NAME=on|off and parameters as NAME=VALUE, checked before anything runs."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..memory import PAGE_SIZE, FileTooShortError, RAMBlock
from ..migration.params import (
    OWN_CAPABILITIES,
    QEMU_CAPABILITIES,
    SWITCH_WORDS,
    MigrationConfigError,
    parse_parameter_text,
)

# The name is everything before the first "=" that a size follows, so QEMU block
# names such as "/rom@etc/acpi/tables" work, and paths may hold "@" and "=".
_SIZE_TEXT = r"(?P<number>\d+(?:\.\d+)?)(?P<suffix>[kKmMgGtT]?)[bB]?"
_BLOCK = re.compile(rf"(?P<name>.+?)=(?P<size>{_SIZE_TEXT})(?:@(?P<path>.+))?")
_SIZE = re.compile(_SIZE_TEXT)
_SHIFTS = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}


class OptionError(ValueError):
    """A command-line value that cannot be used; the message shows the right form."""


def parse_size(text: str) -> int:
    """Bytes, with an optional K, M, G or T suffix (powers of 1024): `64M`, `1.5G`."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise OptionError(f"not a size: {text!r} (try 4096, 64M, 1G)")
    return int(float(match["number"]) * (1 << _SHIFTS[match["suffix"].lower()]))


def format_size(size: int) -> str:
    """The shortest spelling that `parse_size` reads back exactly: 8192 → `8K`."""
    for suffix, shift in sorted(_SHIFTS.items(), key=lambda item: -item[1]):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{suffix.upper()}"
    return str(size)


@dataclass(frozen=True)
class BlockSpec:
    """A RAM block to create: anonymous memory, or a shared mapping of `path`."""

    name: str
    size: int
    path: Path | None = None

    @classmethod
    def parse(cls, text: str) -> BlockSpec:
        match = _BLOCK.fullmatch(text)
        if match is None:
            raise OptionError(
                f"not a block: {text!r} (NAME=SIZE or NAME=SIZE@PATH, e.g. pc.ram=64M)"
            )
        path = Path(match["path"]) if match["path"] else None
        return cls(match["name"], parse_size(match["size"]), path)

    def open(self, *, create: bool) -> RAMBlock:
        """The block; with a path, `create` makes (or extends) the file."""
        if self.path is None:
            return RAMBlock.anonymous(self.name, self.size)
        try:
            return RAMBlock.from_file(self.name, self.path, self.size, create=create)
        except FileTooShortError as exc:
            # Only a destination extends a file: a source sends what the file holds.
            fix = f"a file of at least {self.size} bytes"
            if exc.length and exc.length % PAGE_SIZE == 0:
                fits = f"--block {self.name}={format_size(exc.length)}@{self.path}"
                fix = f"the file's size ({fits}) or {fix}"
            raise OptionError(
                f"block {self.name!r}: {self.path} has {exc.length} bytes, fewer than the "
                f"{format_size(self.size)} given; give {fix}"
            ) from None


def open_blocks(specs: list[BlockSpec], *, create: bool) -> list[RAMBlock]:
    """All the blocks, or none: those already opened are closed if one fails."""
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise OptionError(f"block names must be unique: {', '.join(duplicates)}")
    blocks: list[RAMBlock] = []
    try:
        for spec in specs:
            blocks.append(spec.open(create=create))
    except BaseException:
        for block in blocks:
            block.close()
        raise
    return blocks


@dataclass(frozen=True)
class FilesBefore:
    """The block files a destination is about to create or extend, as they are now:
    a daemon that fails to start puts them back, so that it leaves nothing changed."""

    missing: tuple[Path, ...] = ()
    shorter: tuple[tuple[Path, os.stat_result], ...] = ()

    @classmethod
    def of(cls, specs: list[BlockSpec]) -> FilesBefore:
        missing: dict[Path, None] = {}
        shorter: dict[Path, os.stat_result] = {}
        for spec in specs:
            if spec.path is None or spec.path in missing or spec.path in shorter:
                continue
            try:
                status = spec.path.stat()
            except FileNotFoundError:
                missing[spec.path] = None
                continue
            except OSError:
                continue  # opening it fails too, and changes nothing
            if status.st_size < spec.size:
                shorter[spec.path] = status
        return cls(tuple(missing), tuple(shorter.items()))

    def restore(self) -> None:
        """Remove the files that were missing, cut the others back to their length
        and times (after the blocks are closed). Best effort: it runs on the way
        out of another error."""
        for path in self.missing:
            with contextlib.suppress(OSError):
                path.unlink()
        for path, status in self.shorter:
            with contextlib.suppress(OSError):
                os.truncate(path, status.st_size)
                os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))


def parse_capability(text: str) -> tuple[str, bool]:
    """`multifd=on` → ("multifd", True)."""
    name, sep, state = text.partition("=")
    if not sep or state.lower() not in SWITCH_WORDS:
        raise OptionError(f"not a capability setting: {text!r} (NAME=on or NAME=off)")
    known = QEMU_CAPABILITIES + OWN_CAPABILITIES
    if name not in known:
        raise OptionError(f"unknown capability {name!r} (known: {', '.join(known)})")
    return name, SWITCH_WORDS[state.lower()]


def parse_parameter(text: str) -> tuple[str, Any]:
    """`downtime-limit=300` → ("downtime-limit", 300); sizes take K/M/G suffixes."""
    name, sep, value = text.partition("=")
    if not sep:
        raise OptionError(f"not a parameter setting: {text!r} (NAME=VALUE)")
    try:
        return name, parse_parameter_text(name, value)
    except MigrationConfigError as exc:
        raise OptionError(str(exc)) from None


# QEMU's -uuid takes exactly this form (qemu_uuid_parse).
_UUID_FORM = re.compile(r"[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")


def parse_uuid(text: str) -> bytes:
    """`6f1c52c8-f4a3-4d0c-9a3b-e7e1a0b2c3d4` → its 16 bytes, as QEMU's -uuid."""
    if not _UUID_FORM.fullmatch(text):
        raise OptionError(f"not a UUID: {text!r} (8-4-4-4-12 hex digits, as QEMU's -uuid)")
    return bytes.fromhex(text.replace("-", ""))
