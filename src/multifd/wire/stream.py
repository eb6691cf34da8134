"""Records of the main channel's savevm stream outside the ``ram`` section (spec 1).

File header, configuration, section headers and footers, commands, EOF and the
vmdesc JSON. Each record packs to the exact bytes it was decoded from.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .errors import WireError
from .reader import Reader, be16, be32, counted_string

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3
QEMU_VM_FILE_VERSION_COMPAT = 2
MAX_MACHINE_TYPE = 256
# vmdesc JSON and opaque device state: refuse more than this before allocating it.
MAX_VMDESC = 64 << 20
MAX_DEVICE_STATE = 256 << 20
# MAX_VM_CMD_PACKAGED_SIZE in QEMU.
MAX_PACKAGED = 1 << 24


class RecordType(IntEnum):
    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class Command(IntEnum):
    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11  # QEMU 10.0+


# mig_cmd_args[].len: -1 means variable.
COMMAND_LENGTHS: dict[Command, int] = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.POSTCOPY_ADVISE: -1,
    Command.POSTCOPY_LISTEN: 0,
    Command.POSTCOPY_RUN: 0,
    Command.POSTCOPY_RAM_DISCARD: -1,
    Command.PACKAGED: 4,
    Command.ENABLE_COLO: 0,
    Command.POSTCOPY_RESUME: 0,
    Command.RECV_BITMAP: -1,
    Command.SWITCHOVER_START: 0,
}


@dataclass(frozen=True)
class FileHeader:
    """Magic "QEVM" and stream version 3."""

    version: int = QEMU_VM_FILE_VERSION

    def pack(self) -> bytes:
        return be32(QEMU_VM_FILE_MAGIC) + be32(self.version)


def read_file_header(reader: Reader) -> FileHeader:
    start = reader.where
    magic = reader.be32("file magic")
    if magic != QEMU_VM_FILE_MAGIC:
        raise WireError.bad_field("file magic", magic, '0x5145564d ("QEVM")', start)
    version = reader.be32("stream version")
    if version == QEMU_VM_FILE_VERSION_COMPAT:
        raise WireError(
            "SaveVM v2 format is obsolete and don't work anymore",
            where=start.at(4),
            field="stream version",
            value=version,
            expected="3",
        )
    if version != QEMU_VM_FILE_VERSION:
        raise WireError(
            f"Unsupported migration stream version {version}",
            where=start.at(4),
            field="stream version",
            value=version,
            expected="3",
        )
    return FileHeader(version)


@dataclass(frozen=True)
class Subsection:
    """A vmstate subsection of the configuration: name, version, raw fields."""

    name: str
    version_id: int
    data: bytes

    def pack(self) -> bytes:
        return (
            bytes([RecordType.SUBSECTION])
            + counted_string(self.name)
            + be32(self.version_id)
            + self.data
        )


CONFIG_CAPABILITIES = "configuration/capabilities"
CONFIG_UUID = "configuration/uuid"
CONFIG_PAGE_BITS = "configuration/target-page-bits"
MAX_CONFIG_CAPABILITIES = 64


@dataclass(frozen=True)
class Configuration:
    """The `configuration` vmstate (no section header, no footer)."""

    machine_type: str
    subsections: tuple[Subsection, ...] = ()

    def pack(self) -> bytes:
        name = self.machine_type.encode()
        return (
            bytes([RecordType.CONFIGURATION])
            + be32(len(name))
            + name
            + b"".join(s.pack() for s in self.subsections)
        )

    @classmethod
    def build(
        cls,
        machine_type: str,
        *,
        capabilities: tuple[str, ...] = (),
        uuid: bytes | None = None,
    ) -> Configuration:
        subs: list[Subsection] = []
        if capabilities:
            body = be32(len(capabilities)) + b"".join(counted_string(c) for c in capabilities)
            subs.append(Subsection(CONFIG_CAPABILITIES, 1, body))
        if uuid is not None:
            subs.append(Subsection(CONFIG_UUID, 1, bytes(uuid)))
        return cls(machine_type, tuple(subs))

    def with_uuid(self, uuid: bytes) -> Configuration:
        """This configuration carrying `uuid` (validate-uuid): any UUID it had is
        replaced; the UUID subsection is the last one, as QEMU writes it."""
        subs = tuple(s for s in self.subsections if s.name != CONFIG_UUID)
        return Configuration(self.machine_type, (*subs, Subsection(CONFIG_UUID, 1, bytes(uuid))))

    def _sub(self, name: str) -> Subsection | None:
        return next((s for s in self.subsections if s.name == name), None)

    @property
    def capabilities(self) -> tuple[str, ...]:
        sub = self._sub(CONFIG_CAPABILITIES)
        if sub is None:
            return ()
        count = int.from_bytes(sub.data[:4], "big")
        names, pos = [], 4
        for _ in range(count):
            length = sub.data[pos]
            names.append(sub.data[pos + 1 : pos + 1 + length].decode())
            pos += 1 + length
        return tuple(names)

    @property
    def uuid(self) -> bytes | None:
        sub = self._sub(CONFIG_UUID)
        return None if sub is None else sub.data

    @property
    def target_page_bits(self) -> int | None:
        sub = self._sub(CONFIG_PAGE_BITS)
        return None if sub is None else int.from_bytes(sub.data, "big")


def read_configuration(reader: Reader) -> tuple[Configuration, int | None]:
    """Read the body after the 0x07 byte. Returns the record and the type byte of
    the record that follows it (read while looking for subsections), or None at
    the end of the stream."""
    at = reader.where
    length = reader.be32("machine type length")
    if not 0 < length <= MAX_MACHINE_TYPE:
        raise WireError.bad_field("machine type length", length, f"1 to {MAX_MACHINE_TYPE}", at)
    raw = reader.take(length, "machine type")
    try:
        machine_type = raw.decode("ascii")
    except UnicodeDecodeError:
        raise WireError.bad_field("machine type", raw, "ASCII text", at.at(at.offset + 4)) from None
    subsections: list[Subsection] = []
    while True:
        try:
            next_type = reader.u8("record type")
        except WireError:
            return Configuration(machine_type, tuple(subsections)), None
        if next_type != RecordType.SUBSECTION:
            return Configuration(machine_type, tuple(subsections)), next_type
        subsections.append(_read_config_subsection(reader))


def _read_config_subsection(reader: Reader) -> Subsection:
    at = reader.where
    name = reader.counted_string("subsection name")
    version_id = reader.be32(f"version of {name}")
    if version_id != 1:
        raise WireError.bad_field(f"version of subsection {name!r}", version_id, "1", at)
    if name == CONFIG_UUID:
        return Subsection(name, version_id, reader.take(16, "configuration uuid"))
    if name == CONFIG_PAGE_BITS:
        return Subsection(name, version_id, reader.take(4, "target page bits"))
    if name == CONFIG_CAPABILITIES:
        count_raw = reader.take(4, "capability count")
        count = int.from_bytes(count_raw, "big")
        if count > MAX_CONFIG_CAPABILITIES:
            raise WireError.bad_field(
                "capability count", count, f"at most {MAX_CONFIG_CAPABILITIES}", at
            )
        body = [count_raw]
        for _ in range(count):
            cap = reader.counted_string("capability name")
            body.append(counted_string(cap))
        return Subsection(name, version_id, b"".join(body))
    raise WireError(
        f"unknown subsection {name!r} of the configuration section",
        where=at,
        field="subsection name",
        value=name,
        expected=f"one of {CONFIG_CAPABILITIES}, {CONFIG_UUID}, {CONFIG_PAGE_BITS}",
    )


@dataclass(frozen=True)
class SectionStart:
    """QEMU_VM_SECTION_START (0x01) or FULL (0x04): a section header with an idstr."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    full: bool = False

    def pack(self) -> bytes:
        kind = RecordType.SECTION_FULL if self.full else RecordType.SECTION_START
        return (
            bytes([kind])
            + be32(self.section_id)
            + counted_string(self.idstr)
            + be32(self.instance_id)
            + be32(self.version_id)
        )


