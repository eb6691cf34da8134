"""Our Python source migrating into a real QEMU 7.2 destination, with each
capability and parameter a user may set, and into destinations set up wrong.

The destination's RAM is a shared file (block `mem`) and it starts with `-S`,
so that its firmware never runs and the file can be compared byte for byte
with our block. Our source sends `mem` only (QEMU keeps its own ROMs) and no
device state, just EOF and the vmdesc: QEMU loads RAM alone. A failure must
name what broke, come at once or within x-io-timeout, leave the source's
memory and running state as they were, and let the next migration start."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multifd.memory import RAMBlock
from multifd.migration.source import MigrationSource
from multifd.qemu.launch import QemuVM
from multifd.qemu.qmp import QMPConnection
from multifd.wire import Configuration, EndOfFile
from multifd.wire.appstate import vmdescription

MEMORY = 32 << 20
MACHINE = "pc-i440fx-7.2"  # QEMU's `-machine pc` here
UUID = "8b7c1a2e-3f4d-4e5f-9a6b-7c8d9e0f1a2b"
UUID_BYTES = bytes.fromhex(UUID.replace("-", ""))
# Nothing but RAM: QEMU's devices keep their reset state.
NO_DEVICES = EndOfFile().pack() + vmdescription([]).pack()
# Where the workload writes: pages of [8 MiB, 16 MiB).
HOT = range(2048, 4096)
TIMEOUT = 30.0
IO_TIMEOUT = 1  # x-io-timeout for the destinations that never read


def _memory() -> RAMBlock:
    """A quarter zero pages (ZERO records on main), the rest random (packets)."""
    block = RAMBlock.anonymous("mem", MEMORY)
    array = np.asarray(block.array)
    array[MEMORY // 4 :] = np.random.default_rng(7).integers(0, 256, MEMORY * 3 // 4, np.uint8)
    return block


class Workload:
    """A thread that keeps writing pages of HOT (marking them dirty) until the
    source stops it; `throttle` slows it as auto-converge asks."""

    def __init__(self, block: RAMBlock, seconds: float | None = None) -> None:
        self.block = block
        self.seconds = seconds  # then idle: the rounds shrink to nothing
        self.running = threading.Event()
        self.running.set()
        self.throttles: list[int] = []
        self.writes = 0
        self._quit = False
        self._writing = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="workload")
        self._thread.start()

    def _run(self) -> None:
        array = np.asarray(self.block.array)
        pages = np.random.default_rng(3).integers(HOT.start, HOT.stop, 1 << 20)
        started = time.monotonic()
        while not self._quit:
            if not self.running.wait(0.01):
                continue
            if self.seconds is not None and time.monotonic() - started > self.seconds:
                time.sleep(0.01)
                continue
            page = int(pages[self.writes % len(pages)])
            with self._writing:
                if not self.running.is_set():
                    continue
                array[page * 4096 : (page + 1) * 4096] = self.writes % 255 + 1
                self.block.mark_dirty(page * 4096, 4096)
            self.writes += 1
            if self.writes % 64 == 0:
                time.sleep(0.001 * (1 + (self.throttles[-1] if self.throttles else 0)))

    def stop(self) -> None:
        """As a VM's stop: no write is under way once it returns."""
        with self._writing:
            self.running.clear()

    def throttle(self, percent: int) -> None:
        self.throttles.append(percent)

    def close(self) -> None:
        self._quit = True  # it stays stopped: the memory is compared afterwards
        self._thread.join()


class Run:
    """What both ends said, and both memories."""

    ours: dict[str, Any]
    qemu: dict[str, Any] | None  # None: QEMU exited
    qemu_status: str | None
    events: list[tuple[str, Any]]
    source_ram: np.ndarray
    qemu_ram: np.ndarray
    seconds: float
    running: bool  # the source's workload, at the end


def _qemu_extra(folder: Path, *, paused: bool = True, uuid: str | None = None) -> tuple[str, ...]:
    ram_file = folder / "destination.ram"
    extra = (
        "-object",
        f"memory-backend-file,id=mem,size={MEMORY},mem-path={ram_file},share=on",
        "-machine",
        "memory-backend=mem",
    )
    return extra + (("-S",) if paused else ()) + (("-uuid", uuid) if uuid else ())


def _set(qmp: QMPConnection, capabilities: dict[str, bool], parameters: dict[str, Any]) -> None:
    if capabilities:
        qmp.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": c, "state": s} for c, s in capabilities.items()]},
        )
    if parameters:
        qmp.execute("migrate-set-parameters", parameters)


