"""A running QEMU VM to a snapshot folder and back, through multifd migration.

`save` receives a real QEMU's live migration with a Python destination whose
RAM blocks are sparse files in the folder; the device state and configuration
are kept byte for byte. `restore` feeds a folder into a QEMU started with
`-incoming defer`, with a Python source sending the blocks over multifd.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..analyze.replay import block_file_name
from ..control.daemon import StopRequest
from ..memory import RAMBlock
from ..migration.destination import MigrationDestination
from ..migration.params import MigrationSettings
from ..migration.source import MigrationSource
from ..wire import BufferSource, RamBlockEntry, Reader, SectionFooter, WireError
from ..wire.stream import Configuration, EndOfFile, VMDescription, read_configuration
from .qmp import QMPConnection, QMPError
from .snapshot_folder import (
    CONFIGURATION_FILE,
    DEVICE_STATE_FILE,
    FORMAT,
    MANIFEST,
    SnapshotError,
    check_block_files,
    check_new_folder,
    file_sha256,
    load_manifest,
    open_blocks,
    read_snapshot_file,
    removed_on_failure,
)

# What QEMU's own tests use for "as fast as it goes" (max-bandwidth 0 is not
# unlimited on every version).
UNLIMITED_BANDWIDTH = 100 << 30
POLL = 0.05
# How long a save waits for our destination to see a vanished QEMU's channels close.
CLOSE_GRACE = 1.0

Progress = Callable[[dict[str, Any], dict[str, Any]], None]


class SnapshotStopped(SnapshotError):
    """A save or restore ended by its `StopRequest`; the message says what
    became of the migration and of QEMU."""


def _uuid(qemu: QMPConnection) -> bytes:
    text = qemu.execute("query-uuid")["UUID"]
    return bytes.fromhex(text.replace("-", ""))


def _machine_type(qemu: QMPConnection) -> str:
    # qom type names end in "-machine": "pc-i440fx-7.2-machine".
    name = qemu.execute("qom-get", {"path": "/machine", "property": "type"})
    return name.removesuffix("-machine")


def _base_memory(qemu: QMPConnection) -> int:
    return int(qemu.execute("query-memory-size-summary")["base-memory"])


def _configure(
    qemu: QMPConnection, channels: int, compression: str, source: bool, return_path: bool
) -> None:
    capabilities = [{"capability": "multifd", "state": True}]
    if return_path:
        capabilities.append({"capability": "return-path", "state": True})
    qemu.execute("migrate-set-capabilities", {"capabilities": capabilities})
    parameters: dict[str, Any] = {
        "multifd-channels": channels,
        "multifd-compression": compression,
    }
    if source:
        parameters["max-bandwidth"] = UNLIMITED_BANDWIDTH
    qemu.execute("migrate-set-parameters", parameters)


# Capabilities a QEMU source lists in its configuration section (7.2 lists only
# x-ignore-shared; later versions add mapped-ram): the destination then demands
# them, and x-ignore-shared a RAM block list with each block's address, which
# our source does not send. It would also leave memory in shared backends out
# of the snapshot.
UNHONOURED_CAPABILITIES = ("x-ignore-shared",)


def _refuse_unhonoured_capabilities(qemu: QMPConnection, qmp: str) -> None:
    on = [
        c["capability"]
        for c in qemu.execute("query-migrate-capabilities")
        if c["state"] and c["capability"] in UNHONOURED_CAPABILITIES
    ]
    if on:
        raise SnapshotError(
            f"QEMU at {qmp} has capability {', '.join(on)} on, which restore cannot honour: "
            "turn it off (migrate-set-capabilities) and save again"
        )


def _destination_state(ours: dict[str, Any]) -> str:
    if "status" not in ours:
        return "our destination was still waiting for QEMU's channels"
    return f"our destination {ours['status']} ({ours.get('error-desc', 'no error')})"


def _wait_destination(
    destination: MigrationDestination, qemu_info: dict[str, Any], timeout: float
) -> dict[str, Any]:
    """Our destination's end, once QEMU's migration has ended."""
    if qemu_info.get("status") != "completed":
        # A QEMU that gave up in setup never connects all its channels, and our
        # destination would wait for them until its own timeout.
        destination.cancel()
    return destination.wait(timeout)


def _check_settings(channels: int, compression: str) -> None:
    """QEMU's own range and choice checks, before anything is created or sent."""
    MigrationSettings(parameters={"multifd-channels": channels, "multifd-compression": compression})


