"""`multifd save` and `multifd restore` refusing what they can check without a
QEMU: the DIR, the --channels, the QMP address and peer, the snapshot folder.
Each is refused with one line on stderr, exit status 1, and nothing created."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from multifd.cli import main
from multifd.wire.stream import Configuration

NOWHERE = "unix:/nonexistent/qemu.qmp"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip()


def test_save_creates_no_folder_when_qemu_is_not_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "new" / "snap"
    code, err = run(capsys, "save", "--qmp", str(tmp_path / "nope.sock"), str(folder))
    assert code == 1
    assert err.startswith(f"multifd save: error: QMP {tmp_path / 'nope.sock'}: cannot connect")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("channels", ["0", "256"])
def test_save_refuses_a_channel_count_qemu_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], channels: str
) -> None:
    folder = tmp_path / "snap"
    code, err = run(capsys, "save", "--qmp", NOWHERE, str(folder), "--channels", channels)
    assert (code, err) == (
        1,
        "multifd save: error: Parameter 'multifd-channels' expects an integer in the range "
        "of 1 to 255",
    )
    assert not folder.exists()


def test_save_refuses_a_folder_that_is_not_empty(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "snap"
    folder.mkdir()
    (folder / "pc.bios").write_text("my notes\n")
    code, err = run(capsys, "save", "--qmp", NOWHERE, str(folder))
    assert (code, err) == (1, f"multifd save: error: {folder} is not empty: save into a new "
                              "or empty folder")  # fmt: skip
    assert (folder / "pc.bios").read_text() == "my notes\n"


def test_save_refuses_a_file_as_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "snap").write_text("")
    code, err = run(capsys, "save", "--qmp", NOWHERE, str(tmp_path / "snap"))
    assert (code, err) == (1, f"multifd save: error: {tmp_path / 'snap'} is not a folder")


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("tcp:127.0.0.1:abc", "the port 'abc' is not a number from 0 to 65535"),
        ("tcp:127.0.0.1:99999", "the port '99999' is not a number from 0 to 65535"),
        ("tcp:127.0.0.1", "the port '127.0.0.1' is not a number from 0 to 65535"),
    ],
)
def test_a_bad_qmp_address_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], address: str, problem: str
) -> None:
    code, err = run(capsys, "save", "--qmp", address, str(tmp_path / "snap"))
    assert (code, err) == (
        1,
        f"multifd save: error: QMP {address}: {problem} (give tcp:HOST:PORT, unix:PATH or a path)",
    )
    assert not (tmp_path / "snap").exists()


@pytest.fixture
def not_qemu(tmp_path: Path) -> Iterator[tuple[str, list[bytes]]]:
    """A unix socket whose peer greets with the next of `greetings`."""
    path = str(tmp_path / "not-qemu.sock")
    greetings: list[bytes] = []
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(greetings.pop(0))
                conn.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, greetings
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(5)


@pytest.mark.parametrize(
    ("greeting", "shown"),
    [
        (b"HTTP/1.0 200 OK\r\n\r\n", r"b'HTTP/1.0 200 OK\r\n'"),
        (b"[1, 2]\n", r"b'[1, 2]\n'"),
        (b"\xff\xfe\n", r"b'\xff\xfe\n'"),
    ],
)
def test_a_peer_that_is_not_qmp_is_named(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    not_qemu: tuple[str, list[bytes]],
    greeting: bytes,
    shown: str,
) -> None:
    path, greetings = not_qemu
    greetings.append(greeting)
    code, err = run(capsys, "save", "--qmp", path, str(tmp_path / "snap"))
    assert (code, err) == (1, f"multifd save: error: QMP {path}: not a QMP peer: it sent {shown}")
    assert not (tmp_path / "snap").exists()


def snapshot_folder(folder: Path, **changes: Any) -> Path:
    """A folder that looks like a saved snapshot (no QEMU made it) with
    `changes` to its manifest; a change to None removes that member."""
    folder.mkdir()
    manifest: dict[str, Any] = {
        "format": 1,
        "base-memory": 128 << 20,
        "ram-section-id": 2,
        "channels": 2,
        "blocks": [{"name": "pc.ram", "used_length": 1 << 20, "file": "pc.ram"}],
    }
    for key, value in changes.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "configuration.bin").write_bytes(Configuration("pc-i440fx-7.2").pack())
    (folder / "device-state.bin").write_bytes(b"")
    (folder / "pc.ram").write_bytes(bytes(1 << 20))
    return folder


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"channels": None}, "the manifest has no 'channels'"),
        ({"channels": "2"}, "the manifest's 'channels' is '2', not a non-negative integer"),
        (
            {"ram-section-id": -1},
            "the manifest's 'ram-section-id' is -1, not a non-negative integer",
        ),
        ({"blocks": {}}, "the manifest's 'blocks' is {}, not an array"),
        ({"blocks": []}, "'blocks' is empty"),
        ({"blocks": ["pc.ram"]}, "blocks[0] is a string, not an object"),
        ({"blocks": [{"name": "pc.ram", "used_length": 1 << 20}]}, "blocks[0] has no 'file'"),
        (
            {"blocks": [{"name": "pc.ram", "used_length": 1 << 20, "file": "../pc.ram"}]},
            "blocks[0]'s 'file' is '../pc.ram', not a file name",
        ),
        (
            {"blocks": [{"name": "pc.ram", "used_length": 1 << 20, "file": "pc.ram"}] * 2},
            "a block name comes twice in ['pc.ram', 'pc.ram']",
        ),
    ],
)
def test_restore_says_what_is_wrong_with_a_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any], problem: str
) -> None:
    folder = snapshot_folder(tmp_path / "snap", **changes)
    code, err = run(capsys, "restore", str(folder), "--qmp", NOWHERE)
    assert (code, err) == (1, f"multifd restore: error: {folder / 'manifest.json'}: {problem}")


def test_restore_says_a_manifest_is_not_an_object(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = snapshot_folder(tmp_path / "snap")
    (folder / "manifest.json").write_text("[1, 2]")
    code, err = run(capsys, "restore", str(folder), "--qmp", NOWHERE)
    assert (code, err) == (
        1,
        f"multifd restore: error: {folder / 'manifest.json'}: the manifest is an array, "
        "not an object",
    )


@pytest.mark.parametrize("channels", ["0", "256"])
def test_restore_refuses_a_channel_count_qemu_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], channels: str
) -> None:
    folder = snapshot_folder(tmp_path / "snap")
    code, err = run(capsys, "restore", str(folder), "--qmp", NOWHERE, "--channels", channels)
    assert (code, err) == (
        1,
        "multifd restore: error: Parameter 'multifd-channels' expects an integer in the "
        "range of 1 to 255",
    )


def test_restore_checks_block_files_before_talking_to_qemu(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # NOWHERE cannot be reached: a block file's error shows it was checked first.
    folder = snapshot_folder(tmp_path / "snap")
    (folder / "pc.ram").write_bytes(bytes(4096))
    code, err = run(capsys, "restore", str(folder), "--qmp", NOWHERE)
    assert (code, err) == (
        1,
        f"multifd restore: error: {folder / 'pc.ram'} has 4096 bytes, but the snapshot's "
        "block 'pc.ram' has 1048576: the file was changed after the save",
    )
    (folder / "pc.ram").unlink()
    code, err = run(capsys, "restore", str(folder), "--qmp", NOWHERE)
    assert (code, err) == (
        1,
        f"multifd restore: error: {folder / 'pc.ram'} is missing: the snapshot's block "
        "'pc.ram' is not there",
    )
    (folder / "pc.ram").write_bytes(bytes(1 << 20))
    (folder / "device-state.bin").unlink()
    code, err = run(capsys, "restore", str(folder), "--qmp", NOWHERE)
    assert (code, err) == (
        1,
        f"multifd restore: error: {folder / 'device-state.bin'}: cannot read it "
        "(No such file or directory)",
    )