def _source(
    block: RAMBlock,
    capabilities: dict[str, bool],
    parameters: dict[str, Any],
    *,
    workload: Workload | None = None,
    events: list | None = None,
    uuid: bytes = bytes(16),
    configuration: Configuration | None = None,
) -> MigrationSource:
    return MigrationSource(
        [block],
        capabilities=capabilities,
        parameters={"x-dirty-tracker": "explicit", **parameters},
        on_stop=workload.stop if workload else None,
        on_resume=workload.running.set if workload else None,
        throttle=workload.throttle if workload else None,
        on_event=(lambda name, data: events.append((name, data))) if events is not None else None,
        machine_type=MACHINE,
        uuid=uuid,
        configuration=configuration,
        device_state=NO_DEVICES,
    )


def _migrate(
    folder: Path,
    capabilities: dict[str, bool] | None = None,
    parameters: dict[str, Any] | None = None,
    *,
    qemu_capabilities: dict[str, bool] | None = None,
    qemu_parameters: dict[str, Any] | None = None,
    same_multifd: bool = True,
    block: RAMBlock | None = None,
    workload_seconds: float | None = None,
    live: bool = False,
    paused: bool = True,
    uuid: bytes = bytes(16),
    qemu_uuid: str | None = None,
    configuration: Configuration | None = None,
    during: Callable[[QemuVM, MigrationSource], None] | None = None,
) -> Run:
    """One migration of `block` (default: _memory()) into a fresh QEMU; QEMU
    gets our multifd settings too unless `same_multifd` is off."""
    capabilities = capabilities or {}
    parameters = parameters or {}
    qemu_capabilities = dict(qemu_capabilities or {})
    qemu_parameters = dict(qemu_parameters or {})
    if same_multifd and capabilities.get("multifd"):
        qemu_capabilities.setdefault("multifd", True)
        if "multifd-channels" in parameters:
            qemu_parameters.setdefault("multifd-channels", parameters["multifd-channels"])
    folder.mkdir(exist_ok=True)
    owned = block is None
    block = block or _memory()
    workload = Workload(block, workload_seconds) if live or workload_seconds else None
    run = Run()
    run.events = []
    source = _source(
        block,
        capabilities,
        parameters,
        workload=workload,
        events=run.events,
        uuid=uuid,
        configuration=configuration,
    )
    extra = _qemu_extra(folder, paused=paused, uuid=qemu_uuid)
    try:
        with QemuVM(
            folder, "destination", memory="32M", guest=False, incoming=True, extra=extra
        ) as vm:
            with vm.connect() as qmp:
                _set(qmp, qemu_capabilities, qemu_parameters)
                uri = f"unix:{folder}/migration.sock"
                qmp.execute("migrate-incoming", {"uri": uri})
                started = time.monotonic()
                source.migrate(uri)
                if during is not None:
                    during(vm, source)
                run.ours = source.wait(TIMEOUT)
                run.seconds = time.monotonic() - started
                try:
                    run.qemu = _wait_for_qemu(
                        qmp, 2.0 if run.ours["status"] == "completed" else 0.2
                    )
                    run.qemu_status = qmp.execute("query-status")["status"]
                except ConnectionError:  # 7.2 exits when its incoming migration fails
                    run.qemu = run.qemu_status = None
            run.qemu_ram = np.fromfile(folder / "destination.ram", dtype=np.uint8)
    finally:
        source.cancel()
        if workload is not None:
            run.running = workload.running.is_set()
            workload.close()
    run.source_ram = np.array(block.array)
    if owned:
        block.close()
    return run


def _wait_for_qemu(qmp: QMPConnection, wait: float = 2.0) -> dict[str, Any]:
    """QEMU's incoming side once it has ended, or as it is after `wait` (a 7.2
    destination that waits for channels never ends)."""
    deadline = time.monotonic() + wait
    while True:
        info = qmp.execute("query-migrate")
        if info.get("status") in ("completed", "failed") or time.monotonic() > deadline:
            return info
        time.sleep(0.02)


def _assert_identical(run: Run) -> None:
    assert run.ours["status"] == "completed", run.ours
    assert run.qemu == {"status": "completed"}, run.qemu
    assert run.qemu_status == "paused"
    differ = np.flatnonzero(run.qemu_ram != run.source_ram)
    assert not len(differ), f"{len(differ)} bytes differ, first at {differ[0]:#x}"


def _assert_failed(run: Run, *words: str) -> None:
    assert run.ours["status"] == "failed", run.ours
    for word in words:
        assert word in run.ours["error-desc"], run.ours
    # Every thread of the migration is joined once it has failed.
    ours = {"migration", "return-path"}
    left = [t.name for t in threading.enumerate() if t.name in ours or "multifd" in t.name]
    assert not left, left