def save(
    qmp: str,
    folder: str | Path,
    *,
    channels: int = 2,
    compression: str = "none",
    return_path: bool = False,
    progress: Progress | None = None,
    timeout: float = 600.0,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Migrate the QEMU at `qmp` into `folder` (new or empty); returns the
    manifest written there. With `return_path`, QEMU completes only once we said
    we loaded everything. What can be checked is checked before `folder` is
    created; a failed save removes what it wrote, and a stopped one also cancels
    QEMU's migration, so that its VM goes on as before."""
    folder = Path(folder)
    stop = stop or StopRequest()
    _check_settings(channels, compression)
    check_new_folder(folder)
    blocks: list[RAMBlock] = []

    def make_blocks(entries: Sequence[RamBlockEntry]) -> list[RAMBlock]:
        for entry in entries:
            path = folder / block_file_name(entry.name)
            blocks.append(RAMBlock.from_file(entry.name, path, entry.used_length, create=True))
        return blocks

    with QMPConnection(qmp) as qemu:
        version = qemu.execute("query-version")
        status = qemu.execute("query-status")["status"]
        if status in ("inmigrate", "postmigrate", "finish-migrate"):
            raise SnapshotError(f"QEMU at {qmp} cannot be saved: its status is {status!r}")
        _refuse_unhonoured_capabilities(qemu, qmp)
        base_memory = _base_memory(qemu)
        destination = MigrationDestination(
            make_blocks,
            capabilities={"multifd": True},
            parameters={"multifd-channels": channels, "multifd-compression": compression},
            uuid=_uuid(qemu),
        )
        if stop.requested:
            raise SnapshotStopped("nothing was saved")
        with removed_on_failure(folder), tempfile.TemporaryDirectory(prefix="multifd-") as tmp:
            try:
                _configure(qemu, channels, compression, source=True, return_path=return_path)
                uri = destination.incoming(f"unix:{tmp}/save.sock")
                qemu.execute("migrate", {"uri": uri})
                qemu_info = _wait_both(qemu, destination, progress, timeout, stop)
                # A stop that came as QEMU completed is too late: the snapshot is whole.
                if stop.requested and qemu_info.get("status") != "completed":
                    raise SnapshotStopped(
                        f"QEMU's migration was {qemu_info.get('status')}: its VM goes on "
                        "as before; nothing was saved"
                    )
                ours = _wait_destination(destination, qemu_info, timeout)
            finally:
                destination.cancel()
                for block in blocks:
                    block.close()
            # Our incoming side shows no status until the source's channels are all here.
            if qemu_info.get("status") != "completed" or ours.get("status") != "completed":
                raise SnapshotError(
                    "migration did not complete: QEMU "
                    f"{qemu_info.get('status')} ({qemu_info.get('error-desc', 'no error')}), "
                    f"destination {ours.get('status', 'none')} "
                    f"({ours.get('error-desc', 'no error')})"
                )
            return _write_snapshot(
                folder,
                destination,
                blocks,
                {
                    "qemu-version": version,
                    "base-memory": base_memory,
                    "channels": channels,
                    "compression": compression,
                    "query-migrate": qemu_info,
                    "destination": ours,
                },
            )


def _write_snapshot(
    folder: Path,
    destination: MigrationDestination,
    blocks: list[RAMBlock],
    facts: dict[str, Any],
) -> dict[str, Any]:
    """Write the configuration, the device state and the manifest (with `facts`)."""
    assert destination.configuration is not None and destination.ram_section_id is not None
    (folder / CONFIGURATION_FILE).write_bytes(destination.configuration.pack())
    device_state = (
        b"".join(
            record.pack() + SectionFooter(record.header.section_id).pack()
            for record in destination.device_state
        )
        + EndOfFile().pack()
    )
    if destination.vmdesc is not None:
        device_state += VMDescription(destination.vmdesc).pack()
    (folder / DEVICE_STATE_FILE).write_bytes(device_state)
    manifest = {
        "format": FORMAT,
        "created-by": f"multifd {__version__}",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "qemu-version": facts["qemu-version"],
        "machine-type": destination.configuration.machine_type,
        "base-memory": facts["base-memory"],
        "ram-section-id": destination.ram_section_id,
        "channels": facts["channels"],
        "compression": facts["compression"],
        "blocks": [
            {
                "name": block.name,
                "used_length": block.used_length,
                "file": block_file_name(block.name),
                "sha256": file_sha256(folder / block_file_name(block.name)),
            }
            for block in blocks
        ],
        "device-sections": [r.header.idstr for r in destination.device_state],
        "query-migrate": facts["query-migrate"],
        "destination": facts["destination"],
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def _wait_both(
    qemu: QMPConnection,
    destination: MigrationDestination,
    progress: Progress | None,
    timeout: float,
    stop: StopRequest,
) -> dict[str, Any]:
    """Poll QEMU and our destination until QEMU's migration has ended."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            info = qemu.execute("query-migrate")
            ours = destination.query()
            if progress is not None:
                progress(info, ours)
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if stop.requested or ours.get("status") in ("failed", "cancelled"):
                # Asked to stop, or our side gave up: cancel QEMU's side too, so
                # that it does not wait forever and its VM goes on as before.
                qemu.execute("migrate_cancel")
            if time.monotonic() > deadline:
                qemu.execute("migrate_cancel")
                raise SnapshotError(f"QEMU did not finish migrating within {timeout:g} s")
            time.sleep(POLL)
    except OSError as exc:
        # QEMU went away (killed, crashed): give our destination a moment to see
        # its channels close, so its state says what it received.
        ours = destination.wait(CLOSE_GRACE)
        raise SnapshotError(f"{exc}; {_destination_state(ours)}") from exc


# What restore reads from a manifest, and the JSON type each must have.
def restore(
    folder: str | Path,
    qmp: str,
    *,
    channels: int | None = None,
    compression: str = "none",
    return_path: bool = False,
    progress: Progress | None = None,
    timeout: float = 600.0,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Feed the snapshot in `folder` to the QEMU at `qmp` (started with
    `-incoming defer`), over `channels` multifd channels (default: as saved)
    compressed with `compression`; returns QEMU's final query-migrate and
    query-status, our source's query-migrate and the capabilities it used. With
    `return_path`, our source completes only once QEMU said it loaded everything.

    Everything in the folder is read and checked before QEMU is told to listen:
    a QEMU destination takes one incoming migration only."""
    folder = Path(folder)
    stop = stop or StopRequest()
    manifest = load_manifest(folder)
    channels = manifest["channels"] if channels is None else channels
    _check_settings(channels, compression)
    raw_config = read_snapshot_file(folder / CONFIGURATION_FILE)
    reader = Reader(BufferSource(raw_config[1:]))
    try:
        configuration, _ = read_configuration(reader)
    except WireError as exc:
        raise SnapshotError(f"{folder / CONFIGURATION_FILE}: {exc}") from None
    device_state = read_snapshot_file(folder / DEVICE_STATE_FILE)
    blocks = open_blocks(folder, manifest)
    try:
        with QMPConnection(qmp) as qemu, tempfile.TemporaryDirectory(prefix="multifd-") as tmp:
            status = qemu.execute("query-status")["status"]
            if status != "inmigrate":
                raise SnapshotError(
                    f"QEMU at {qmp} is not waiting for an incoming migration "
                    f"(status {status!r}): start it with -incoming defer"
                )
            _check_destination(qemu, manifest, configuration)
            check_block_files(folder, manifest)
            source = MigrationSource(
                blocks,
                capabilities={"multifd": True, "return-path": return_path},
                parameters={
                    "multifd-channels": channels,
                    "multifd-compression": compression,
                    "max-bandwidth": 0,
                    "x-dirty-tracker": "explicit",
                },
                configuration=configuration,
                device_state=device_state,
                ram_section_id=manifest["ram-section-id"],
                uuid=_uuid(qemu),
            )
            _configure(qemu, channels, compression, source=False, return_path=return_path)
            if stop.requested:
                raise SnapshotStopped(f"nothing was sent; QEMU at {qmp} still waits")
            uri = f"unix:{tmp}/restore.sock"
            qemu.execute("migrate-incoming", {"uri": uri})
            try:
                source.migrate(uri)
                ours = _wait_source(qemu, source, progress, timeout, stop)
                info = _wait_qemu(qemu, timeout, stop)
            finally:
                source.cancel()
                source.wait()
            if ours["status"] != "completed" or info.get("status") != "completed":
                if stop.requested:
                    raise SnapshotStopped(
                        f"the restore was cancelled (QEMU {info.get('status')}); a QEMU "
                        "destination takes one incoming migration only (7.2 exits when it "
                        "fails): start QEMU again with -incoming defer to restore"
                    )
                raise SnapshotError(
                    f"restore did not complete: ours {ours['status']} "
                    f"({ours.get('error-desc', 'no error')}), QEMU {info.get('status')} "
                    f"({info.get('error-desc', 'no error')})"
                )
            return {
                "query-migrate": info,
                "source": ours,
                "capabilities": dict(source.settings.capabilities),
                "query-status": qemu.execute("query-status"),
            }
    finally:
        for block in blocks:
            block.close()


def _check_destination(
    qemu: QMPConnection, manifest: dict[str, Any], configuration: Configuration
) -> None:
    """Refuse a destination that cannot take this snapshot, before sending a byte."""
    _check_capabilities(configuration)
    machine = _machine_type(qemu)
    if machine != configuration.machine_type:
        raise SnapshotError(
            f"the destination's machine type is {machine!r} but the snapshot's is "
            f"{configuration.machine_type!r}: start QEMU with -machine {configuration.machine_type}"
        )
    memory = _base_memory(qemu)
    if memory != manifest["base-memory"]:
        raise SnapshotError(
            f"the destination has {memory >> 20} MiB of RAM but the snapshot "
            f"{manifest['base-memory'] >> 20} MiB: start QEMU with -m "
            f"{manifest['base-memory'] >> 20}M"
        )
    _check_ram_blocks(qemu, manifest)


def _check_capabilities(configuration: Configuration) -> None:
    # Our source sends the configuration as saved; QEMU then demands each
    # capability it lists, and we honour none of them (UNHONOURED_CAPABILITIES).
    if configuration.capabilities:
        raise SnapshotError(
            "the snapshot's configuration demands capability "
            f"{', '.join(configuration.capabilities)}, which restore cannot honour "
            "(it was saved by a QEMU with that capability on)"
        )


def _ram_blocks(qemu: QMPConnection) -> dict[str, tuple[int, int]]:
    """QEMU's RAM blocks: name -> (used length, maximum length), from `info
    ramblock` (QMP has no command for them in 7.2)."""
    text = qemu.execute("human-monitor-command", {"command-line": "info ramblock"})
    blocks: dict[str, tuple[int, int]] = {}
    # "Block Name  PSize  Offset  Used  Total" with PSize as "4 KiB".
    for line in text.splitlines()[1:]:
        if line.strip():
            name, _, _, _, used, total = line.rsplit(None, 5)
            blocks[name.strip()] = (int(used, 16), int(total, 16))
    return blocks


def _check_ram_blocks(qemu: QMPConnection, manifest: dict[str, Any]) -> None:
    """The snapshot's RAM blocks against the destination's. QEMU itself refuses a
    block it does not have, or whose length differs and that it cannot resize
    (up to its maximum length), but only once the stream has begun, and exits."""
    theirs = _ram_blocks(qemu)
    ours = {b["name"]: b["used_length"] for b in manifest["blocks"]}
    problems = [f"{name} is missing on the destination" for name in ours if name not in theirs]
    problems += [
        f"{name} is on the destination but not in the snapshot"
        for name in theirs
        if name not in ours
    ]
    for name, length in ours.items():
        if name not in theirs or theirs[name][0] == length:
            continue
        used, maximum = theirs[name]
        # A fixed-size block has used == maximum; a resizable one has room left
        # (or is exactly full, which we cannot tell apart and also refuse).
        if used == maximum or length > maximum:
            problems.append(
                f"{name} is {used:#x} bytes on the destination (at most {maximum:#x}) "
                f"but {length:#x} in the snapshot"
            )
    if problems:
        raise SnapshotError(
            "the destination's RAM blocks do not match the snapshot's: "
            + "; ".join(problems)
            + ": start QEMU with the devices of the VM that was saved"
        )


def _wait_source(
    qemu: QMPConnection,
    source: MigrationSource,
    progress: Progress | None,
    timeout: float,
    stop: StopRequest,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    qemu_exited = False
    while not source.state.wait_finished(POLL):
        if stop.requested:
            source.cancel()
            break
        if time.monotonic() > deadline:
            source.cancel()
            raise SnapshotError(f"the restore did not finish within {timeout:g} s")
        if qemu_exited:
            continue  # 7.2 does when loading fails: the source finds out itself
        try:
            info = qemu.execute("query-migrate")
        except (ConnectionError, OSError):
            qemu_exited = True
            continue
        if progress is not None:
            progress(info, source.query())
        if info.get("status") == "failed":
            source.cancel()
    return source.wait()


def _wait_qemu(qemu: QMPConnection, timeout: float, stop: StopRequest) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = qemu.execute("query-migrate")
        except (ConnectionError, OSError):
            # QEMU 7.2 exits when an incoming migration fails.
            return {"status": "failed", "error-desc": "QEMU exited (its incoming migration failed)"}
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        if stop.requested or time.monotonic() > deadline:
            return info
        time.sleep(POLL)


__all__ = [
    "QMPError",
    "SnapshotError",
    "SnapshotStopped",
    "StopRequest",
    "load_manifest",
    "restore",
    "save",
]
