"""Save and restore refuse what cannot work, and say why, with small idle VMs.

A 64 MiB VM sitting in its firmware saves in well under a second; every
refusal on restore must come before QEMU got a byte, so the destination QEMU
is still alive and still waiting for its incoming migration afterwards.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest

from multifd.qemu.launch import QemuVM
from multifd.qemu.qmp import QMPConnection
from multifd.qemu.snapshot import SnapshotError, restore, save
from multifd.wire import BufferSource, Reader
from multifd.wire.stream import Configuration, read_configuration

MEMORY = "64M"
VGA = ("-device", "VGA")


def _save(folder: Path, name: str, extra: tuple[str, ...] = ()) -> Path:
    with QemuVM(folder, name, memory=MEMORY, guest=False, extra=extra) as vm:
        save(vm.qmp, folder / name)
    return folder / name


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("snapshots")
    return {"plain": _save(folder, "plain"), "vga": _save(folder, "vga", VGA)}


def _still_waiting(vm: QemuVM) -> None:
    """The refusal came before migrate-incoming: QEMU did not exit, and waits."""
    assert vm.process.poll() is None
    with vm.connect() as qmp:
        assert qmp.execute("query-status")["status"] == "inmigrate"
        assert "status" not in qmp.execute("query-migrate")


def test_save_refuses_x_ignore_shared(tmp_path: Path) -> None:
    with QemuVM(tmp_path, "source", memory=MEMORY, guest=False) as vm:
        with vm.connect() as qmp:
            qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "x-ignore-shared", "state": True}]},
            )
        with pytest.raises(SnapshotError) as error:
            save(vm.qmp, tmp_path / "snapshot")
        assert str(error.value) == (
            f"QEMU at {vm.qmp} has capability x-ignore-shared on, which restore cannot "
            "honour: turn it off (migrate-set-capabilities) and save again"
        )
        with vm.connect() as qmp:
            assert "status" not in qmp.execute("query-migrate")
    assert not (tmp_path / "snapshot" / "manifest.json").exists()


def test_restore_refuses_a_configuration_demanding_x_ignore_shared(
    tmp_path: Path, snapshots: dict[str, Path]
) -> None:
    # What a save from a QEMU with x-ignore-shared on wrote before save refused it.
    folder = shutil.copytree(snapshots["plain"], tmp_path / "snapshot")
    raw = (folder / "configuration.bin").read_bytes()
    saved, _ = read_configuration(Reader(BufferSource(raw[1:])))
    demanding = Configuration.build(saved.machine_type, capabilities=("x-ignore-shared",))
    configuration = Configuration(saved.machine_type, demanding.subsections + saved.subsections)
    (folder / "configuration.bin").write_bytes(configuration.pack())
    with QemuVM(tmp_path, "destination", memory=MEMORY, guest=False, incoming=True) as vm:
        with pytest.raises(SnapshotError) as error:
            restore(folder, vm.qmp)
        assert str(error.value) == (
            "the snapshot's configuration demands capability x-ignore-shared, which "
            "restore cannot honour (it was saved by a QEMU with that capability on)"
        )
        _still_waiting(vm)


@pytest.mark.parametrize(
    ("snapshot", "destination", "problem"),
    [
        (
            "vga",
            (),
            "0000:00:02.0/vga.vram is missing on the destination; "
            "0000:00:02.0/vga.rom is missing on the destination",
        ),
        (
            "plain",
            VGA,
            "0000:00:02.0/vga.vram is on the destination but not in the snapshot; "
            "0000:00:02.0/vga.rom is on the destination but not in the snapshot",
        ),
        (
            "vga",
            ("-device", "VGA,vgamem_mb=8"),
            "0000:00:02.0/vga.vram is 0x800000 bytes on the destination (at most 0x800000) "
            "but 0x1000000 in the snapshot",
        ),
    ],
    ids=["missing", "extra", "other-length"],
)
def test_restore_refuses_other_ram_blocks(
    tmp_path: Path,
    snapshots: dict[str, Path],
    snapshot: str,
    destination: tuple[str, ...],
    problem: str,
) -> None:
    with QemuVM(
        tmp_path, "destination", memory=MEMORY, guest=False, incoming=True, extra=destination
    ) as vm:
        with pytest.raises(SnapshotError) as error:
            restore(snapshots[snapshot], vm.qmp)
        assert str(error.value) == (
            f"the destination's RAM blocks do not match the snapshot's: {problem}: "
            "start QEMU with the devices of the VM that was saved"
        )
        _still_waiting(vm)


def test_restore_takes_a_resized_acpi_table_block(
    tmp_path: Path, snapshots: dict[str, Path]
) -> None:
    """A block QEMU can resize (used below its maximum) may differ in length."""
    folder = shutil.copytree(snapshots["plain"], tmp_path / "snapshot")
    manifest = json.loads((folder / "manifest.json").read_text())
    (tables,) = [b for b in manifest["blocks"] if b["name"] == "/rom@etc/acpi/tables"]
    assert tables["used_length"] == 0x20000  # its maximum is 0x200000
    with (folder / tables["file"]).open("r+b") as f:
        f.truncate(0x10000)
    tables["used_length"] = 0x10000
    tables["sha256"] = hashlib.sha256((folder / tables["file"]).read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with QemuVM(tmp_path, "destination", memory=MEMORY, guest=False, incoming=True) as vm:
        result = restore(folder, vm.qmp)
        assert result["query-migrate"]["status"] == "completed"


def test_restore_refuses_a_changed_block_file(tmp_path: Path, snapshots: dict[str, Path]) -> None:
    folder = shutil.copytree(snapshots["plain"], tmp_path / "snapshot")
    with (folder / "pc.ram").open("r+b") as f:
        f.seek(5 << 20)
        f.write(b"TAMPERED")
    with QemuVM(tmp_path, "destination", memory=MEMORY, guest=False, incoming=True) as vm:
        with pytest.raises(SnapshotError) as error:
            restore(folder, vm.qmp)
        assert str(error.value) == (
            f"{folder}: the sha256 of block pc.ram does not match the manifest's: "
            "the file changed after the snapshot was saved"
        )
        _still_waiting(vm)


def _cancel_at_first_poll(tmp_path: Path, name: str) -> tuple[str, float, str]:
    """QEMU's status when a second monitor cancelled its migration (at save's
    first look at it), how long save took after that, and save's error."""
    control = tmp_path / f"{name}-control.qmp"
    extra = ("-qmp", f"unix:{control},server=on,wait=off")
    seen: list[str] = []
    with (
        QemuVM(tmp_path, name, memory=MEMORY, guest=False, extra=extra) as vm,
        QMPConnection(str(control)) as other,
    ):

        def cancel(qemu: dict, ours: dict) -> None:
            if not seen:
                seen.append(qemu.get("status", "none"))
                other.execute("migrate_cancel")

        start = time.monotonic()
        with pytest.raises(SnapshotError) as error:
            save(vm.qmp, tmp_path / f"{name}-snapshot", channels=4, progress=cancel)
        return seen[0], time.monotonic() - start, str(error.value)


def test_qemu_cancelling_in_setup_ends_the_save_at_once(tmp_path: Path) -> None:
    """QEMU cancelled before connecting every channel: our destination must not
    wait for the missing ones (30 s) before save reports QEMU's cancellation."""
    statuses = []
    for attempt in range(5):
        status, took, error = _cancel_at_first_poll(tmp_path, f"source{attempt}")
        assert took < 10, (status, took, error)
        assert error.startswith("migration did not complete: QEMU cancelled (no error), "), error
        statuses.append(status)
        if status == "setup":
            return
    pytest.fail(f"the cancel never landed while QEMU was in setup: {statuses}")


def test_a_source_qemu_killed_during_save_is_named(tmp_path: Path) -> None:
    with QemuVM(tmp_path, "source", memory=MEMORY, guest=False) as vm:

        def kill(qemu: dict, ours: dict) -> None:
            vm.process.kill()
            vm.process.wait()

        with pytest.raises(SnapshotError) as error:
            save(vm.qmp, tmp_path / "snapshot", progress=kill)
    message = str(error.value)
    assert message.startswith(f"QEMU's QMP connection at {vm.qmp} closed during query-migrate (")
    assert "; our destination " in message