@pytest.mark.parametrize(
    ("capabilities", "parameters"),
    [
        ({}, {}),
        ({"multifd": True}, {"multifd-channels": 1}),
        ({"multifd": True}, {"multifd-channels": 8}),
        ({"multifd": True, "return-path": True, "events": True}, {"multifd-channels": 3}),
        ({"return-path": True}, {}),
        # Our 9.0 profile's packets: 7.2 reads every field it knows where it was.
        ({"multifd": True}, {"multifd-channels": 2, "x-stream-profile": "9.0"}),
    ],
)
def test_capabilities_and_parameters(
    tmp_path: Path, capabilities: dict[str, bool], parameters: dict[str, Any]
) -> None:
    run = _migrate(tmp_path, capabilities, parameters)
    _assert_identical(run)
    if capabilities.get("return-path"):
        assert run.ours["x-return-path"] == {"pongs": [1], "shut": 0}
    if capabilities.get("events"):
        statuses = [d["status"] for name, d in run.events if name == "MIGRATION"]
        assert statuses == ["setup", "active", "completed"], run.events
        assert any(name == "MIGRATION_PASS" for name, _ in run.events)


def test_auto_converge_with_a_busy_workload(tmp_path: Path) -> None:
    """The workload never idles: only the throttle lets the rounds fit 5 ms."""
    run = _migrate(
        tmp_path,
        {"multifd": True, "auto-converge": True},
        {"multifd-channels": 2, "downtime-limit": 5, "max-bandwidth": 64 << 20},
        live=True,
    )
    _assert_identical(run)
    assert run.ours["x-rounds"] > 2
    assert not run.running  # stopped for the switchover, as a migrated VM


def test_low_bandwidth_over_several_rounds(tmp_path: Path) -> None:
    run = _migrate(
        tmp_path, {}, {"max-bandwidth": 48 << 20, "downtime-limit": 50}, workload_seconds=1.0
    )
    _assert_identical(run)
    assert run.ours["x-rounds"] > 2
    assert run.seconds > 0.4  # 24 MiB of non-zero pages at 48 MiB/s


def test_a_small_downtime_limit_waits_for_the_workload_to_calm(tmp_path: Path) -> None:
    run = _migrate(
        tmp_path,
        {"multifd": True, "events": True},
        {"multifd-channels": 2, "downtime-limit": 1},
        workload_seconds=0.5,
    )
    _assert_identical(run)
    passes = [d["pass"] for name, d in run.events if name == "MIGRATION_PASS"]
    assert len(passes) > 2 and passes == sorted(passes)


def test_a_running_destination_runs_and_says_completed(tmp_path: Path) -> None:
    """Without -S QEMU starts the VM once RAM is in. Its incoming query-migrate
    shows the status alone in 7.2 (no times, no ram figures): nothing to check
    against ours."""
    run = _migrate(tmp_path, {"multifd": True}, {"multifd-channels": 2}, paused=False)
    assert run.ours["status"] == "completed", run.ours
    assert run.qemu == {"status": "completed"}
    assert run.qemu_status == "running"
    ram = run.ours["ram"]
    assert ram["normal"] == MEMORY * 3 // 4 // 4096 and ram["duplicate"] == MEMORY // 4 // 4096
    assert ram["transferred"] >= ram["normal"] * 4096 and run.ours["total-time"] > 0


@pytest.mark.parametrize("given", [False, True])
def test_validate_uuid(tmp_path: Path, given: bool) -> None:
    configuration = Configuration.build(MACHINE) if given else None
    run = _migrate(
        tmp_path,
        {"validate-uuid": True},
        uuid=UUID_BYTES,
        qemu_uuid=UUID,
        qemu_capabilities={"validate-uuid": True},
        configuration=configuration,
    )
    _assert_identical(run)


@pytest.mark.parametrize("given", [False, True])
def test_validate_uuid_with_another_uuid_is_refused_by_qemu(tmp_path: Path, given: bool) -> None:
    """Also with a configuration given (a QEMU VM's): without our UUID in it,
    QEMU would check nothing and take the migration."""
    configuration = Configuration.build(MACHINE) if given else None
    run = _migrate(
        tmp_path,
        {"validate-uuid": True, "return-path": True},
        uuid=b"\1" * 16,
        qemu_uuid=UUID,
        configuration=configuration,
    )
    _assert_failed(run, "it had not answered our PING", "validate-uuid")
    assert run.qemu is None  # QEMU 7.2 exits on the mismatch


def test_multifd_channels_carry_the_destinations_uuid(tmp_path: Path) -> None:
    """QEMU refuses a multifd channel whose UUID is not its own, with or
    without validate-uuid: ours says which channel broke, at once."""
    run = _migrate(tmp_path, {"multifd": True}, {"multifd-channels": 2}, qemu_uuid=UUID)
    _assert_failed(run, "channel ")
    assert run.seconds < 5


