"""A live QEMU VM saved by a Python destination and restored by a Python source.

The guest increments a byte in every page of [1 MiB, 100 MiB) forever; the
snapshot and the restored VM must both hold its invariant, the restored VM
must start from exactly the snapshot's memory and keep running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multifd.control import StopRequest
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.source import MigrationSource
from multifd.qemu import snapshot
from multifd.qemu.guest import TEST_END, check_counters, counters
from multifd.qemu.launch import QemuVM
from multifd.qemu.snapshot import SnapshotError, SnapshotStopped, restore, save
from multifd.wire import RamBlockEntry

MEMORY = 150 << 20


def _saved(tmp_path: Path, channels: int, compression: str) -> tuple[Path, dict]:
    with QemuVM(tmp_path, "source") as vm:
        vm.wait_for_serial(b"BB")
        folder = tmp_path / "snapshot"
        manifest = save(vm.qmp, folder, channels=channels, compression=compression)
        with vm.connect() as qmp:
            assert qmp.execute("query-migrate")["status"] == "completed"
    return folder, manifest


def _pmem(vm: QemuVM, path: Path, size: int) -> np.ndarray:
    with vm.connect() as qmp:
        qmp.execute("pmemsave", {"val": 0, "size": size, "filename": str(path)})
    return np.fromfile(path, dtype=np.uint8)


@pytest.mark.parametrize(
    ("channels", "compression"),
    [(1, "none"), (2, "none"), (4, "none"), (2, "zlib"), (2, "zstd")],
)
def test_save_and_restore_a_live_vm(tmp_path: Path, channels: int, compression: str) -> None:
    folder, manifest = _saved(tmp_path, channels, compression)

    # The snapshot: QEMU's own page counts, sparse block files, the invariant.
    qemu_ram = manifest["query-migrate"]["ram"]
    ours = manifest["destination"]["x-ram"]  # an incoming side's counters are ours
    assert ours["normal"] == qemu_ram["normal"]
    assert ours["duplicate"] == qemu_ram["duplicate"]
    # What QEMU counted as sent arrived here, to the byte; 7.2 counts pages
    # before compression, so the same bytes whatever the method.
    assert ours["transferred"] == qemu_ram["transferred"]
    assert ours["multifd-bytes"] == qemu_ram["multifd-bytes"]
    assert manifest["machine-type"] == "pc-i440fx-7.2"
    assert manifest["channels"] == channels and manifest["compression"] == compression
    assert "globalstate" in manifest["device-sections"]
    names = {b["name"] for b in manifest["blocks"]}
    assert {"pc.ram", "pc.bios", "pc.rom"} <= names
    ram_file = folder / "pc.ram"
    assert ram_file.stat().st_size == MEMORY
    assert ram_file.stat().st_blocks * 512 < MEMORY  # zero pages were not written
    snapshot_ram = np.fromfile(ram_file, dtype=np.uint8)
    assert check_counters(counters(snapshot_ram)) is None
    assert json.loads((folder / "manifest.json").read_text()) == manifest

    # Restored, paused (-S): memory exactly the snapshot's; then it runs on.
    with QemuVM(tmp_path, "destination", incoming=True, extra=("-S",)) as vm:
        # Restored with the same compression: our zlib/zstd streams into QEMU's.
        result = restore(folder, vm.qmp, channels=channels, compression=compression)
        assert result["query-migrate"]["status"] == "completed"
        restored = _pmem(vm, tmp_path / "restored.bin", MEMORY)
        assert np.array_equal(restored, snapshot_ram)
        with vm.connect() as qmp:
            qmp.execute("cont")
            assert qmp.execute("query-status")["status"] == "running"
        before = vm.serial.stat().st_size if vm.serial.exists() else 0
        vm.wait_for_serial(b"B" * (before + 2))
        with vm.connect() as qmp:
            qmp.execute("stop")
        later = counters(_pmem(vm, tmp_path / "later.bin", TEST_END))
        assert check_counters(later) is None
        assert not np.array_equal(later, counters(snapshot_ram))  # the guest kept going


@pytest.mark.parametrize(
    ("method", "qemu_level", "our_level", "channels"),
    [("zlib", 9, 0, 3), ("zstd", 9, 12, 4)],
)
def test_compression_levels_and_more_channels_both_ways(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    qemu_level: int,
    our_level: int,
    channels: int,
) -> None:
    """Levels other than the default on each side (zlib 0: stored blocks),
    more channels: QEMU 7.2's streams decode here, ours decode in QEMU, and the
    restored memory is exactly the snapshot's."""
    with QemuVM(tmp_path, "source") as vm:
        vm.wait_for_serial(b"BB")
        with vm.connect() as qmp:
            qmp.execute("migrate-set-parameters", {f"multifd-{method}-level": qemu_level})
        folder = tmp_path / "snapshot"
        manifest = save(vm.qmp, folder, channels=channels, compression=method)
    assert manifest["destination"]["x-ram"]["normal"] == manifest["query-migrate"]["ram"]["normal"]
    snapshot_ram = np.fromfile(folder / "pc.ram", dtype=np.uint8)
    assert check_counters(counters(snapshot_ram)) is None

    def source_at_level(*args: Any, parameters: dict[str, Any], **kwargs: Any) -> MigrationSource:
        # restore() takes no level: its source is given ours.
        parameters = {**parameters, f"multifd-{method}-level": our_level}
        return MigrationSource(*args, parameters=parameters, **kwargs)

    monkeypatch.setattr(snapshot, "MigrationSource", source_at_level)
    with QemuVM(tmp_path, "destination", incoming=True, extra=("-S",)) as vm:
        result = restore(folder, vm.qmp, channels=channels, compression=method)
        assert result["query-migrate"]["status"] == "completed"
        assert np.array_equal(_pmem(vm, tmp_path / "restored.bin", MEMORY), snapshot_ram)