@dataclass(frozen=True)
class SectionPart:
    """QEMU_VM_SECTION_PART (0x02) or END (0x03): continues a started section."""

    section_id: int
    end: bool = False

    def pack(self) -> bytes:
        kind = RecordType.SECTION_END if self.end else RecordType.SECTION_PART
        return bytes([kind]) + be32(self.section_id)


@dataclass(frozen=True)
class SectionFooter:
    """QEMU_VM_SECTION_FOOTER (0x7e): closes every START/PART/END/FULL section."""

    section_id: int

    def pack(self) -> bytes:
        return bytes([RecordType.SECTION_FOOTER]) + be32(self.section_id)


@dataclass(frozen=True)
class DeviceState:
    """A FULL section's body: a device's vmstate, carried as opaque bytes."""

    header: SectionStart
    data: bytes

    def pack(self) -> bytes:
        return self.header.pack() + self.data


@dataclass(frozen=True)
class VMCommand:
    """QEMU_VM_COMMAND: be16 command, be16 length, data (PACKAGED adds its package)."""

    command: Command
    data: bytes = b""
    package: bytes = b""

    def pack(self) -> bytes:
        return (
            bytes([RecordType.COMMAND])
            + be16(self.command)
            + be16(len(self.data))
            + self.data
            + self.package
        )

    @classmethod
    def open_return_path(cls) -> VMCommand:
        """Asks the destination to answer on the main channel's reverse direction."""
        return cls(Command.OPEN_RETURN_PATH)

    @classmethod
    def ping(cls, value: int) -> VMCommand:
        """Asks for a PONG carrying `value` on the return path."""
        return cls(Command.PING, be32(value))

    @property
    def ping_value(self) -> int:
        """The be32 value of a PING."""
        return int.from_bytes(self.data, "big")