def test_x_verify_is_refused_before_connecting(tmp_path: Path) -> None:
    """QEMU cannot verify: refused in migrate(), and QEMU still listens, so
    the next migration (without it) starts at once."""
    block = _memory()
    source = _source(block, {"x-verify": True}, {})
    with (
        QemuVM(
            tmp_path,
            "destination",
            memory="32M",
            guest=False,
            incoming=True,
            extra=_qemu_extra(tmp_path),
        ) as vm,
        vm.connect() as qmp,
    ):
        uri = f"unix:{tmp_path}/migration.sock"
        qmp.execute("migrate-incoming", {"uri": uri})
        with pytest.raises(ValueError, match="x-verify needs a Python multifd destination"):
            source.migrate(uri)
        assert source.query()["status"] == "failed"
        source.settings.set_capabilities({"x-verify": False})
        source.migrate(uri)
        assert source.wait(TIMEOUT)["status"] == "completed"
        assert _wait_for_qemu(qmp) == {"status": "completed"}
        ram = np.fromfile(tmp_path / "destination.ram", dtype=np.uint8)
    assert np.array_equal(ram, np.asarray(block.array))
    block.close()


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(4, 2), (3, 2), (2, None)],  # QEMU 7.2 accepts id 2 of 2 (off by one) and dies
)
def test_more_channels_than_qemu_breaks_a_named_channel_at_once(
    tmp_path: Path, ours: int, theirs: int | None
) -> None:
    run = _migrate(
        tmp_path,
        {"multifd": True},
        {"multifd-channels": ours},
        same_multifd=False,
        qemu_capabilities={"multifd": theirs is not None},
        qemu_parameters={"multifd-channels": theirs} if theirs else {},
    )
    _assert_failed(run, "channel ")
    assert run.seconds < 5
    assert run.qemu is None


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(2, 4), (None, 2)],
)
def test_a_qemu_waiting_for_channels_we_do_not_open(
    tmp_path: Path, ours: int | None, theirs: int
) -> None:
    """QEMU reads the main channel only once all its channels are there: ours
    stops after x-io-timeout, and the return path, which never answered our
    PING, says why."""
    run = _migrate(
        tmp_path,
        {"multifd": ours is not None, "return-path": True},
        {"x-io-timeout": IO_TIMEOUT, **({"multifd-channels": ours} if ours else {})},
        same_multifd=False,
        qemu_capabilities={"multifd": True},
        qemu_parameters={"multifd-channels": theirs},
    )
    _assert_failed(run, f"could not write for {IO_TIMEOUT} s", "has not answered our PING")
    # A partial write's full wait, then another, then the grace for a verdict.
    assert run.seconds < 4 * IO_TIMEOUT + 2
    # Still waiting for channels: 7.2 shows no status then, only its address.
    assert run.qemu is not None and "status" not in run.qemu, run.qemu


@pytest.mark.parametrize(
    "block",
    [
        lambda: RAMBlock.anonymous("pc.ram", MEMORY),  # QEMU has no such block
        lambda: RAMBlock.anonymous("mem", MEMORY // 2),  # QEMU's cannot be resized
    ],
)
def test_a_ram_block_list_qemu_refuses(tmp_path: Path, block: Callable[[], RAMBlock]) -> None:
    ram = block()
    before = np.array(ram.array)
    run = _migrate(tmp_path, {"multifd": True}, {"multifd-channels": 2}, block=ram)
    ram.close()
    _assert_failed(run, "write failed")
    assert run.seconds < 5
    assert run.qemu is None
    assert np.array_equal(run.source_ram, before)


def test_a_qemu_not_listening(tmp_path: Path) -> None:
    block = _memory()
    source = _source(block, {"multifd": True}, {"multifd-channels": 2})
    # -incoming defer, but no migrate-incoming.
    with QemuVM(tmp_path, "destination", memory="32M", guest=False, incoming=True):
        source.migrate(f"unix:{tmp_path}/migration.sock")
        info = source.wait(TIMEOUT)
    block.close()
    assert info["status"] == "failed"
    assert "main channel: connect to unix:" in info["error-desc"], info


def test_a_qemu_killed_mid_migration_and_the_next_one(tmp_path: Path) -> None:
    """The failure names the broken channel at once; the source's memory and
    workload go on, and the next migration, into a new QEMU, completes."""
    block = _memory()

    def kill(vm: QemuVM, source: MigrationSource) -> None:
        time.sleep(0.5)
        assert source.query()["status"] == "active"
        vm.process.kill()

    settings = ({"multifd": True}, {"multifd-channels": 2, "max-bandwidth": 16 << 20})
    run = _migrate(tmp_path / "killed", *settings, block=block, live=True, during=kill)
    _assert_failed(run, "write failed", "Broken pipe")
    assert run.seconds < 2
    assert run.running  # resumed
    run = _migrate(tmp_path / "next", *settings, block=block, workload_seconds=0.2)
    block.close()
    _assert_identical(run)
