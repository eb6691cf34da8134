"""The migration destination: gathers the channels, loads the stream, resumes.

`incoming(uri)` listens and returns; a migration thread waits for the main
channel and all N multifd channels, then decodes the main stream, syncing
with the channel threads at every EOS, and hands the application's state to
`on_resume` only once every page has landed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from uuid import UUID

import numpy as np

from ..channels import (
    HANDSHAKE_TIMEOUT,
    ChannelError,
    ChannelTimeoutError,
    Connections,
    Listener,
    check_multifd,
    parse_uri,
)
from ..memory import RAMBlock, is_zero_rows, page_hashes, verify_keys
from ..wire import (
    PROFILES,
    TARGET_PAGE_SIZE,
    Command,
    CompressedPage,
    Compression,
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    MainStreamDecoder,
    MemSize,
    MultifdFlush,
    PacketLayout,
    Page,
    RamBlockEntry,
    SectionPart,
    SectionStart,
    VMCommand,
    VMDescription,
    Where,
    WireError,
    XbzrlePage,
    ZeroPage,
    ZeroPageRun,
    page_record_size,
)
from ..wire.appstate import APP_STATE_IDSTR, AppState, read_app_state
from ..wire.verify import VERIFY_IDSTR, VerifySection, read_verify
from ..wire.xbzrle import apply_xbzrle
from .endpoint import Endpoint, Event
from .multifd_recv import MultifdReceiver
from .params import DESTINATION_SETUP_PARAMETERS, MigrationSettings
from .qemufile import QEMUFileReader
from .received import ReceivedPages
from .return_path import SHUT_FAILED, SHUT_OK, ReturnPathWriter
from .state import MigrationState, MigrationStatus
from .stats import MigrationAborted, RamStats
from .tls_settings import tls_config

log = logging.getLogger(__name__)

# Makes the destination's blocks from the source's block list, when the
# destination cannot know them in advance (saving a QEMU VM to files).
BlockProvider = Callable[[Sequence[RamBlockEntry]], Sequence[RAMBlock]]


class MigrationDestination(Endpoint):
    """Receives a migration into `blocks` (same names and sizes as the source's).

    `blocks` may instead be a function that makes them from the source's
    block list. `on_resume(state)` is called with the application's state (bytes, or None
    when the source sent none) once all memory has landed. `machine_type`, when
    given, must equal the source's. `device_state` collects the opaque device
    sections of a QEMU source. `on_event(name, data)` receives QMP-style events:
    MIGRATION when the `events` capability is on, and always RESUME when the
    workload resumes here (as QEMU's run state events, which no capability gates).
    """

    setup_parameters = DESTINATION_SETUP_PARAMETERS

    def __init__(
        self,
        blocks: Sequence[RAMBlock] | BlockProvider,
        *,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
        on_resume: Callable[[bytes | None], None] | None = None,
        on_event: Event | None = None,
        machine_type: str | None = None,
        uuid: bytes = bytes(16),
    ) -> None:
        self._provider: BlockProvider | None = None
        if callable(blocks):
            self._provider = blocks
            blocks = []
        self.blocks = {b.name: b for b in blocks}
        if len(self.blocks) != len(blocks):
            raise ValueError(f"RAM block names must be unique: {[b.name for b in blocks]}")
        self.settings = MigrationSettings(capabilities, parameters)
        self.machine_type = machine_type
        self.uuid = bytes(uuid)
        self._on_resume = on_resume
        self.on_event = on_event  # may be set later, e.g. by a QMP server
        self.state = MigrationState(self._status_changed)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._listener: Listener | None = None
        self._connections: Connections | None = None
        self._receiver: MultifdReceiver | None = None
        self._return_path: ReturnPathWriter | None = None
        self.uri: str | None = None
        self._socket_addresses: list[dict[str, Any]] = []
        # Pages this migration wrote, per untouched block: made when it loads.
        self._received = ReceivedPages({})
        self._reset()

    # -- control --------------------------------------------------------------

    def incoming(self, uri: str) -> str:
        """Listen on `uri` and return the address actually bound (port 0 picks
        one). The migration then runs in its own thread."""
        self._refuse_while_running()
        if self._thread is not None:
            self._thread.join()
        target = parse_uri(uri)
        settings = self.settings.copy()
        channels = settings.parameter("multifd-channels") if settings.capability("multifd") else 0
        if channels:
            check_multifd(target)
        # A connection's first bytes are I/O like any other: a peer that sends
        # nothing is refused within x-io-timeout, if that is shorter (0, "no
        # timeout", still bounds a handshake: a silent peer must not hold a thread).
        io_timeout = settings.parameter("x-io-timeout")
        listener = Listener(
            target,
            channels=channels,
            uuid=self.uuid,
            tls=tls_config(settings),
            handshake_timeout=min(io_timeout or HANDSHAKE_TIMEOUT, HANDSHAKE_TIMEOUT),
        )
        self._reset()
        self._cancel.clear()
        with self._lock:
            self._listener = listener
        self.uri = str(listener.uri)
        self._socket_addresses = listener.socket_addresses
        self.state.set(MigrationStatus.SETUP)
        self._thread = threading.Thread(
            target=self._run, args=(settings, listener), name="migration-incoming", daemon=True
        )
        self._thread.start()
        return self.uri

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.query()

    def cancel(self) -> None:
        """Stop receiving: state `cancelled`, listener and channels closed, every
        thread joined when this returns. The blocks are left as they are."""
        with self._lock:
            if not self.state.status.live:
                return
            self._cancel.set()
            self.state.set(MigrationStatus.CANCELLING)
            if self._return_path is not None:
                # Only if that takes no waiting: a source that does not read its
                # return path must not hold up a cancel (nor could it hear it).
                self._return_path.shut_now(SHUT_FAILED, "cancelled at the destination")
            self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _wake(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._receiver is not None:
            self._receiver.abort()
        if self._connections is not None:
            self._connections.shutdown()

    # -- query ----------------------------------------------------------------

    def query(self) -> dict[str, Any]:
        """A `query-migrate` answer as QEMU's incoming side gives it
        (fill_destination_migration_info): `socket-address` while listening, no
        status until the source's channels are all here (QEMU's incoming state
        stays none until then; our `setup` is that wait), then only the status.
        One addition: `error-desc` once failed, as later QEMU versions give it
        (7.2's destination process exits instead). What we received, and the downtime
        as seen here, come as our `x-` members, from active on."""
        status = self.state.status
        info: dict[str, Any] = {}
        if self._socket_addresses:
            info["socket-address"] = [dict(a) for a in self._socket_addresses]
        if status in (MigrationStatus.NONE, MigrationStatus.SETUP):
            return info
        info["status"] = status.value
        if status is MigrationStatus.FAILED and self.state.error:
            info["error-desc"] = self.state.error
        end = self._end_time or time.monotonic()
        total_ms = int((end - self._start_time) * 1000)
        info["x-total-time"] = total_ms
        if self._downtime is not None:
            # From the source's stop to our resume, both clocks on this host.
            info["x-downtime"] = int(self._downtime * 1000)
        stats = self._receiver.stats if self._receiver is not None else self._last_channel_stats
        multifd_bytes = sum(c.counted_bytes for c in stats)
        ram = self.ram.to_json(multifd_bytes)
        # The source splits its RAM records by its run state, which is not
        # seen here: only their sum, as the source's `transferred`.
        ram["transferred"] = self._ram_main_bytes + multifd_bytes
        repeated = self._receiver.repeated if self._receiver is not None else self._repeated
        ram["normal"] += sum(c.pages for c in stats) - repeated
        ram["normal-bytes"] = ram["normal"] * TARGET_PAGE_SIZE
        # What arrived over the time here, so that an incoming daemon's
        # summary shows a throughput; the other rates and the sync count are
        # the source's to know, and stay 0.
        if total_ms > 0:
            ram["mbps"] = round(ram["transferred"] * 8 / total_ms / 1000, 3)
        info["x-ram"] = ram
        # In the words of QEMU's source (xbzrle-cache, compression), when there were any.
        if self._xbzrle_pages:
            info["x-xbzrle"] = {"pages": self._xbzrle_pages, "encoded-bytes": self._xbzrle_bytes}
        if self._compressed_pages:
            info["x-compression"] = {
                "pages": self._compressed_pages,
                "compressed-size": self._compressed_bytes,
            }
        info["x-rounds"] = self._rounds
        info["x-multifd-channels"] = [c.to_json() for c in stats]
        if self.machine_type_received is not None:
            info["x-machine-type"] = self.machine_type_received
        if self._verify_stats is not None:
            info["x-verify"] = dict(self._verify_stats)
        return info

    # -- the migration thread -------------------------------------------------

    def _reset(self) -> None:
        self.ram = RamStats(total=sum(b.used_length for b in self.blocks.values()))
        self._start_time = time.monotonic()
        self._end_time: float | None = None
        self._downtime: float | None = None
        self._rounds = 0
        self._last_channel_stats: list = []
        self.machine_type_received: str | None = None
        self.configuration: Configuration | None = None
        self.device_state: list[DeviceState] = []
        self.app_state: AppState | None = None
        self.vmdesc: bytes | None = None
        self.ram_section_id: int | None = None
        self._repeated = 0
        # What the source counts as RAM transferred on the main channel.
        self._ram_main_bytes = 0
        self._verify_stats: dict[str, int] | None = None
        # Pages a QEMU source sent as XBZRLE deltas or compressed (capabilities
        # xbzrle, compress): its query-migrate counts them apart from `normal`.
        self._xbzrle_pages = self._xbzrle_bytes = 0
        self._compressed_pages = self._compressed_bytes = 0

    def _fail(self, message: str) -> None:
        # After cancel, broken sockets are its consequence, not an error.
        if self._cancel.is_set():
            return
        if self.state.fail(message):
            with self._lock:
                return_path = self._return_path
            # Before waking: the sockets cannot carry the SHUT once shut down.
            # Not under the lock: the SHUT may wait for a PONG being written to a
            # source that reads slowly, and cancel() must not wait for that.
            if return_path is not None:
                return_path.shut(SHUT_FAILED, message)
            with self._lock:
                self._wake()

    def _run(self, settings: MigrationSettings, listener: Listener) -> None:
        try:
            connections = self._wait_for_channels(settings, listener)
            # The listener stays open until the end: a source with more channels
            # than ours may still connect one, and must then fail (see _sync).
            with self._lock:
                self._connections = connections
            if self._cancel.is_set():
                raise MigrationAborted
            # x-total-time counts the migration, not the wait for a source.
            self._start_time = time.monotonic()
            self.state.set(MigrationStatus.ACTIVE)
            self._load(settings, connections)
            self._end_time = time.monotonic()
            self.state.set(MigrationStatus.COMPLETED)
            # As QEMU: the source hears of success once the workload runs here.
            if self._return_path is not None:
                self._return_path.shut(SHUT_OK)
        except MigrationAborted:
            pass
        except (ChannelError, WireError, OSError, ValueError) as exc:
            # A broken stream is often the consequence of a source set up
            # differently (it gave up on its refused channel): name the cause.
            mismatches = listener.mismatches
            if mismatches and "set up differently" not in str(exc):
                self._fail(f"the source is set up differently: {mismatches[0]} (then: {exc})")
            else:
                self._fail(str(exc))
        except Exception as exc:
            self._fail(f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._cleanup(listener)

    def _wait_for_channels(self, settings: MigrationSettings, listener: Listener) -> Connections:
        """All channels, however long until a source comes; but once one has
        begun, a channel it never opens is a stalled peer, bounded by x-io-timeout,
        and a refused channel of a source set up differently ends the wait at once
        (that source has given up, as QEMU does on its refused channel)."""
        io_timeout = settings.parameter("x-io-timeout") or None
        while True:
            # Checked before waiting: a source that began gets a whole timeout.
            begun = listener.has_any_channel()
            try:
                return listener.wait(io_timeout, until_mismatch=True)
            except ChannelTimeoutError:
                if begun:
                    raise

    def _load(self, settings: MigrationSettings, connections: Connections) -> None:
        profile = PROFILES[settings.parameter("x-stream-profile")]
        io_timeout = settings.parameter("x-io-timeout") or None
        connections.main.timeout = io_timeout
        # A multifd channel owes nothing between syncs: x-io-timeout bounds the
        # wait for its SYNC instead (see multifd_recv.py).
        for channel in connections.multifd:
            channel.timeout = None
        if connections.multifd:
            receiver = MultifdReceiver(
                connections.multifd,
                compression=Compression(settings.parameter("multifd-compression")),
                layout=PacketLayout.V9_0 if profile.zero_pages_in_packets else PacketLayout.V7_2,
                on_error=self._fail,
                io_timeout=io_timeout,
            )
            with self._lock:
                self._receiver = receiver
            receiver.start()
        main = QEMUFileReader(connections.main)
        decoder = MainStreamDecoder(
            main,
            profile=profile,
            known_devices={APP_STATE_IDSTR: read_app_state, VERIFY_IDSTR: read_verify},
        )
        # Asked before anything here takes a view of the blocks (see received.py).
        self._received = ReceivedPages(self.blocks)
        arrays = {name: block.array for name, block in self.blocks.items()}
        round_mode: bool | None = None
        verify: VerifySection | None = None
        iterating = False  # in a ram section's PART, whose EOS counts as RAM sent
        for record in decoder:
            if self._cancel.is_set() or self.state.error is not None:
                raise MigrationAborted
            if isinstance(record, ZeroPage | ZeroPageRun | Page | CompressedPage | XbzrlePage):
                self._ram_main_bytes += page_record_size(record)
            if isinstance(record, ZeroPage):
                self._zero_page(arrays[record.block], record.block, record.offset, record.fill)
            elif isinstance(record, ZeroPageRun):
                self._zero_run(arrays[record.block], record.block, record.offsets)
            elif isinstance(record, Page):
                self._page(arrays[record.block], record.block, record.offset, record.data)
                self.ram.normal += 1
            elif isinstance(record, CompressedPage):
                # The record's data ends where the reader is now.
                at = decoder.reader.where
                data = record.decompress(at.at(at.offset - len(record.compressed)))
                self._page(arrays[record.block], record.block, record.offset, data)
                # As QEMU's source counts them: apart from `normal`.
                self._compressed_pages += 1
                self._compressed_bytes += len(record.compressed)
            elif isinstance(record, XbzrlePage):
                view = memoryview(arrays[record.block])[
                    record.offset : record.offset + TARGET_PAGE_SIZE
                ]
                at = decoder.reader.where
                apply_xbzrle(
                    record.encoded,
                    view,
                    at.at(at.offset - len(record.encoded)),
                    f'XBZRLE delta of page {record.offset:#x} in block "{record.block}"',
                )
                self._received.wrote_page(record.block, record.offset)
                self._xbzrle_pages += 1
                self._xbzrle_bytes += len(record.encoded)
            elif isinstance(record, EndOfSection):
                if iterating:
                    self._ram_main_bytes += len(record.pack())
                if round_mode is None:
                    round_mode = False
                if not round_mode:
                    self._sync(f"round {self._rounds}")
                self._rounds += 1
            elif isinstance(record, MultifdFlush):
                round_mode = True
                self._sync(f"the flush in round {self._rounds}")
            elif isinstance(record, MemSize):
                self._check_blocks(record)
                arrays = {name: block.array for name, block in self.blocks.items()}
            elif isinstance(record, SectionStart) and not record.full:
                self.ram_section_id = record.section_id
                iterating = False
            elif isinstance(record, SectionPart):
                iterating = not record.end
            elif isinstance(record, Configuration):
                self._check_configuration(record, settings)
            elif isinstance(record, DeviceState):
                header = record.header
                where = Where(section=f'section "{header.idstr}" (id {header.section_id})')
                if header.idstr == APP_STATE_IDSTR:
                    self.app_state = AppState.from_body(record.data, where)
                elif header.idstr == VERIFY_IDSTR:
                    verify = VerifySection.from_body(record.data, where)
                else:
                    self.device_state.append(record)
            elif isinstance(record, VMDescription):
                self.vmdesc = record.json
            elif isinstance(record, VMCommand):
                self._command(record, connections, decoder.reader.where)
            elif isinstance(record, EndOfFile):
                pass
        if decoder.state.name != "DONE":
            raise WireError("main stream ended before QEMU_VM_EOF", where=decoder.reader.where)
        self._check_channels()
        # Every page has landed (the last sync let every channel past its SYNC)
        # unless a channel still held some: stop the threads and check, then resume.
        if self._receiver is not None:
            self._receiver.finish(unmatched_sync=bool(round_mode))
        with self._lock:
            receiver, self._receiver = self._receiver, None
        if receiver is not None:
            self._last_channel_stats = receiver.stats
            self._repeated = receiver.repeated
            receiver.close()
        if verify is not None:
            self._verify(verify)
        elif settings.capability("x-verify"):
            raise WireError(
                "x-verify is on but the source sent no page hashes (enable x-verify on the source)"
            )
        resumed_ns = time.time_ns()
        if self._on_resume is not None:
            self._on_resume(self.app_state.data if self.app_state else None)
        # As QEMU's vm_start on the incoming side: RESUME, then `completed`.
        self._event("RESUME", None)
        if self.app_state is not None and self.app_state.stop_time_ns:
            self._downtime = max(0, resumed_ns - self.app_state.stop_time_ns) / 1e9

    def _command(self, record: VMCommand, connections: Connections, where: Where) -> None:
        """The commands of a precopy with `return-path`: open it, answer PINGs.
        Like QEMU, the destination follows the source's lead whatever its own
        capabilities say."""
        if record.command is Command.OPEN_RETURN_PATH:
            if self._return_path is not None:
                return  # QEMU reports it and carries on: nothing is lost.
            if not connections.main.duplex:
                raise WireError(
                    "OPEN_RETURN_PATH failed: the main channel is a pipe or a file, "
                    "it cannot carry answers to the source",
                    where=where,
                )
            with self._lock:
                self._return_path = ReturnPathWriter(connections.main)
        elif record.command is Command.PING:
            if self._return_path is None:
                raise WireError(
                    f"PING ({record.ping_value:#x}) received with no return path", where=where
                )
            self._return_path.pong(record.ping_value)
        elif record.command is Command.POSTCOPY_ADVISE and not record.data:
            # The advice of a source with dirty-bitmaps and no postcopy-ram: as QEMU
            # with postcopy-ram off, nothing to do here. Its "dirty-bitmap" live
            # section follows, which the decoder then refuses by name.
            return
        elif record.command is Command.POSTCOPY_ADVISE:
            if len(record.data) != 16:
                raise WireError(
                    f"CMD_POSTCOPY_ADVISE invalid length ({len(record.data)})", where=where
                )
            raise WireError(
                "RAM postcopy is disabled but have 16 byte advise: the source has "
                "postcopy-ram on, which this destination does not carry out (turn "
                "postcopy-ram off at the source)",
                where=where,
            )
        else:
            raise WireError(
                f"command {record.command.name} is not supported (postcopy and COLO "
                "are not implemented)",
                where=where,
            )

    def _verify(self, verify: VerifySection) -> None:
        """Compare every page with the source's hashes, before resuming: the last
        EOS synced every channel, so all memory has landed and stays still."""
        keys = verify_keys(verify.seed)
        sent = {b.name: b.hashes for b in verify.blocks}
        missing = sorted(set(self.blocks) - set(sent))
        if missing:
            raise WireError(f"x-verify: the source sent no page hashes for block(s) {missing}")
        self._verify_stats = {"pages": 0, "mismatches": 0}
        failures = []
        for name, expected in sent.items():
            block = self.blocks.get(name)
            if block is None or block.pages != len(expected):
                have = "no such block" if block is None else f"{block.pages} pages"
                raise WireError(
                    f'x-verify: hashes for block "{name}" cover {len(expected)} pages ({have})'
                )
            differ = np.flatnonzero(page_hashes(block, keys) != expected)
            self._verify_stats["pages"] += len(expected)
            self._verify_stats["mismatches"] += len(differ)
            if len(differ):
                offsets = ", ".join(f"{page * TARGET_PAGE_SIZE:#x}" for page in differ[:8].tolist())
                failures.append(
                    f'block "{name}": {len(differ)} page(s) differ, first at offsets {offsets}'
                )
        if failures:
            raise WireError("x-verify: memory differs from the source's: " + "; ".join(failures))

    def _page(self, array: np.ndarray, name: str, offset: int, data: bytes) -> None:
        array[offset : offset + TARGET_PAGE_SIZE] = np.frombuffer(data, dtype=np.uint8)
        self._received.wrote_page(name, offset)

    def _zero_page(self, array: np.ndarray, name: str, offset: int, fill: int) -> None:
        page = array[offset : offset + TARGET_PAGE_SIZE]
        if fill:  # QEMU 7.2 still sends a fill byte; a page of it is written
            page[:] = fill
            self._received.wrote_page(name, offset)
        elif self._received.page_may_be_written(name, offset) and page.any():
            # As QEMU: a page already zero is left alone, so fresh memory and
            # sparse files are not touched (reading a hole allocates nothing).
            page[:] = 0
        self.ram.duplicate += 1

    def _zero_run(self, array: np.ndarray, name: str, offsets: np.ndarray) -> None:
        """Many zero pages at once: those this migration has not written in an
        untouched block are zero already (see received.py); of the rest, those
        already zero stay untouched, as for one page."""
        rows = array.reshape(-1, TARGET_PAGE_SIZE)  # a RAMBlock is whole pages
        pages = (offsets // np.uint64(TARGET_PAGE_SIZE)).astype(np.intp)
        check = self._received.may_be_written(name, pages)
        if len(check):
            written = check[~is_zero_rows(rows.view(np.uint64), check)]
            if len(written):
                rows[written] = 0
        self.ram.duplicate += len(pages)

    def _sync(self, label: str) -> None:
        if self._receiver is not None:
            self._receiver.sync(label)
        self._check_channels()

    def _check_channels(self) -> None:
        """A refused channel of a source set up differently (more channels, a
        duplicate id, another UUID) carried pages we never read: fail, as QEMU
        does, rather than resume with memory that is silently incomplete."""
        listener = self._listener
        mismatches = listener.mismatches if listener is not None else []
        if mismatches:
            raise WireError(
                f"the source is set up differently: {mismatches[0]}",
                where=Where(channel=None),
            )

    def _check_configuration(self, config: Configuration, settings: MigrationSettings) -> None:
        self.configuration = config
        self.machine_type_received = config.machine_type
        if self.machine_type is not None and config.machine_type != self.machine_type:
            raise WireError(
                f"Machine type received is '{config.machine_type}' and local is "
                f"'{self.machine_type}'"
            )
        # As QEMU: each capability the source lists (7.2: x-ignore-shared) must be
        # on here too. x-ignore-shared leaves shared RAM out of the stream: taken
        # silently, that memory would stay as it was here.
        for name in config.capabilities:
            if name not in settings.capabilities:
                raise WireError(f"Received unknown capability {name}")
            if not settings.capability(name):
                raise WireError(
                    f"Capability {name} is off, but received capability is on: "
                    f"the source has {name} on, which this destination does not "
                    "carry out (turn it off at the source)"
                )
        # As QEMU's destination: the source sends its UUID when its own
        # validate-uuid is on, and it is checked whenever ours is set (not all
        # zeros); an unset one can only warn, as after loading an old snapshot.
        if config.uuid is not None and config.uuid != self.uuid:
            if self.uuid == bytes(16):
                log.warning(
                    "UUID is received %s, but local uuid isn't set", UUID(bytes=config.uuid)
                )
            else:
                raise WireError(
                    f"UUID received is {UUID(bytes=config.uuid)} and local is "
                    f"{UUID(bytes=self.uuid)}. Mismatch in UUIDs"
                )

    def _check_blocks(self, mem_size: MemSize) -> None:
        if self._provider is not None:
            self.blocks = {b.name: b for b in self._provider(mem_size.blocks)}
            self.ram.total = mem_size.total
            self._received = ReceivedPages(self.blocks)
        for entry in mem_size.blocks:
            block = self.blocks.get(entry.name)
            if block is None:
                raise WireError(f'Unknown ramblock "{entry.name}", cannot accept migration')
            if block.used_length != entry.used_length:
                raise WireError(
                    f"Length mismatch: {entry.name}: {entry.used_length:#x} in != "
                    f"{block.used_length:#x}"
                )
        if self._receiver is not None:
            self._receiver.set_blocks(
                {e.name: self.blocks[e.name].array for e in mem_size.blocks}, self._received
            )

    def _cleanup(self, listener: Listener) -> None:
        listener.close()
        with self._lock:
            receiver, connections = self._receiver, self._connections
            self._receiver = None
            self._connections = None
            self._listener = None
            self._return_path = None
        self._socket_addresses = []
        # Failed or cancelled: reset the connections, so that a source blocked
        # writing into a full window fails at once rather than at its timeout.
        reset = self.state.status is not MigrationStatus.COMPLETED
        if receiver is not None:
            self._last_channel_stats = receiver.stats
            receiver.close(reset=reset)
        if connections is not None:
            connections.shutdown()
            connections.close(reset=reset)
        self._end_time = self._end_time or time.monotonic()
        if self.state.status is MigrationStatus.COMPLETED:
            return
        if self._cancel.is_set() and self.state.error is None:
            self.state.set(MigrationStatus.CANCELLED)
        else:
            if self.state.error is None:
                self.state.fail("migration stopped without an error message")
            self.state.set(MigrationStatus.FAILED)