def test_restored_vm_runs_without_being_told(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path, 2, "none")
    with QemuVM(tmp_path, "destination", incoming=True) as vm:
        result = restore(folder, vm.qmp)
        assert result["query-status"]["status"] == "running"
        vm.wait_for_serial(b"B")


def test_restore_refuses_another_machine_type(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path, 2, "none")
    with QemuVM(tmp_path, "q35", incoming=True, machine="q35") as vm:
        with pytest.raises(SnapshotError) as error:
            restore(folder, vm.qmp)
        assert "machine type is 'pc-q35-7.2'" in str(error.value)
        assert "snapshot's is 'pc-i440fx-7.2'" in str(error.value)


def test_restore_refuses_another_memory_size(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path, 2, "none")
    with QemuVM(tmp_path, "big", incoming=True, memory="256M") as vm:
        with pytest.raises(SnapshotError) as error:
            restore(folder, vm.qmp)
        assert "has 256 MiB of RAM but the snapshot 150 MiB" in str(error.value)


def _receive_from_qemu(
    tmp_path: Path, qemu_parameters: dict, our_parameters: dict
) -> tuple[dict, dict]:
    """A QEMU source and a Python destination set up differently."""
    blocks: list[RAMBlock] = []

    def make(entries: Sequence[RamBlockEntry]) -> list[RAMBlock]:
        blocks.extend(RAMBlock.anonymous(e.name, e.used_length) for e in entries)
        return blocks

    destination = MigrationDestination(
        make, capabilities={"multifd": True}, parameters=our_parameters
    )
    try:
        uri = destination.incoming(f"unix:{tmp_path}/in.sock")
        with QemuVM(tmp_path, "source") as vm, vm.connect() as qmp:
            qmp.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "multifd", "state": True}]},
            )
            qmp.execute("migrate-set-parameters", qemu_parameters)
            qmp.execute("migrate", {"uri": uri})
            deadline = time.monotonic() + 60
            try:
                while (info := qmp.execute("query-migrate"))["status"] not in (
                    "completed",
                    "failed",
                    "cancelled",
                ):
                    if destination.state.status.finished:
                        qmp.execute("migrate_cancel")
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            except TimeoutError as exc:
                # Once seen in CI, not reproduced since: say where QEMU waits.
                raise AssertionError(
                    f"QEMU's QMP stopped answering ({exc}); ours: {destination.query()}; "
                    f"QEMU's threads: {vm.threads()}"
                ) from exc
        ours = destination.wait(30)
        return info, ours
    finally:
        destination.cancel()
        for block in blocks:
            block.close()