def read_command(reader: Reader) -> VMCommand:
    at = reader.where
    raw_cmd = reader.be16("command")
    length = reader.be16("command length")
    try:
        command = Command(raw_cmd)
    except ValueError:
        command = Command.INVALID
    if command is Command.INVALID:
        raise WireError(
            f"MIG_CMD {raw_cmd:#x} unknown (len {length:#x})",
            where=at,
            field="command",
            value=raw_cmd,
            expected="1 to 11",
        )
    expected = COMMAND_LENGTHS[command]
    if expected != -1 and length != expected:
        raise WireError(
            f"{command.name} received bad command length {length} (expected {expected})",
            where=at.at(at.offset + 2),
            field="command length",
            value=length,
            expected=str(expected),
        )
    data = reader.take(length, f"{command.name} data")
    package = b""
    if command is Command.PACKAGED:
        size = int.from_bytes(data, "big")
        if size > MAX_PACKAGED:
            raise WireError.bad_field(
                "PACKAGED length", size, f"at most {MAX_PACKAGED}", at.at(at.offset + 4)
            )
        package = reader.take(size, "packaged stream")
    return VMCommand(command, data, package)


@dataclass(frozen=True)
class EndOfFile:
    """QEMU_VM_EOF: the end of device state."""

    def pack(self) -> bytes:
        return bytes([RecordType.EOF])


@dataclass(frozen=True)
class VMDescription:
    """QEMU_VM_VMDESCRIPTION: the JSON description sent after EOF."""

    json: bytes

    def pack(self) -> bytes:
        return bytes([RecordType.VMDESCRIPTION]) + be32(len(self.json)) + self.json


def read_vmdescription(reader: Reader) -> VMDescription:
    at = reader.where
    length = reader.be32("vmdesc length")
    if length > MAX_VMDESC:
        raise WireError.bad_field("vmdesc length", length, f"at most {MAX_VMDESC} bytes", at)
    return VMDescription(reader.take(length, "vmdesc JSON"))
