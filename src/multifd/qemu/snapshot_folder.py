"""A snapshot folder, as `save` writes it and `restore` reads it: its manifest
and files, each checked before anything is created, sent or mapped, with an
error that names the file and what is wrong with it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..memory import RAMBlock

MANIFEST = "manifest.json"
CONFIGURATION_FILE = "configuration.bin"
DEVICE_STATE_FILE = "device-state.bin"
FORMAT = 1


class SnapshotError(RuntimeError):
    """A save or restore that cannot go on; the message says why."""


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read a few MiB at a time (block files are GiBs)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_new_folder(folder: Path) -> None:
    if not folder.exists():
        return
    if not folder.is_dir():
        raise SnapshotError(f"{folder} is not a folder")
    if (folder / MANIFEST).exists():
        raise SnapshotError(f"{folder} already holds a snapshot ({MANIFEST}); use a new folder")
    if any(folder.iterdir()):
        # Block files are named after QEMU's blocks: a file of the user's could be overwritten.
        raise SnapshotError(f"{folder} is not empty: save into a new or empty folder")


@contextmanager
def removed_on_failure(folder: Path) -> Iterator[None]:
    """Create `folder` (and missing parents) for a save; if the save fails,
    remove what it created, or empty the folder again if it was there (empty)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        else:
            for entry in folder.iterdir():
                entry.unlink(missing_ok=True)  # a save writes only files there
        raise


MANIFEST_MEMBERS = {"base-memory": int, "ram-section-id": int, "channels": int, "blocks": list}
BLOCK_MEMBERS = {"name": str, "used_length": int, "file": str}
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "an integer"}


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    return JSON_TYPES.get(type(value), "null" if value is None else "a number")


def _check_members(path: Path, where: str, value: Any, members: dict[str, type]) -> None:
    if not isinstance(value, dict):
        raise SnapshotError(f"{path}: {where} is {_json_type(value)}, not an object")
    for name, kind in members.items():
        if name not in value:
            raise SnapshotError(f"{path}: {where} has no {name!r}")
        member = value[name]
        if _json_type(member) != JSON_TYPES[kind] or (kind is int and member < 0):
            raise SnapshotError(
                f"{path}: {where}'s {name!r} is {member!r}, not "
                + ("a non-negative integer" if kind is int else JSON_TYPES[kind])
            )


def load_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the snapshot in `folder`, with every member restore uses checked."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{folder} is not a snapshot: {MANIFEST} is missing") from None
    except ValueError as exc:
        raise SnapshotError(f"{path}: not valid JSON ({exc})") from None
    _check_members(path, "the manifest", manifest, {})
    if manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT}")
    _check_members(path, "the manifest", manifest, MANIFEST_MEMBERS)
    if not manifest["blocks"]:
        raise SnapshotError(f"{path}: 'blocks' is empty")
    for i, block in enumerate(manifest["blocks"]):
        _check_members(path, f"blocks[{i}]", block, BLOCK_MEMBERS)
        # Restore reads and maps these files: none outside the folder.
        if block["file"] in ("", ".", "..") or Path(block["file"]).name != block["file"]:
            raise SnapshotError(
                f"{path}: blocks[{i}]'s 'file' is {block['file']!r}, not a file name"
            )
    names = [block["name"] for block in manifest["blocks"]]
    if len(set(names)) != len(names):
        raise SnapshotError(f"{path}: a block name comes twice in {names}")
    return manifest


def read_snapshot_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read it ({exc.strerror})") from None


def open_blocks(folder: Path, manifest: dict[str, Any]) -> list[RAMBlock]:
    """Every block file, each checked against the manifest."""
    blocks: list[RAMBlock] = []
    try:
        for entry in manifest["blocks"]:
            path = folder / entry["file"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise SnapshotError(
                    f"{path} is missing: the snapshot's block {entry['name']!r} is not there"
                ) from None
            if size != entry["used_length"]:
                raise SnapshotError(
                    f"{path} has {size} bytes, but the snapshot's block {entry['name']!r} "
                    f"has {entry['used_length']}: the file was changed after the save"
                )
            try:
                blocks.append(RAMBlock.from_file(entry["name"], path, entry["used_length"]))
            except ValueError as exc:  # a name no RAM block can have
                raise SnapshotError(f"{folder / MANIFEST}: {exc}") from None
    except BaseException:
        for block in blocks:
            block.close()
        raise
    return blocks


def check_block_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Each block file's sha256 against the manifest's; the files can be GiBs,
    so they are read once, here."""
    changed = []
    for block in manifest["blocks"]:
        path = folder / block["file"]
        try:
            digest = file_sha256(path)
        except OSError as exc:
            raise SnapshotError(f"{path}: {exc.strerror or exc}") from None
        if digest != block.get("sha256"):
            changed.append(block["name"])
    if changed:
        raise SnapshotError(
            f"{folder}: the sha256 of block {', '.join(changed)} does not match the "
            f"manifest's: the file changed after the snapshot was saved"
        )