@pytest.mark.parametrize(
    ("theirs", "ours", "flags"),
    [("zlib", "none", "0x2 flags expected 0x0"), ("zstd", "zlib", "0x4 flags expected 0x2"),
     ("none", "zstd", "0x0 flags expected 0x4")],
)  # fmt: skip
def test_compression_mismatch_is_refused_with_the_flags(
    tmp_path: Path, theirs: str, ours: str, flags: str
) -> None:
    qemu, info = _receive_from_qemu(
        tmp_path,
        {"multifd-channels": 2, "multifd-compression": theirs},
        {"multifd-channels": 2, "multifd-compression": ours},
    )
    assert qemu["status"] != "completed"
    assert info["status"] == "failed"
    assert re.match(r"channel [01]: packet \d+: ", info["error-desc"]), info["error-desc"]
    assert f"flags received {flags}" in info["error-desc"]
    assert f"multifd-compression is {ours}" in info["error-desc"]


def test_our_compression_into_a_qemu_without_fails_both_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our source with zstd, QEMU's destination left at none: QEMU refuses the
    first packet and exits; with the return path our source is told no SHUT
    came (without it, a source whose bytes all fitted in the sockets would
    complete, as QEMU's own does). Neither end hangs."""
    with QemuVM(tmp_path, "source", memory="32M", guest=False) as vm:
        save(vm.qmp, tmp_path / "snapshot", channels=2, return_path=True)
    configure = snapshot._configure

    def qemu_without(qemu: Any, channels: int, compression: str, **flags: bool) -> None:
        configure(qemu, channels, "none", **flags)

    monkeypatch.setattr(snapshot, "_configure", qemu_without)
    with QemuVM(tmp_path, "destination", memory="32M", guest=False, incoming=True) as vm:
        with pytest.raises(SnapshotError) as caught:
            restore(tmp_path / "snapshot", vm.qmp, compression="zstd", return_path=True, timeout=30)
        vm.process.wait(10)
        assert vm.process.returncode != 0
    error = str(caught.value)
    assert "restore did not complete: ours failed" in error, error
    assert "QEMU failed" in error, error


def test_channel_count_mismatch_is_refused(tmp_path: Path) -> None:
    qemu, ours = _receive_from_qemu(
        tmp_path,
        {"multifd-channels": 4},
        {"multifd-channels": 2},
    )
    assert qemu["status"] != "completed", (qemu, ours)
    assert ours["status"] == "failed", (qemu, ours)
    assert "channel" in ours["error-desc"], (qemu, ours)


def test_save_and_restore_commands(tmp_path: Path) -> None:
    """The two commands as an operator runs them, in subprocesses."""
    import subprocess
    import sys

    folder = tmp_path / "snap"
    with QemuVM(tmp_path, "source") as vm:
        vm.wait_for_serial(b"BB")
        saved = subprocess.run(
            [sys.executable, "-m", "multifd", "save", "--qmp", vm.qmp, str(folder),
             "--channels", "3"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert saved.returncode == 0, saved.stderr
        assert "pc-i440fx-7.2" in saved.stdout and "pc.ram" in saved.stdout
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["channels"] == 3
    again = subprocess.run(
        [sys.executable, "-m", "multifd", "save", "--qmp", "unix:/nonexistent.qmp",
         str(folder)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert again.returncode == 1
    assert "already holds a snapshot" in again.stderr
    # A block file cut short is found before QEMU is told to listen: QEMU can
    # still take the good snapshot (a QEMU destination takes one migration only).
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    os.truncate(broken / "pc.ram", 64 << 20)
    with QemuVM(tmp_path, "destination", incoming=True) as vm:
        refused = subprocess.run(
            [sys.executable, "-m", "multifd", "restore", str(broken), "--qmp", vm.qmp],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert refused.returncode == 1
        assert refused.stderr == (
            f"multifd restore: error: {broken / 'pc.ram'} has {64 << 20} bytes, but the "
            f"snapshot's block 'pc.ram' has {MEMORY}: the file was changed after the save\n"
        )
        with vm.connect() as qmp:
            assert qmp.execute("query-migrate") == {}
            assert qmp.execute("query-status")["status"] == "inmigrate"
        restored = subprocess.run(
            [sys.executable, "-m", "multifd", "restore", str(folder), "--qmp", vm.qmp],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert restored.returncode == 0, restored.stderr
        assert "VM running" in restored.stdout
        # The summary starts with the capabilities our source used.
        first = restored.stdout.splitlines()[0]
        assert first.startswith("capabilities: ") and "multifd: on" in first
        vm.wait_for_serial(b"B")


def test_save_of_a_migrated_vm_creates_no_folder(tmp_path: Path) -> None:
    import subprocess
    import sys

    with QemuVM(tmp_path, "source", guest=False) as vm:
        save(vm.qmp, tmp_path / "first")
        later = tmp_path / "later"
        again = subprocess.run(
            [sys.executable, "-m", "multifd", "save", "--qmp", vm.qmp, str(later)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert again.returncode == 1
    assert again.stderr == (
        f"multifd save: error: QEMU at {vm.qmp} cannot be saved: its status is 'postmigrate'\n"
    )
    assert not later.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_save_and_qemu_goes_on(tmp_path: Path, signum: signal.Signals) -> None:
    """Stopped mid-migration: QEMU's migration is cancelled and its VM runs on;
    the partial folder and the temporary socket are gone; one line, status 1."""
    import subprocess
    import sys

    folder = tmp_path / "snap"
    temp = tmp_path / "tmp"
    temp.mkdir()
    with QemuVM(tmp_path, "source") as vm:
        vm.wait_for_serial(b"BB")
        # The guest dirties every page faster than any 1 ms downtime allows:
        # the migration cannot complete, the signal comes while it runs.
        with vm.connect() as qmp:
            qmp.execute("migrate-set-parameters", {"downtime-limit": 1})
        save_process = subprocess.Popen(
            [sys.executable, "-m", "multifd", "save", "--qmp", vm.qmp, str(folder)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TMPDIR": str(temp)},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not (folder / "pc.ram").exists():  # the migration has begun
                assert save_process.poll() is None and time.monotonic() < deadline
                time.sleep(0.005)
            save_process.send_signal(signum)
            out, err = save_process.communicate(timeout=60)
        finally:
            save_process.kill()
            save_process.wait()
        assert save_process.returncode == 1, err
        assert err == (
            f"multifd save: stopped by {signum.name}: QEMU's migration was cancelled: its "
            "VM goes on as before; nothing was saved\n"
        )
        assert out == ""
        assert not folder.exists()
        assert list(temp.iterdir()) == []
        with vm.connect() as qmp:
            assert qmp.execute("query-migrate")["status"] == "cancelled"
            assert qmp.execute("query-status")["status"] == "running"
        before = vm.serial.stat().st_size
        vm.wait_for_serial(b"B" * (before + 2))


def test_a_stopped_restore_says_qemu_must_start_again(tmp_path: Path) -> None:
    folder, _ = _saved(tmp_path, 2, "none")
    stop = StopRequest()

    def stop_at_once(qemu: dict, ours: dict) -> None:
        stop.request_stop(signal.SIGTERM)

    with (
        QemuVM(tmp_path, "destination", incoming=True) as vm,
        pytest.raises(SnapshotStopped) as stopped,
    ):
        # zlib: our source takes long enough for the first poll to come before the end.
        restore(folder, vm.qmp, compression="zlib", progress=stop_at_once, stop=stop)
    assert str(stopped.value).endswith(
        "a QEMU destination takes one incoming migration only (7.2 exits when it fails): "
        "start QEMU again with -incoming defer to restore"
    )
