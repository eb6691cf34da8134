"""The migration source: live pre-copy of RAM blocks over N multifd channels.

One migration thread runs the rounds: send every page, then what the dirty
trackers saw written meanwhile, until the rest fits `downtime-limit` at the
measured bandwidth; then it stops the workload, sends the rest and the
application's state, and ends the stream. Channel threads carry the pages.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from ..channels import (
    ChannelError,
    ConnectAbort,
    Connections,
    ExecURI,
    FileURI,
    MigrationURI,
    TLSConfig,
    URIError,
    check_multifd,
    connect_channels,
    parse_uri,
)
from ..memory import RAMBlock, choose_tracker, page_hashes, verify_keys, zero_mask
from ..wire import (
    PROFILES,
    TARGET_PAGE_SIZE,
    Compression,
    Configuration,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    PacketLayout,
    RamBlockEntry,
    SectionFooter,
    SectionPart,
    SectionStart,
    VMCommand,
    WireError,
)
from ..wire.appstate import AppState, vmdescription
from ..wire.ram import RamFlag, encode_zero_pages
from ..wire.reader import be64, counted_string
from ..wire.verify import BlockHashes, VerifySection
from .endpoint import Endpoint, Event
from .multifd_send import MultifdSender
from .params import SOURCE_SETUP_PARAMETERS, MigrationConfigError, MigrationSettings
from .qemufile import QEMUFileWriter
from .rate_limit import RateLimit
from .return_path import NO_PONG, ReturnPathReader
from .state import MigrationState, MigrationStatus
from .stats import MigrationAborted, RamStats
from .tls_settings import tls_config

RAM_SECTION_ID = 2
APP_STATE_SECTION_ID = 3
VERIFY_SECTION_ID = 4
DEFAULT_MACHINE_TYPE = "multifd-python"
# Pages looked at per step of a round: 4 MiB, small enough for a smooth rate limit.
CHUNK_PAGES = 1024
# The share of downtime-limit a switchover is planned to take (see _iterate).
SWITCHOVER_MARGIN = 0.75
# QEMU's source pings once after opening the return path, with this value.
FIRST_PING = 1
# A destination that fails sends SHUT before its sockets break; when a write
# breaks first, this long is given to the return path to tell why.
VERDICT_GRACE = 1.0
# query-migrate's mbps and pages-per-second are measured over windows at least
# this long (QEMU's BUFFER_DELAY); its dirty-pages-rate, and auto-converge's
# check, over periods of at least a second between dirty syncs (as QEMU's
# migration_bitmap_sync).
RATE_WINDOW = 0.1
DIRTY_RATE_PERIOD = 1.0


def _merge_pages(first: np.ndarray, second: np.ndarray, pages: int) -> np.ndarray:
    """The pages (of a block of `pages`) in either, in increasing order. A
    mask, not np.union1d: numpy's unique imports numpy.ma on first use, 20 to
    60 ms the first switchover of a process would spend with the workload
    stopped, unforeseen by the downtime estimate."""
    mask = np.zeros(pages, dtype=bool)
    mask[first] = True
    mask[second] = True
    return np.flatnonzero(mask)


class MigrationSource(Endpoint):
    """Live-migrates `blocks` to a destination URI.

    `on_stop` pauses the workload at switchover and `on_resume` restarts it if
    the migration then fails or is cancelled; `save_state` returns the
    application's state (bytes) to carry in a device section; `throttle(percent)`
    slows the workload when auto-converge asks (0 lifts it); `on_event(name,
    data)` receives QMP-style events: MIGRATION and MIGRATION_PASS when the
    `events` capability is on, and always STOP when the workload stops for the
    switchover and RESUME when a failed one restarts it (as QEMU's run state
    events, which no capability gates).
    """

    setup_parameters = SOURCE_SETUP_PARAMETERS

    def __init__(
        self,
        blocks: Sequence[RAMBlock],
        *,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
        on_stop: Callable[[], None] | None = None,
        on_resume: Callable[[], None] | None = None,
        save_state: Callable[[], bytes] | None = None,
        throttle: Callable[[int], None] | None = None,
        on_event: Event | None = None,
        machine_type: str = DEFAULT_MACHINE_TYPE,
        uuid: bytes = bytes(16),
        configuration: Configuration | None = None,
        device_state: bytes | None = None,
        ram_section_id: int = RAM_SECTION_ID,
    ) -> None:
        names = [b.name for b in blocks]
        if not blocks:
            raise ValueError("a migration needs at least one RAM block")
        if len(set(names)) != len(names):
            raise ValueError(f"RAM block names must be unique: {names}")
        self.blocks = list(blocks)
        self.settings = MigrationSettings(capabilities, parameters)
        self.machine_type = machine_type
        self.uuid = bytes(uuid)
        # A QEMU VM's own configuration and device sections (restoring a
        # snapshot into a real QEMU) replace ours, byte for byte.
        self._configuration = configuration
        self._device_state = device_state
        self._ram_section_id = ram_section_id
        self._on_stop = on_stop
        self._on_resume = on_resume
        self._save_state = save_state
        self._throttle = throttle
        self.on_event = on_event  # may be set later, e.g. by a QMP server
        self.state = MigrationState(self._status_changed)
        self._thread: threading.Thread | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._connections: Connections | None = None
        # Lets cancel() end a connect or TLS handshake that waits on the peer.
        self._connecting = ConnectAbort()
        self._sender: MultifdSender | None = None
        self._return_path: ReturnPathReader | None = None
        # Stopped by `pause` (QEMU's `stop`), across migrations, until `resume`.
        self._paused = False
        self._reset_counters()

    # -- control --------------------------------------------------------------

    def migrate(self, uri: str) -> None:
        """Start migrating to `uri`; returns at once (the work runs in its own thread).

        A bad URI, or settings that cannot go with it, raise here; as in QEMU
        that migration has then begun and failed (status `failed` with the
        error, MIGRATION events setup and failed), and another may start at once.
        """
        self._refuse_while_running()
        if self._thread is not None:
            self._thread.join()
        try:
            target, settings, tls = self._prepare(uri)
        except (URIError, ChannelError, MigrationConfigError) as exc:
            self._reset_counters()
            self.state.set(MigrationStatus.SETUP)
            self.state.fail(str(exc))
            self._end_time = time.monotonic()
            self.state.set(MigrationStatus.FAILED)
            raise
        self._reset_counters()
        self._cancel.clear()
        with self._lock:
            self._connecting = ConnectAbort()
        self.state.set(MigrationStatus.SETUP)
        self._thread = threading.Thread(
            target=self._run, args=(target, settings, tls), name="migration", daemon=True
        )
        self._thread.start()

    def _prepare(self, uri: str) -> tuple[MigrationURI, MigrationSettings, TLSConfig | None]:
        """The target, a copy of the settings and the TLS configuration, or why
        this URI cannot be migrated to with these settings."""
        target = parse_uri(uri)
        # What this migration reads as it starts, checked together here; what
        # it reads as it goes (max-bandwidth, downtime-limit, auto-converge's)
        # comes from self.settings, which migrate-set-parameters may change.
        settings = self.settings.copy()
        if settings.capability("x-verify") and self._device_state is not None:
            # A real QEMU destination would refuse the unknown verify section.
            raise MigrationConfigError(
                "x-verify needs a Python multifd destination: "
                "it cannot go with a QEMU VM's device state"
            )
        if settings.capability("return-path") and isinstance(target, FileURI | ExecURI):
            raise MigrationConfigError(
                f"return-path needs a socket (tcp:, unix: or an fd: socket): {target} "
                "cannot carry the destination's answers"
            )
        if settings.capability("multifd"):
            check_multifd(target)
        return target, settings, tls_config(settings)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the migration has finished and every thread is joined."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.query()

    def cancel(self) -> None:
        """Stop the migration now: state `cancelled`, every thread joined and every
        socket closed when this returns. Nothing happens if none is running."""
        with self._lock:
            if not self.state.status.live:
                return
            self._cancel.set()
            self.state.set(MigrationStatus.CANCELLING)
            self._connecting.abort()
            if self._sender is not None:
                self._sender.abort()
            if self._connections is not None:
                self._connections.shutdown()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # -- query ----------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """A `query-migrate` answer with QEMU's members in the states QEMU shows
        them (fill_source_migration_info): none at all before a migration, only
        the status in setup, times and `ram` while active and once completed,
        the status and `error-desc` once failed. Our `x-` members follow once
        setup is done: a failed or cancelled migration keeps its channels'
        figures and errors and the return path's verdict, which say what went
        wrong."""
        status = self.state.status
        if status is MigrationStatus.NONE:
            return {}
        info: dict[str, Any] = {"status": status.value}
        if status is MigrationStatus.SETUP:
            return info
        if status is MigrationStatus.FAILED and self.state.error:
            info["error-desc"] = self.state.error
        if status in (
            MigrationStatus.ACTIVE,
            MigrationStatus.CANCELLING,
            MigrationStatus.COMPLETED,
        ):
            self._time_and_ram(status, info)
        if status.finished and self._setup_time is None:
            return info  # ended in setup: our figures hold nothing yet
        info["x-converging"] = self._converging
        info["x-rounds"] = self._round
        info["x-dirty-tracker"] = self._tracker_names
        info["x-multifd-channels"] = [c.to_json() for c in self._channel_stats()]
        return_path = self._return_path
        if return_path is not None:
            info["x-return-path"] = return_path.info()
        elif self._return_path_info is not None:
            info["x-return-path"] = dict(self._return_path_info)
        if self._verified_pages is not None:
            # The comparison happens at the destination: the source only knows
            # how many pages it vouched for (and, with return-path, the verdict).
            info["x-verify"] = {"pages": self._verified_pages}
        return info

    def _setup_ms(self) -> int:
        return int((self._setup_time or 0) * 1000)

    def _total_ms(self) -> int:
        end = self._end_time or time.monotonic()
        return int((end - self._start_time) * 1000)

    def _time_and_ram(self, status: MigrationStatus, info: dict[str, Any]) -> None:
        completed = status is MigrationStatus.COMPLETED
        info["setup-time"] = self._setup_ms()
        info["total-time"] = self._total_ms()
        if completed:
            info["downtime"] = int(self._downtime * 1000)
        else:
            info["expected-downtime"] = int(self._expected_downtime * 1000)
        multifd_bytes = sum(c.counted_bytes for c in self._channel_stats())
        info["ram"] = self.ram.to_json(multifd_bytes, completed=completed)
        if self._throttle_percent:
            info["cpu-throttle-percentage"] = self._throttle_percent

    @property
    def stopped(self) -> bool:
        """The workload is not running: stopped for a switchover, after a
        completed migration, or by `pause`."""
        return self.run_state != "running"

    @property
    def run_state(self) -> str:
        """The workload's run state in QEMU's words: `running`, `paused` (by
        `pause`), `finish-migrate` (stopped for the switchover; the migration
        status stays active) or `postmigrate` (a completed migration stopped
        it, until `resume`)."""
        with self._lock:
            if self._stopped:
                completed = self.state.status is MigrationStatus.COMPLETED
                return "postmigrate" if completed else "finish-migrate"
            return "paused" if self._paused else "running"

    def pause(self) -> None:
        """Stop the workload here, as QEMU's `stop`: on_stop, then the STOP
        event. A migration may run meanwhile; its switchover then has nothing
        to stop, and if it fails it leaves the workload stopped. Nothing
        happens if the workload is not running."""
        with self._lock:
            if self._paused or self._stopped:
                return
            self._paused = True
        if self._on_stop is not None:
            self._on_stop()
        self._event("STOP", None)

    def resume(self) -> None:
        """Run the workload here again, as QEMU's `cont`: after `pause`, or in
        postmigrate (the destination's copy is then no longer the only one
        that runs: the caller's choice, for a destination that failed to
        start, say); on_resume, then RESUME. Refused while a switchover has the
        workload stopped; nothing happens if it runs."""
        with self._lock:
            completed = self.state.status is MigrationStatus.COMPLETED
            if self._stopped and not completed:
                raise MigrationConfigError(
                    "The workload is stopped for the switchover of a running migration"
                )
            if not (self._paused or self._stopped):
                return
            self._paused = self._stopped = False
        if self._on_resume is not None:
            self._on_resume()
        self._event("RESUME", None)

    def _channel_stats(self) -> list:
        return self._sender.stats if self._sender is not None else self._last_channel_stats

    # -- the migration thread -------------------------------------------------

    def _reset_counters(self) -> None:
        total = sum(b.used_length for b in self.blocks)
        # Every page is dirty until sent (QEMU's setup marks them all).
        self.ram = RamStats(total=total, remaining=total)
        self._start_time = time.monotonic()
        self._end_time: float | None = None
        self._setup_time: float | None = None
        self._downtime = 0.0
        # QEMU's guess until a round has measured one: the limit itself.
        self._expected_downtime = self.settings.parameter("downtime-limit") / 1000
        # (start, bytes sent, pages sent) of the rate window under way.
        self._rate_window = (self._start_time, 0, 0)
        # (start, pages dirtied since, RAM transferred at its start) of the
        # dirty-sync period under way.
        self._dirty_period = (self._start_time, 0, 0)
        # Periods that dirtied more than throttle-trigger-threshold allows,
        # since the last throttle step (QEMU's dirty_rate_high_cnt).
        self._high_dirty_periods = 0
        self._converging = True
        self._throttle_percent = 0
        self._round = 0
        self._tracker_names: dict[str, str] = {}
        self._last_channel_stats: list = []
        self._stopped = False
        self._last_block: str | None = None
        self._main: QEMUFileWriter | None = None
        self._verified_pages: int | None = None
        self._return_path_info: dict[str, Any] | None = None

    def _fail(self, message: str) -> None:
        # After cancel, broken sockets are its consequence, not an error.
        if self._cancel.is_set():
            return
        if self.state.fail(message):
            # Wake the migration thread wherever it waits.
            if self._sender is not None:
                self._sender.abort()
            if self._connections is not None:
                self._connections.shutdown()

    def _run(self, target, settings: MigrationSettings, tls) -> None:
        # Filled by _setup as each tracker is made, so that a failure or cancel
        # in setup still closes them (a kernel tracker holds fds and protection).
        trackers: list = []
        try:
            self._setup(target, settings, tls, trackers)
            self.state.set(MigrationStatus.ACTIVE)
            dirty = [
                np.arange(b.used_length // TARGET_PAGE_SIZE, dtype=np.int64) for b in self.blocks
            ]
            dirty = self._iterate(settings, trackers, dirty)
            self._complete(settings, trackers, dirty)
        except MigrationAborted:
            pass
        except ChannelError as exc:
            self._channel_failed(str(exc))
        except (WireError, OSError, ValueError) as exc:
            self._fail(str(exc))
        except Exception as exc:
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._cleanup(trackers)

    def _channel_failed(self, message: str) -> None:
        """A channel that breaks is most often a destination that failed: when it
        said so on the return path (it does before closing), its reason is the
        error, not the broken pipe."""
        return_path = self._return_path
        if return_path is not None and not self._cancel.is_set():
            return_path.wait(VERDICT_GRACE)
            verdict = return_path.verdict()
            if return_path.shut is not None:
                message = verdict or message
            elif return_path.silent():
                message += NO_PONG
            elif verdict is not None:  # closed without SHUT: maybe before any PONG
                message += f"; {verdict}"
        self._fail(message)

    def _setup(self, target, settings: MigrationSettings, tls, trackers: list) -> None:
        multifd = settings.capability("multifd")
        channels = settings.parameter("multifd-channels") if multifd else 0
        profile = PROFILES[settings.parameter("x-stream-profile")]
        self._layout = PacketLayout.V9_0 if profile.zero_pages_in_packets else PacketLayout.V7_2
        config = self._configuration or Configuration.build(self.machine_type)
        if settings.capability("validate-uuid"):
            # Also into a given configuration (a QEMU VM's, saved without it):
            # without the subsection the destination checks nothing.
            config = config.with_uuid(self.uuid)
        header = FileHeader().pack() + config.pack()
        connections = connect_channels(
            target,
            header=header,
            channels=channels,
            uuid=self.uuid,
            tls=tls,
            abort=self._connecting,
        )
        with self._lock:
            self._connections = connections
            if self._cancel.is_set():
                raise MigrationAborted
        io_timeout = settings.parameter("x-io-timeout") or None
        for channel in connections.all:
            channel.timeout = io_timeout
        self._main = QEMUFileWriter(connections.main)
        self._main_header_bytes = len(header)
        if settings.capability("return-path"):
            self._open_return_path(connections)
        if multifd:
            sender = MultifdSender(
                connections.multifd,
                compression=Compression(settings.parameter("multifd-compression")),
                level=settings.parameter(
                    "multifd-zlib-level"
                    if settings.parameter("multifd-compression") == "zlib"
                    else "multifd-zstd-level"
                ),
                layout=self._layout,
                on_error=self._channel_failed,
            )
            with self._lock:
                self._sender = sender
            sender.start()

        preference = settings.parameter("x-dirty-tracker")
        for block in self.blocks:
            tracker = choose_tracker(block, preference)
            trackers.append(tracker)
            self._tracker_names[block.name] = tracker.name
            # Lazy: the first round covers each range just before reading it, so
            # the kernel tracker's setup (mapping in, protecting) overlaps the sending.
            tracker.start(lazy=True)
        self.ram.dirty_sync_count = 1
        self._pass_event()

        # Setup section: the block list, one sync, EOS (QEMU's ram_save_setup).
        mem_size = MemSize(tuple(RamBlockEntry(b.name, b.used_length) for b in self.blocks))
        self._main.write(SectionStart(self._ram_section_id, "ram", 0, 4).pack() + mem_size.pack())
        self._end_section()
        self._setup_time = time.monotonic() - self._start_time
        # The rates measure the transfer, from here: QEMU starts its first
        # window when setup is done.
        now = time.monotonic()
        self._rate_window = (now, self._bytes_sent(), 0)
        self._dirty_period = (now, 0, self._ram_transferred())

    def _open_return_path(self, connections: Connections) -> None:
        """Listen for the destination's answers, then ask it to open its end and
        ping it, right after the configuration (QEMU's migration_thread)."""
        if not connections.main.duplex:
            raise ChannelError(
                connections.main.name,
                "return-path needs a socket: this fd: is a pipe or a file",
            )
        return_path = ReturnPathReader(connections.main, self._fail)
        with self._lock:
            self._return_path = return_path
        return_path.start()
        self._main.write(VMCommand.open_return_path().pack() + VMCommand.ping(FIRST_PING).pack())

    def _iterate(self, settings: MigrationSettings, trackers: list, dirty: list) -> list:
        """`settings` holds what migrate() saw; downtime-limit and the
        auto-converge parameters are read from self.settings at each round, as
        migrate-set-parameters may change them meanwhile."""
        previous_remaining: int | None = None
        while True:
            self._round += 1
            started = time.monotonic()
            sent_before = self._bytes_sent()
            self.ram.remaining = sum(len(d) for d in dirty) * TARGET_PAGE_SIZE
            self._main.write(SectionPart(self._ram_section_id).pack())
            self._send_pages(trackers, dirty, paced=True)
            sync_started = time.monotonic()
            self._end_section()
            # QEMU counts an iteration's EOS as RAM sent (not setup's, nor
            # the completion's).
            self._count_ram_bytes(len(EndOfSection().pack()))
            self._update_rates()
            sync_seconds = time.monotonic() - sync_started
            elapsed = max(time.monotonic() - started, 1e-6)
            # The switchover plans with the whole round's bandwidth.
            sent = self._bytes_sent() - sent_before
            bandwidth = sent / elapsed
            dirty = [t.collect().indices() for t in trackers]
            dirty_pages = sum(len(d) for d in dirty)
            self.ram.dirty_sync_count += 1
            period = self._dirty_sync(dirty_pages)
            self.ram.remaining = dirty_pages * TARGET_PAGE_SIZE
            # Beyond sending what is left, a switchover pays a fixed cost (the
            # final sync and the device state; this round's sync stands for it)
            # and sends what the workload dirties between this collect and the
            # stop. The margin aims below the limit, not at it: QEMU, aiming at
            # it, overshoots often.
            self._expected_downtime = (
                self.ram.remaining / bandwidth + sync_seconds if bandwidth else 0.0
            )
            self._pass_event()
            limit_s = self.settings.parameter("downtime-limit") / 1000
            # Nothing left to send always fits, however small the limit.
            if not dirty_pages or self._expected_downtime <= limit_s * SWITCHOVER_MARGIN:
                return dirty
            # Rounds that stop shrinking will never fit the limit on their own.
            if previous_remaining is not None:
                self._converging = self.ram.remaining < previous_remaining
            previous_remaining = self.ram.remaining
            if period is not None and settings.capability("auto-converge"):
                self._trigger_throttle(*period)
            if self._cancel.is_set():
                raise MigrationAborted

    def _trigger_throttle(self, dirtied: int, transferred: int) -> None:
        """A dirty-sync period dirtied `dirtied` bytes and sent `transferred`:
        the second period (not necessarily in a row) to dirty more than
        throttle-trigger-threshold % of what it sent raises the throttle
        (QEMU's migration_trigger_throttle)."""
        threshold = transferred * self.settings.parameter("throttle-trigger-threshold") // 100
        if dirtied <= threshold:
            return
        self._high_dirty_periods += 1
        if self._high_dirty_periods >= 2:
            self._high_dirty_periods = 0
            self._raise_throttle(dirtied, threshold)

    def _raise_throttle(self, dirty: int, threshold: int) -> None:
        """`dirty` bytes were dirtied in a period that sent `threshold` bytes'
        worth of throttle-trigger-threshold (QEMU's mig_throttle_guest_down)."""
        if self._throttle_percent == 0:
            percent = self.settings.parameter("cpu-throttle-initial")
        else:
            increment = self.settings.parameter("cpu-throttle-increment")
            if self.settings.parameter("cpu-throttle-tailslow"):
                # Near the end a full step would slow the workload more than
                # needed: step at most to the share of CPU at which it would
                # dirty just the threshold (QEMU truncates it the same way).
                running = 100 - self._throttle_percent
                ideal = int(running * threshold / dirty)
                increment = min(running - ideal, increment)
            percent = self._throttle_percent + increment
        self._throttle_percent = min(percent, self.settings.parameter("max-cpu-throttle"))
        if self._throttle is not None:
            self._throttle(self._throttle_percent)

    def _complete(self, settings: MigrationSettings, trackers: list, dirty: list) -> None:
        # Switchover: the workload stops, the last round and the state go out.
        stop_ns = time.time_ns()
        stopped_at = time.monotonic()
        # Set first: an on_stop that fails may have stopped part of the workload,
        # and resuming a running one is harmless. STOP is announced even then,
        # so that the RESUME of the undo has its pair. A workload `pause` has
        # stopped already is neither stopped nor announced again.
        with self._lock:
            self._stopped = True
            was_running = not self._paused
        if was_running:
            try:
                if self._on_stop is not None:
                    self._on_stop()
            finally:
                # As QEMU's vm_stop: STOP once stopped, before the last dirty
                # sync (its MIGRATION_PASS). The status stays active.
                self._event("STOP", None)
        dirty = [
            _merge_pages(d, t.collect().indices(), b.used_length // TARGET_PAGE_SIZE)
            for d, t, b in zip(dirty, trackers, self.blocks, strict=True)
        ]
        self.ram.dirty_sync_count += 1
        self.ram.remaining = sum(len(d) for d in dirty) * TARGET_PAGE_SIZE
        self._pass_event()
        self._main.write(SectionPart(self._ram_section_id, end=True).pack())
        self._send_pages(trackers, dirty, paced=False)
        self._end_section()
        vmdesc: list[dict] = []
        if settings.capability("x-verify"):
            # The workload is stopped: the blocks are what the destination must hold.
            verify = self._verify_section(trackers)
            self._main.write(
                verify.header(VERIFY_SECTION_ID).pack()
                + verify.body()
                + SectionFooter(VERIFY_SECTION_ID).pack()
            )
            vmdesc.append(verify.vmdesc_entry())
        if self._device_state is not None:
            self._main.write(self._device_state)
        else:
            state = AppState(self._save_state() if self._save_state else b"", stop_ns)
            self._main.write(
                state.header(APP_STATE_SECTION_ID).pack()
                + state.body()
                + SectionFooter(APP_STATE_SECTION_ID).pack()
                + EndOfFile().pack()
                + vmdescription([*vmdesc, state.vmdesc_entry()]).pack()
            )
        self._main.flush()
        self.ram.remaining = 0
        self._await_read(settings)
        if self._return_path is not None:
            self._await_verdict(settings)
        if self._throttle_percent and self._throttle is not None:
            self._throttle(0)
        # Lifted: a completed query-migrate shows no cpu-throttle-percentage,
        # as QEMU's, whose throttle stops before it completes.
        self._throttle_percent = 0
        # total-time ends here, as QEMU's does, not after the teardown (the
        # channels closed, the trackers' protection and mappings undone).
        self._end_time = time.monotonic()
        # Downtime ends with it, as QEMU's: the destination has read every
        # page (and, with return-path, said it loaded them) only now.
        self._downtime = self._end_time - stopped_at
        # As QEMU's migration_calculate_complete: the final mbps is everything
        # sent (all of the main channel and the multifd packets) over the
        # whole migration but its setup, in whole milliseconds.
        transfer_ms = self._total_ms() - self._setup_ms()
        if transfer_ms > 0:
            self.ram.mbps = self._bytes_sent() * 8 / transfer_ms / 1000
        self.state.set(MigrationStatus.COMPLETED)

    def _await_read(self, settings: MigrationSettings) -> None:
        """Completed only once the destination has read every page: pages lent
        to the sockets are read from the source's memory at that moment, and
        after completion the application may write there again."""
        if self._sender is None:
            return
        timeout = settings.parameter("x-io-timeout") or None
        waiting = self._sender.wait_read(timeout)
        if self._cancel.is_set() or self.state.error is not None:
            raise MigrationAborted
        if waiting is not None:
            self._fail(f"{waiting} within {timeout:g} s" if timeout else waiting)
            raise MigrationAborted

    def _await_verdict(self, settings: MigrationSettings) -> None:
        """Completed only once the destination says it loaded everything (SHUT 0),
        as QEMU's source waits for its return path thread before completing."""
        assert self._return_path is not None
        timeout = settings.parameter("x-io-timeout") or None
        if not self._return_path.wait(timeout):
            silent = NO_PONG if self._return_path.silent() else ""
            self._fail(
                f"the destination did not report its result (no SHUT on the return path) "
                f"within {timeout:g} s{silent}"
            )
            raise MigrationAborted
        verdict = self._return_path.verdict()
        if verdict is not None:
            self._fail(verdict)
        if self._cancel.is_set() or self.state.error is not None:
            raise MigrationAborted

    def _verify_section(self, trackers: list) -> VerifySection:
        """Hashes of every page, with keys from a fresh seed (a corruption cannot
        be shaped in advance to collide)."""
        seed = int.from_bytes(os.urandom(8), "big")
        keys = verify_keys(seed)
        blocks = tuple(BlockHashes(t.reader.name, page_hashes(t.reader, keys)) for t in trackers)
        self._verified_pages = sum(len(b.hashes) for b in blocks)
        return VerifySection(seed, blocks)

    # -- sending --------------------------------------------------------------

    def _bytes_sent(self) -> int:
        """Bytes sent as QEMU 7.2 counts them: pages before compression."""
        multifd = sum(c.counted_bytes for c in self._sender.stats) if self._sender else 0
        return self._main.bytes_written + multifd

    def _send_pages(self, trackers: list, dirty: list, *, paced: bool) -> None:
        """One round: zero pages as ZERO records on main, the others in packets
        (or PAGE records on main without multifd). `dirty` holds each block's
        pages in strictly increasing order (an arange, or a bitmap's or a
        mask's flatnonzero): a chunk is a run exactly when it is as long as
        its span. `paced` rounds keep to max-bandwidth (the one after the stop does not,
        as in QEMU), read afresh at every chunk."""
        rate_limit = (
            RateLimit(lambda: self.settings.parameter("max-bandwidth"), self._bytes_queued)
            if paced
            else None
        )
        for tracker, pages in zip(trackers, dirty, strict=True):
            first = 0
            while first < len(pages):
                if self._cancel.is_set() or self.state.error is not None:
                    raise MigrationAborted
                chunk = pages[first : first + self._chunk_pages(rate_limit)]
                first += len(chunk)
                low, high = int(chunk[0]), int(chunk[-1])
                tracker.cover(low, high - low + 1)
                # The block's memory, maybe through an alias: the same pages.
                block = tracker.reader_for(low, high - low + 1)
                buffer = block.buffer
                # Strictly increasing (see above): as long as its span, a run.
                run = high - low + 1 == len(chunk)
                zero = zero_mask(block, range(low, high + 1) if run else chunk)
                zeros, normal = chunk[zero], chunk[~zero]
                if len(zeros):
                    offsets = zeros.astype(np.uint64) * np.uint64(TARGET_PAGE_SIZE)
                    records = encode_zero_pages(
                        block.name, offsets, continued=self._last_block == block.name
                    )
                    self._main.write(records)
                    self._count_ram_bytes(len(records))
                    self._last_block = block.name
                    self.ram.duplicate += len(zeros)
                if len(normal):
                    if self._sender is not None:
                        self._sender.send(block.name, buffer, normal)
                    else:
                        self._send_on_main(block.name, buffer, normal)
                    self.ram.normal += len(normal)
                # query() shows the round's progress, as QEMU's dirty-page count does.
                self.ram.remaining = max(0, self.ram.remaining - len(chunk) * TARGET_PAGE_SIZE)
                if rate_limit is not None:
                    self._keep_to(rate_limit)
                # After the pause max-bandwidth asks for: a window holds the
                # pages and the wait they cost, as QEMU's do.
                self._update_rates()

    @staticmethod
    def _chunk_pages(rate_limit: RateLimit | None) -> int:
        """Pages to look at in one step: CHUNK_PAGES, or what one step of
        max-bandwidth allows if less (at least a page)."""
        step = rate_limit.step_bytes() if rate_limit is not None else None
        if step is None:
            return CHUNK_PAGES
        return max(1, min(CHUNK_PAGES, step // TARGET_PAGE_SIZE))

    def _send_on_main(self, name: str, buffer: memoryview, pages: np.ndarray) -> None:
        """Plain precopy: PAGE records, the block named on its first page only."""
        parts: list = []
        size = 0
        for page in pages.tolist():
            offset = page * TARGET_PAGE_SIZE
            if self._last_block == name:
                header = be64(offset | RamFlag.PAGE | RamFlag.CONTINUE)
            else:
                header = be64(offset | RamFlag.PAGE) + counted_string(name)
                self._last_block = name
            parts += (header, buffer[offset : offset + TARGET_PAGE_SIZE])
            size += len(header) + TARGET_PAGE_SIZE
        self._main.writev(parts)
        self._count_ram_bytes(size)

    def _count_ram_bytes(self, size: int) -> None:
        """RAM records written on the main channel: precopy-bytes while the
        workload runs, downtime-bytes while it is stopped, for the switchover
        or by `pause` (QEMU's ram_transferred_add asks runstate_is_running)."""
        if self._stopped or self._paused:
            self.ram.downtime_bytes += size
        else:
            self.ram.precopy_bytes += size

    def _update_rates(self) -> None:
        """mbps and pages-per-second over the window that has just lasted at
        least RATE_WINDOW (QEMU's migration_update_counters): everything sent,
        main channel and multifd packets, as QEMU measures it."""
        now = time.monotonic()
        start, sent_before, pages_before = self._rate_window
        spent = now - start
        if spent < RATE_WINDOW:
            return
        sent = self._bytes_sent()
        pages = self.ram.normal + self.ram.duplicate
        self.ram.mbps = (sent - sent_before) * 8 / spent / 1e6
        self.ram.pages_per_second = int((pages - pages_before) / spent)
        self._rate_window = (now, sent, pages)

    def _dirty_sync(self, dirtied: int) -> tuple[int, int] | None:
        """At a dirty sync that found `dirtied` pages: once the period has lasted
        DIRTY_RATE_PERIOD or more, as QEMU's, dirty-pages-rate over it and
        (bytes dirtied, RAM bytes transferred) in it for auto-converge; None
        while it goes on. Per round, the rate would swing with every round,
        and throttle steps two short rounds apart would slow the workload to
        max-cpu-throttle within a second."""
        now = time.monotonic()
        start, pages, transferred_before = self._dirty_period
        pages += dirtied
        if now - start < DIRTY_RATE_PERIOD:
            self._dirty_period = (start, pages, transferred_before)
            return None
        transferred = self._ram_transferred()
        self.ram.dirty_pages_rate = int(pages / (now - start))
        self._dirty_period = (now, 0, transferred)
        return pages * TARGET_PAGE_SIZE, transferred - transferred_before

    def _ram_transferred(self) -> int:
        """query-migrate's ram.transferred, which auto-converge weighs the
        dirtied bytes against (QEMU's ram_counters.transferred)."""
        multifd = sum(c.counted_bytes for c in self._sender.stats) if self._sender else 0
        return self.ram.precopy_bytes + self.ram.downtime_bytes + multifd

    def _bytes_queued(self) -> int:
        """What the bandwidth limit counts: bytes written on main and handed to
        the channels (which write them a batch or two later)."""
        multifd = self._sender.queued_bytes if self._sender else 0
        return self._main.bytes_written + multifd

    def _keep_to(self, rate_limit: RateLimit) -> None:
        while (delay := rate_limit.delay()) > 0:
            if self._cancel.wait(delay) or self.state.error is not None:
                raise MigrationAborted

    def _end_section(self) -> None:
        """Sync every channel, then EOS and the footer: the round's sync point."""
        if self._sender is not None:
            self._sender.sync()
        self._main.write(EndOfSection().pack() + SectionFooter(self._ram_section_id).pack())
        self._main.flush()

    def _pass_event(self) -> None:
        if self.settings.capability("events"):
            self._event("MIGRATION_PASS", {"pass": self.ram.dirty_sync_count})

    # -- the one way out --------------------------------------------------------

    def _cleanup(self, trackers: list) -> None:
        with self._lock:
            sender, connections = self._sender, self._connections
            return_path = self._return_path
        if sender is not None:
            self._last_channel_stats = sender.stats
            sender.close()
        if connections is not None:
            connections.shutdown()
        if return_path is not None:
            return_path.close()
            self._return_path_info = return_path.info()
        if connections is not None:
            connections.close()
        for tracker in trackers:
            tracker.close()
        with self._lock:
            self._sender = None
            self._connections = None
            self._return_path = None
        if self._end_time is None:
            self._end_time = time.monotonic()
        if self.state.status is MigrationStatus.COMPLETED:
            return
        # The source keeps running: a failed switchover is undone, and RESUME
        # announces it as QEMU's vm_start does: before `cancelled` (QEMU's
        # cleanup sets it later), after `failed` (set before QEMU restarts).
        # As QEMU's vm_was_running: what `pause` stopped stays stopped.
        with self._lock:
            resumed = self._stopped and not self._paused
            self._stopped = False
        if resumed and self._on_resume is not None:
            self._undo(self._on_resume)
        if self._throttle_percent and self._throttle is not None:
            self._undo(self._throttle, 0)
        if self._cancel.is_set() and self.state.error is None:
            if resumed:
                self._event("RESUME", None)
            self.state.set(MigrationStatus.CANCELLING)
            self.state.set(MigrationStatus.CANCELLED)
        else:
            if self.state.error is None:
                self.state.fail("migration stopped without an error message")
            self.state.set(MigrationStatus.FAILED)
            if resumed:
                self._event("RESUME", None)

    def _undo(self, callback: Callable[..., None], *args: Any) -> None:
        """Call the application on the way out. If it raises, that becomes the
        migration's error: the state must still reach failed or cancelled, or
        the source could never migrate again."""
        try:
            callback(*args)
        except Exception as exc:
            self.state.fail(f"internal error: {type(exc).__name__}: {exc}")
