"""return-path with a real QEMU 7.2 at the other end, both ways: QEMU completes
only on our SHUT 0, and our source only on QEMU's; a QEMU destination that
fails to load (7.2 exits without SHUT) fails our source.

Small VMs that sit in the firmware (no guest): mostly zero RAM, fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from multifd.qemu.launch import QemuVM
from multifd.qemu.snapshot import DEVICE_STATE_FILE, SnapshotError, restore, save

MEMORY = "32M"


def _saved(tmp_path: Path) -> tuple[Path, dict]:
    with QemuVM(tmp_path, "source", memory=MEMORY, guest=False) as vm:
        folder = tmp_path / "snapshot"
        manifest = save(vm.qmp, folder, channels=2, return_path=True)
        with vm.connect() as qmp:
            capabilities = qmp.execute("query-migrate-capabilities")
    assert {"capability": "return-path", "state": True} in capabilities
    return folder, manifest


def test_qemu_source_completes_on_our_shut(tmp_path: Path) -> None:
    """QEMU 7.2's source, with return-path, sends OPEN_RETURN_PATH and PING(1)
    and waits for SHUT: `completed` means it read our PONG and SHUT 0."""
    _, manifest = _saved(tmp_path)
    assert manifest["query-migrate"]["status"] == "completed"
    assert manifest["destination"]["status"] == "completed"


def test_our_source_completes_on_qemus_shut(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path)
    with QemuVM(tmp_path, "destination", memory=MEMORY, guest=False, incoming=True) as vm:
        result = restore(folder, vm.qmp, channels=2, return_path=True)
    assert result["query-migrate"]["status"] == "completed"
    # QEMU answered our PING(1) and said it loaded everything.
    assert result["source"]["status"] == "completed"
    assert result["source"]["x-return-path"] == {"pongs": [1], "shut": 0}


def test_our_source_fails_when_qemu_cannot_load(tmp_path: Path) -> None:
    """A device section QEMU does not know: it fails after all RAM has arrived
    and, as 7.2 does, exits without SHUT. Without a return path our source would
    report `completed`; with it, `failed`."""
    folder, _ = _saved(tmp_path)
    state = (folder / DEVICE_STATE_FILE).read_bytes()
    # The first FULL section's idstr, renamed to one this QEMU has no handler for.
    at = state.index(b"timer")
    (folder / DEVICE_STATE_FILE).write_bytes(state[:at] + b"tymer" + state[at + 5 :])
    with QemuVM(tmp_path, "destination", memory=MEMORY, guest=False, incoming=True) as vm:
        with pytest.raises(SnapshotError) as caught:
            restore(folder, vm.qmp, channels=2, return_path=True, timeout=30)
        vm.process.wait(10)
        assert vm.process.returncode != 0
    error = str(caught.value)
    assert "restore did not complete: ours failed" in error, error
    # QEMU's exit closes the socket, or resets it when bytes were left unread.
    assert (
        "the destination closed the return path without reporting its result (no SHUT)" in error
        or "the return path from the destination broke" in error
    ), error
