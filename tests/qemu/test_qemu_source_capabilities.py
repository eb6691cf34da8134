"""A real QEMU 7.2 source with capabilities beyond plain multifd, migrating a live
guest into our Python destination: each either lands with memory identical to
the source's, or is refused with a message that names the capability while the
source's VM runs on.

The guest's RAM is a shared file, so the source's final memory (it stops at
switchover) can be compared byte for byte with ours. The guest writes every
page of [1 MiB, 12 MiB) over and over; the downtime limit stays at 1 ms until
QEMU has synced the dirty bitmap a few times, so later rounds are sent (those
carry XBZRLE deltas), then it is raised so that the migration ends."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.qemu.guest import check_counters, counters
from multifd.qemu.launch import QemuVM
from multifd.wire import RamBlockEntry

GUEST_END = 12 << 20
MEMORY = "32M"
UUID = "8b7c1a2e-3f4d-4e5f-9a6b-7c8d9e0f1a2b"
# Multifd channels carry the source's UUID, which the destination's must equal.
UUID_BYTES = bytes.fromhex(UUID.replace("-", ""))
ROUNDS = 3  # dirty-bitmap syncs before the downtime limit lets QEMU finish
TIMEOUT = 30.0


class Run:
    """One migration from QEMU into our destination, and what both ends said."""

    qemu: dict[str, Any]
    ours: dict[str, Any]
    qemu_status: str
    states: set[str]
    source_ram: np.ndarray
    our_ram: np.ndarray | None


def _migrate(
    tmp_path: Path,
    capabilities: Sequence[str],
    *,
    parameters: dict[str, Any] | None = None,
    ours: dict[str, bool] | None = None,
    our_uuid: bytes = UUID_BYTES,
    shared: bool = True,
    rounds: int = ROUNDS,
) -> Run:
    ram_file = tmp_path / "source.ram"
    backend = "memory-backend-file" if shared else "memory-backend-ram"
    options = f"id=mem,size={MEMORY}" + (f",mem-path={ram_file},share=on" if shared else "")
    extra = ("-object", f"{backend},{options}", "-machine", "memory-backend=mem", "-uuid", UUID)
    blocks: list[RAMBlock] = []

    def make_blocks(entries: Sequence[RamBlockEntry]) -> list[RAMBlock]:
        blocks.extend(RAMBlock.anonymous(e.name, e.used_length) for e in entries)
        return blocks

    multifd = "multifd" in capabilities
    destination = MigrationDestination(
        make_blocks,
        capabilities={"multifd": multifd, **(ours or {})},
        uuid=our_uuid,
    )
    run = Run()
    run.states = set()
    try:
        with QemuVM(tmp_path, "source", memory=MEMORY, guest_end=GUEST_END, extra=extra) as vm:
            vm.wait_for_serial(b"B")
            with vm.connect() as qmp:
                qmp.execute(
                    "migrate-set-capabilities",
                    {"capabilities": [{"capability": c, "state": True} for c in capabilities]},
                )
                qmp.execute(
                    "migrate-set-parameters",
                    {"downtime-limit": 1, "max-bandwidth": 100 << 30, **(parameters or {})},
                )
                uri = destination.incoming(f"unix:{tmp_path}/migration.sock")
                qmp.execute("migrate", {"uri": uri})
                run.qemu = _wait_for_qemu(qmp, run.states, rounds)
                run.ours = destination.wait(TIMEOUT)
                run.qemu_status = qmp.execute("query-status")["status"]
        run.source_ram = np.fromfile(ram_file, dtype=np.uint8) if shared else np.empty(0)
        mem = [b for b in blocks if b.name == "mem"]
        run.our_ram = np.array(mem[0].array) if mem else None
    finally:
        destination.cancel()
        for block in blocks:
            block.close()
    return run


def _wait_for_qemu(qmp: Any, states: set[str], rounds: int) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    raised = False
    while time.monotonic() < deadline:
        info = qmp.execute("query-migrate")
        status = info.get("status")
        states.add(status)
        if status in ("completed", "failed", "cancelled"):
            return info
        if status == "pre-switchover":
            qmp.execute("migrate-continue", {"state": "pre-switchover"})
        if not raised and info.get("ram", {}).get("dirty-sync-count", 0) >= rounds:
            qmp.execute("migrate-set-parameters", {"downtime-limit": 30_000})
            raised = True
        time.sleep(0.02)
    qmp.execute("migrate_cancel")
    raise AssertionError(f"QEMU's migration did not end within {TIMEOUT:g} s: {info}")


def _assert_identical(run: Run) -> None:
    assert run.qemu["status"] == "completed", run.qemu
    assert run.ours["status"] == "completed", run.ours
    assert run.qemu_status == "postmigrate"
    assert run.our_ram is not None
    differ = np.flatnonzero(run.our_ram != run.source_ram)
    assert not len(differ), f"{len(differ)} bytes differ, first at {differ[0]:#x}"
    assert check_counters(counters(run.our_ram, GUEST_END)) is None


def _assert_refused(run: Run, *words: str) -> None:
    assert run.ours["status"] == "failed", run.ours
    for word in words:
        assert word in run.ours["error-desc"], run.ours
    # The source gave up and its VM goes on.
    assert run.qemu["status"] == "failed", run.qemu
    assert run.qemu_status == "running"


def test_plain_precopy_at_a_low_bandwidth_over_several_rounds(tmp_path: Path) -> None:
    run = _migrate(tmp_path, [], parameters={"max-bandwidth": 64 << 20})
    _assert_identical(run)
    assert run.qemu["ram"]["dirty-sync-count"] > ROUNDS
    assert run.ours["x-ram"]["normal"] == run.qemu["ram"]["normal"]
    assert run.ours["x-ram"]["duplicate"] == run.qemu["ram"]["duplicate"]


def test_xbzrle_deltas_of_later_rounds(tmp_path: Path) -> None:
    # QEMU 7.2 fills its xbzrle cache only after the first pass over RAM, and
    # sends a delta for a page cached in an earlier round. Unpaced, it could
    # measure enough bandwidth to finish at once, even within 1 ms of
    # downtime; at 64 MiB/s it goes on until the limit is raised.
    run = _migrate(tmp_path, ["xbzrle"], parameters={"max-bandwidth": 64 << 20}, rounds=5)
    _assert_identical(run)
    # QEMU counts pages sent whole as `normal`, and every cache hit (also the
    # skipped and overflowing ones) as an XBZRLE page.
    assert run.ours["x-ram"]["normal"] == run.qemu["ram"]["normal"]
    assert 0 < run.ours["x-xbzrle"]["pages"] <= run.qemu["xbzrle-cache"]["pages"]


def test_compress_threads_zlib_pages(tmp_path: Path) -> None:
    run = _migrate(tmp_path, ["compress"], parameters={"compress-level": 9})
    _assert_identical(run)
    assert run.ours["x-compression"]["pages"] > 0
    assert run.qemu["compression"]["pages"] > 0


@pytest.mark.parametrize(
    "capabilities",
    [
        ["multifd", "xbzrle"],  # 7.2 allows both; multifd takes every page
        ["multifd", "auto-converge"],
        ["multifd", "zero-blocks"],
        ["multifd", "return-path"],
        ["multifd", "events"],
        ["multifd", "late-block-activate"],
        ["multifd", "release-ram"],
        ["multifd", "pause-before-switchover"],
        ["return-path", "pause-before-switchover", "events"],
    ],
)
def test_capabilities_with_no_effect_on_our_side(tmp_path: Path, capabilities: list[str]) -> None:
    run = _migrate(tmp_path, capabilities)
    _assert_identical(run)
    if "pause-before-switchover" in capabilities:
        assert "pre-switchover" in run.states


def test_validate_uuid(tmp_path: Path) -> None:
    run = _migrate(tmp_path, ["validate-uuid"], ours={"validate-uuid": True})
    _assert_identical(run)


def test_validate_uuid_refuses_another_uuid(tmp_path: Path) -> None:
    run = _migrate(tmp_path, ["validate-uuid"], ours={"validate-uuid": True}, our_uuid=b"\1" * 16)
    _assert_refused(run, "Mismatch in UUIDs")


@pytest.mark.parametrize("multifd", [False, True])
def test_postcopy_ram_is_refused_at_its_advice(tmp_path: Path, multifd: bool) -> None:
    """Our destination cannot set postcopy-ram; QEMU's source with it on
    advises postcopy before any RAM, and we refuse there."""
    run = _migrate(tmp_path, ["postcopy-ram", "multifd"] if multifd else ["postcopy-ram"])
    _assert_refused(run, "the source has postcopy-ram on")


def test_x_ignore_shared_is_refused(tmp_path: Path) -> None:
    """The shared RAM would never be sent: completing would leave it stale."""
    run = _migrate(tmp_path, ["x-ignore-shared"])
    _assert_refused(run, "Capability x-ignore-shared is off, but received capability is on")


def test_dirty_bitmaps_is_refused_by_name(tmp_path: Path) -> None:
    run = _migrate(tmp_path, ["dirty-bitmaps"], shared=False)
    _assert_refused(run, "'dirty-bitmap'", "turn capability dirty-bitmaps off at the source")
