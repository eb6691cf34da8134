"""A pull decoder for the main channel: records out, one at a time.

It works over any `ByteSource`. The grammar is an explicit state table (like
h11): which record may come next depends only on `self.state`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from enum import Enum, auto

from .devices import ends_with_vmdesc, split_device_state
from .errors import Where, WireError
from .profile import WireProfile
from .ram import RAM_SECTION_IDSTR, RAM_SECTION_VERSION, EndOfSection, RamRecord, RamStreamState
from .reader import Reader
from .source import ByteSource
from .stream import (
    MAX_DEVICE_STATE,
    Configuration,
    DeviceState,
    EndOfFile,
    FileHeader,
    RecordType,
    SectionFooter,
    SectionPart,
    SectionStart,
    VMCommand,
    VMDescription,
    read_command,
    read_configuration,
    read_file_header,
    read_vmdescription,
)

MainRecord = (
    FileHeader
    | Configuration
    | SectionStart
    | SectionPart
    | SectionFooter
    | DeviceState
    | VMCommand
    | EndOfFile
    | VMDescription
    | RamRecord
)

# Live sections other than "ram" that a QEMU source sends, by the capability
# that makes it send them.
LIVE_SECTION_CAPABILITIES = {"dirty-bitmap": "dirty-bitmaps", "block": "block"}

# Reads a known device section's body (after its header, up to its footer).
DeviceReader = Callable[[Reader], bytes]


class State(Enum):
    HEADER = auto()  # nothing read yet
    CONFIGURATION = auto()  # after the file header
    RECORDS = auto()  # between sections
    RAM = auto()  # inside a ram section, before its EOS
    FOOTER = auto()  # a section's data is over; its footer comes next
    DEVICE_TAIL = auto()  # replaying device state split from the tail
    AFTER_EOF = auto()  # QEMU_VM_EOF read; a vmdesc may follow
    DONE = auto()


class MainStreamDecoder:
    """Decodes a QEMU savevm stream as sent on the main migration channel.

    `profile` restricts the format to one QEMU generation (a 7.2 profile refuses
    MULTIFD_FLUSH, as a 7.2 destination does); None accepts every known one.
    `known_devices` maps device idstrs whose body layout the caller knows to a
    reader for it; any other FULL section switches to reading the rest of the
    stream and splitting it with the vmdesc tail.
    """

    def __init__(
        self,
        source: ByteSource,
        *,
        profile: WireProfile | None = None,
        require_configuration: bool = True,
        page_size_blocks: frozenset[str] = frozenset(),
        known_devices: Mapping[str, DeviceReader] | None = None,
        max_device_state: int = MAX_DEVICE_STATE,
    ) -> None:
        self.reader = Reader(source, Where())
        self.ram = RamStreamState(profile=profile, page_size_blocks=page_size_blocks)
        self.state = State.HEADER
        self.configuration: Configuration | None = None
        self._require_configuration = require_configuration
        self._known_devices = dict(known_devices or {})
        self._max_device_state = max_device_state
        self._pending_type: int | None = None
        self._started: dict[int, str] = {}  # section_id -> idstr of START sections
        self._section: tuple[int, str] | None = None  # the section whose footer is due
        self._tail: deque[MainRecord] = deque()
        self._handlers: dict[State, Callable[[], MainRecord | None]] = {
            State.HEADER: self._file_header,
            State.CONFIGURATION: self._configuration,
            State.RECORDS: self._record,
            State.RAM: self._ram_record,
            State.FOOTER: self._footer,
            State.DEVICE_TAIL: self._device_tail,
            State.AFTER_EOF: self._after_eof,
            State.DONE: lambda: None,
        }

    def __iter__(self) -> Iterator[MainRecord]:
        while (record := self.next_record()) is not None:
            yield record

    def next_record(self) -> MainRecord | None:
        """The next record, or None once the stream has ended properly."""
        return self._handlers[self.state]()

    # -- states -------------------------------------------------------------

    def _file_header(self) -> FileHeader:
        header = read_file_header(self.reader)
        self.state = State.CONFIGURATION
        return header

    def _configuration(self) -> MainRecord | None:
        at = self.reader.where
        kind = self._type_byte("configuration section or first record")
        if kind == RecordType.CONFIGURATION:
            config, self._pending_type = read_configuration(self.reader)
            self.configuration = config
            self.ram.ignore_shared = "x-ignore-shared" in config.capabilities
            self.state = State.RECORDS
            return config
        if self._require_configuration:
            raise WireError.bad_field(
                "record type", kind, "0x07 (Configuration section missing)", at
            )
        self._pending_type = kind
        self.state = State.RECORDS
        return self._record()

    def _record(self) -> MainRecord:
        at = self.reader.where
        if self._pending_type is not None:
            kind, self._pending_type = self._pending_type, None
            at = at.at(at.offset - 1)
        else:
            kind = self._type_byte("record type")
        if kind in (RecordType.SECTION_START, RecordType.SECTION_FULL):
            return self._section_start(kind == RecordType.SECTION_FULL, at)
        if kind in (RecordType.SECTION_PART, RecordType.SECTION_END):
            section_id = self.reader.be32("section id")
            idstr = self._started.get(section_id)
            if idstr is None:
                raise WireError.bad_field(
                    "section id", section_id, "a section opened by SECTION_START", at
                )
            self._enter(section_id, idstr)
            self.state = State.RAM
            return SectionPart(section_id, end=kind == RecordType.SECTION_END)
        if kind == RecordType.COMMAND:
            return read_command(self.reader)
        if kind == RecordType.EOF:
            self.state = State.AFTER_EOF
            return EndOfFile()
        raise WireError(
            f"Unknown savevm section type {kind}",
            where=at,
            field="record type",
            value=kind,
            expected="EOF, SECTION_START/PART/END/FULL or COMMAND",
        )

    def _section_start(self, full: bool, at: Where) -> MainRecord:
        section_id = self.reader.be32("section id")
        idstr = self.reader.counted_string("idstr")
        instance_id = self.reader.be32("instance id")
        version_id = self.reader.be32("version id")
        header = SectionStart(section_id, idstr, instance_id, version_id, full=full)
        if not full:
            if idstr != RAM_SECTION_IDSTR or instance_id != 0:
                capability = LIVE_SECTION_CAPABILITIES.get(idstr)
                hint = f" (turn capability {capability} off at the source)" if capability else ""
                raise WireError(
                    f"Unknown savevm section or instance '{idstr}' {instance_id}: "
                    f'only the live section "ram" 0 is supported{hint}',
                    where=at,
                    field="idstr",
                    value=idstr,
                    expected='"ram"',
                )
            if version_id != RAM_SECTION_VERSION:
                raise WireError(
                    f"savevm: unsupported version {version_id} for 'ram' v{RAM_SECTION_VERSION}",
                    where=at,
                    field="version id",
                    value=version_id,
                    expected=str(RAM_SECTION_VERSION),
                )
            if section_id in self._started:
                raise WireError.bad_field("section id", section_id, "a new section id", at)
            self._started[section_id] = idstr
            self._enter(section_id, idstr)
            self.state = State.RAM
            return header
        if idstr in self._known_devices:
            self._enter(section_id, idstr)
            data = self._known_devices[idstr](self.reader)
            self.state = State.FOOTER
            return DeviceState(header, data)
        # Opaque device state: take the rest of the stream and split it.
        try:
            # With a return path the source keeps its end open until we answer:
            # the stream's end is its vmdesc, not the connection's close.
            rest = self.reader.source.read_to_eof(self._max_device_state, ends_with_vmdesc)
        except ValueError as exc:
            raise WireError(f"device state too large: {exc}", where=at) from None
        self.reader.offset += len(rest)
        self._tail.extend(split_device_state(header.pack() + rest, at))
        self.state = State.DEVICE_TAIL
        return self._device_tail()

    def _ram_record(self) -> RamRecord:
        # A source that shows what it has buffered lets runs of zero pages be
        # decoded at once (see ZeroPageRun); others get one record at a time.
        peek = getattr(self.reader.source, "peek_buffered", None)
        if peek is not None:
            run = self.ram.read_zero_run(self.reader, peek())
            if run is not None:
                return run
        record = self.ram.read_record(self.reader)
        if isinstance(record, EndOfSection):
            self.state = State.FOOTER
        return record

    def _footer(self) -> SectionFooter:
        assert self._section is not None
        section_id, idstr = self._section
        at = self.reader.where
        kind = self._type_byte("section footer")
        if kind != RecordType.SECTION_FOOTER:
            raise WireError(
                f"Missing section footer for {idstr}",
                where=at,
                field="record type",
                value=kind,
                expected="0x7e (SECTION_FOOTER)",
            )
        read_id = self.reader.be32("footer section id")
        if read_id != section_id:
            raise WireError(
                f"Mismatched section id in footer for {idstr} -- read {read_id:#x} "
                f"expected {section_id:#x}",
                where=at,
                field="footer section id",
                value=read_id,
                expected=f"{section_id:#x}",
            )
        self._section = None
        self.reader.set_context(section=None)
        self.state = State.RECORDS
        return SectionFooter(section_id)

    def _device_tail(self) -> MainRecord | None:
        if not self._tail:
            self.state = State.DONE
            return None
        record = self._tail.popleft()
        if isinstance(record, EndOfFile) and not self._tail:
            self.state = State.DONE
        return record

    def _after_eof(self) -> VMDescription | None:
        at = self.reader.where
        try:
            kind = self.reader.source.read_exact(1)[0]
        except EOFError:
            self.state = State.DONE
            return None
        self.reader.offset += 1
        if kind != RecordType.VMDESCRIPTION:
            raise WireError(
                f"Expected vmdescription section, but got {kind}",
                where=at,
                field="record type",
                value=kind,
                expected="0x06 (VMDESCRIPTION) or the end of the stream",
            )
        self.state = State.DONE
        return read_vmdescription(self.reader)

    # -- helpers ------------------------------------------------------------

    def _enter(self, section_id: int, idstr: str) -> None:
        self._section = (section_id, idstr)
        self.reader.set_context(section=f'section "{idstr}" (id {section_id})')

    def _type_byte(self, what: str) -> int:
        at = self.reader.where
        try:
            return self.reader.u8(what)
        except WireError:
            raise WireError(
                f"stream ended before QEMU_VM_EOF (expected {what})", where=at
            ) from None
