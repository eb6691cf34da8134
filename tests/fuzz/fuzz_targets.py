"""One fuzz target per decoder of `multifd.wire`, and the seed inputs for each.

A target takes arbitrary bytes and decodes them as the destination would. A
`WireError` is the decoder refusing bad bytes, as it should; any other
exception (or a decoder that stops making progress) is a bug. The same
functions run under atheris (fuzz_wire.py, by hand) and under pytest
(test_fuzz_targets.py, every run), so the harness cannot rot.

Where a decoder takes options (a profile, a layout, a compression method, a
block list) the first byte of the input chooses them, so one corpus explores
every combination.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np

from multifd.migration.compression import make_compressor, make_decompressor
from multifd.wire import (
    INIT_SIZE,
    PACKET_HEADER_SIZE,
    PROFILES,
    TARGET_PAGE_SIZE,
    BufferSource,
    Command,
    CompressedPage,
    Compression,
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MainStreamDecoder,
    MemSize,
    MultifdFlush,
    MultiFDInit,
    MultiFDPacket,
    PacketLayout,
    Page,
    RamBlockEntry,
    RamStreamState,
    Reader,
    SectionFooter,
    SectionPart,
    SectionStart,
    VMCommand,
    Where,
    WireError,
    XbzrlePage,
    ZeroPage,
    read_init,
    read_packet,
    split_device_state,
)
from multifd.wire.appstate import APP_STATE_IDSTR, AppState, read_app_state, vmdescription
from multifd.wire.devices import expected_devices, find_vmdesc_tail
from multifd.wire.reader import be32
from multifd.wire.stream import VMDescription, read_command, read_configuration
from multifd.wire.verify import VERIFY_IDSTR, BlockHashes, VerifySection, read_verify
from multifd.wire.xbzrle import apply_xbzrle

Target = Callable[[bytes], None]

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "qemu-7.2"
PROFILE_CHOICES = [None, *PROFILES.values()]
# The recording the seeds come from: small, two multifd channels, real pages.
RECORDING = "mf2-nokernel"
KNOWN_DEVICES = {APP_STATE_IDSTR: read_app_state, VERIFY_IDSTR: read_verify}


class NoProgress(AssertionError):
    """A decoder returned more records than there are bytes: it loops in place."""


def _split(data: bytes) -> tuple[int, bytes]:
    """The option byte and the bytes to decode."""
    return (data[0], data[1:]) if data else (0, b"")


class _PeekingSource(BufferSource):
    """A `BufferSource` that shows what it holds, as a channel's buffer does:
    the main decoder then takes runs of zero-page records at once."""

    def peek_buffered(self) -> memoryview:
        return self._data[self._pos :]


# -- main channel -----------------------------------------------------------------


def fuzz_main(data: bytes) -> None:
    """The main channel as the destination reads it: every record, including
    our own device sections parsed the way the destination applies them."""
    options, body = _split(data)
    source_type = _PeekingSource if options & 0x40 else BufferSource
    decoder = MainStreamDecoder(
        source_type(body),
        profile=PROFILE_CHOICES[options % len(PROFILE_CHOICES)],
        require_configuration=not options & 0x20,
        page_size_blocks=frozenset({"pc.ram"}) if options & 0x10 else frozenset(),
        known_devices=KNOWN_DEVICES if options & 0x80 else None,
    )
    for count, record in enumerate(decoder):
        if count > len(body) + 1:
            raise NoProgress(f"main decoder: {count} records from {len(body)} bytes")
        _apply(record)


def _apply(record: object) -> None:
    """What the destination does with a record beyond decoding it."""
    if isinstance(record, CompressedPage):
        record.decompress()
    elif isinstance(record, XbzrlePage):
        apply_xbzrle(record.encoded, memoryview(bytearray(TARGET_PAGE_SIZE)))
    elif isinstance(record, Configuration):
        _ = (record.capabilities, record.uuid, record.target_page_bits)
    elif isinstance(record, DeviceState):
        if record.header.idstr == APP_STATE_IDSTR:
            AppState.from_body(record.data)
        elif record.header.idstr == VERIFY_IDSTR:
            VerifySection.from_body(record.data)


def fuzz_ram(data: bytes) -> None:
    """Records of the `ram` section against a known block list (what follows a
    MEM_SIZE), one at a time or, with a peeking source, as zero-page runs."""
    options, body = _split(data)
    state = RamStreamState(
        profile=PROFILE_CHOICES[options % len(PROFILE_CHOICES)],
        ignore_shared=bool(options & 0x10),
        blocks=dict(recorded_blocks()),
        last_block="pc.ram" if options & 0x20 else None,
    )
    source = BufferSource(body)
    reader = Reader(source)
    peek = bool(options & 0x40)
    for _ in range(len(body) + 1):
        if not source.remaining:
            return
        if peek and state.read_zero_run(reader, memoryview(body)[source.position :]) is not None:
            continue
        _apply(state.read_record(reader))
    raise NoProgress(f"ram decoder: more records than the {len(body)} bytes")


def fuzz_configuration(data: bytes) -> None:
    """The configuration vmstate after its 0x07 byte."""
    config, _ = read_configuration(Reader(BufferSource(data)))
    _apply(config)


def fuzz_command(data: bytes) -> None:
    """A QEMU_VM_COMMAND record after its 0x08 byte."""
    read_command(Reader(BufferSource(data)))


# -- multifd channels -------------------------------------------------------------


def fuzz_init(data: bytes) -> None:
    """The 64-byte init of a multifd channel, and the destination's checks."""
    options, body = _split(data)
    init = read_init(Reader(BufferSource(body)))
    init.check(bytes(16), options % 17)
    _ = init.uuid_text


def _fuzz_packet(data: bytes, layout: PacketLayout) -> None:
    options, body = _split(data)
    compression = list(Compression)[options % len(Compression)]
    packet = MultiFDPacket.unpack(body[:PACKET_HEADER_SIZE], layout=layout)
    packet.block_name()
    packet.payload_length(compression)
    packet.check_pages(recorded_blocks(), compression)


def fuzz_packet(data: bytes) -> None:
    """One multifd packet header, QEMU 7.2 layout, and the checks before any page lands."""
    _fuzz_packet(data, PacketLayout.V7_2)


def fuzz_packet_9_0(data: bytes) -> None:
    """One multifd packet header, QEMU 9.0 layout (zero pages in the packet)."""
    _fuzz_packet(data, PacketLayout.V9_0)


def fuzz_channel(data: bytes) -> None:
    """A whole multifd channel as a receiving thread reads it: init, then header,
    checks and payload (decompressed for zlib and zstd) until the bytes end."""
    options, body = _split(data)
    compression = list(Compression)[options % len(Compression)]
    layout = PacketLayout.V9_0 if options & 0x10 else PacketLayout.V7_2
    decompressor = make_decompressor(compression)
    source = BufferSource(body)
    reader = Reader(source, Where(channel=0))
    read_init(reader)
    for number in range(len(body) + 1):
        if not source.remaining:
            return
        packet = read_packet(reader, layout=layout)
        _, offsets = packet.check_pages(recorded_blocks(), compression)
        payload = reader.take(packet.payload_length(compression), "payload")
        if decompressor is not None and packet.normal_pages:
            expected = packet.normal_pages * TARGET_PAGE_SIZE
            decompressor.decompress(payload, expected, reader.where)
        assert len(offsets) == packet.page_count, number
    raise NoProgress(f"channel decoder: more packets than the {len(body)} bytes")


# -- device state -----------------------------------------------------------------


def fuzz_devices(data: bytes) -> None:
    """Opaque device state split at its footers with the vmdesc tail."""
    if not data:
        return
    find_vmdesc_tail(data)
    expected_devices(VMDescription(data))
    for record in split_device_state(data):
        _apply(record)


def fuzz_appstate(data: bytes) -> None:
    """Our app-state section body: read as a known device, and parsed as the
    destination does (also when it came split from opaque device state)."""
    try:
        body = read_app_state(Reader(BufferSource(data)))
    except WireError:
        pass
    else:
        assert AppState.from_body(body).body() == body
    AppState.from_body(data)


def fuzz_verify(data: bytes) -> None:
    """Our verify section body: read as a known device, and parsed as the
    destination does (also when it came split from opaque device state)."""
    try:
        body = read_verify(Reader(BufferSource(data)))
    except WireError:
        pass
    else:
        assert VerifySection.from_body(body).body() == body
    VerifySection.from_body(data)


def fuzz_xbzrle(data: bytes) -> None:
    """An XBZRLE delta applied to a page."""
    page = bytearray(range(256)) * (TARGET_PAGE_SIZE // 256)
    apply_xbzrle(data, memoryview(page))
    assert len(page) == TARGET_PAGE_SIZE


TARGETS: dict[str, Target] = {
    "main": fuzz_main,
    "ram": fuzz_ram,
    "configuration": fuzz_configuration,
    "command": fuzz_command,
    "init": fuzz_init,
    "packet": fuzz_packet,
    "packet-9.0": fuzz_packet_9_0,
    "channel": fuzz_channel,
    "devices": fuzz_devices,
    "appstate": fuzz_appstate,
    "verify": fuzz_verify,
    "xbzrle": fuzz_xbzrle,
}


def run(target: Target, data: bytes) -> WireError | None:
    """Feed `data` to `target`: the `WireError` it refused them with, or None.
    Any other exception propagates: it is a bug."""
    try:
        target(data)
    except WireError as exc:
        return exc
    return None


# -- seeds ------------------------------------------------------------------------


@cache
def _recording(name: str, conn: int) -> bytes:
    return lzma.decompress((FIXTURES / name / f"conn{conn}.bin.xz").read_bytes())


@cache
def recorded_blocks() -> dict[str, int]:
    """The RAM blocks of the recorded VM (name → used_length): the ram, packet
    and channel targets check offsets against them, so the recorded packets
    and their bit flips pass or fail those checks as they would in QEMU."""
    for record in MainStreamDecoder(BufferSource(_recording(RECORDING, 0))):
        if isinstance(record, MemSize):
            return {b.name: b.used_length for b in record.blocks}
    raise ValueError(f"recording {RECORDING} has no MEM_SIZE record")


@cache
def _device_tail(main: bytes) -> bytes:
    """The main stream from its first FULL device section to the end."""
    decoder = MainStreamDecoder(BufferSource(main))
    while True:
        start = decoder.reader.offset
        record = decoder.next_record()
        if record is None:
            raise ValueError("recording has no device section")
        if isinstance(record, DeviceState):
            return main[start:]


def _closed_prefix(main: bytes, at_least: int) -> bytes:
    """The records of `main` up to `at_least` bytes, inside its ram section,
    closed with EOS, the section's footer and EOF: a short but whole stream."""
    decoder = MainStreamDecoder(BufferSource(main))
    section_id = None
    while (record := decoder.next_record()) is not None:
        if isinstance(record, SectionStart | SectionPart):
            section_id = record.section_id
        in_ram = isinstance(record, ZeroPage | Page) and section_id is not None
        if in_ram and decoder.reader.offset >= at_least:
            close = [EndOfSection(), SectionFooter(section_id), EndOfFile()]
            return main[: decoder.reader.offset] + b"".join(r.pack() for r in close)
    raise ValueError(f"no page record past byte {at_least}")


def _config_end(main: bytes) -> int:
    """Where the file header and configuration of a main stream end."""
    decoder = MainStreamDecoder(BufferSource(main))
    header, config = decoder.next_record(), decoder.next_record()
    assert header is not None and config is not None
    return len(header.pack()) + len(config.pack())


def _synthetic_stream() -> bytes:
    """A short stream with our own device sections (app-state and verify)."""
    app = AppState(b"workload state", 1_700_000_000_000_000_000)
    verify = VerifySection(7, (BlockHashes("pc.ram", np.arange(4, dtype=np.uint64)),))
    records = [
        FileHeader(),
        Configuration.build("pc-i440fx-7.2", capabilities=("x-verify",), uuid=bytes(16)),
        VMCommand(Command.PING, be32(1)),
        SectionStart(2, "ram", 0, 4),
        MemSize((RamBlockEntry("pc.ram", 4 * TARGET_PAGE_SIZE),)),
        ZeroPage("pc.ram", 0),
        ZeroPage("pc.ram", TARGET_PAGE_SIZE, continued=True),
        ZeroPage("pc.ram", 2 * TARGET_PAGE_SIZE, continued=True),
        Page("pc.ram", 3 * TARGET_PAGE_SIZE, bytes(range(256)) * 16, continued=True),
        EndOfSection(),
        SectionFooter(2),
        SectionPart(2, end=True),
        XbzrlePage("pc.ram", 0, b"\x00\x02\xaa\xbb", continued=True),
        CompressedPage("pc.ram", 0, zlib.compress(bytes(TARGET_PAGE_SIZE)), continued=True),
        MultifdFlush(),
        EndOfSection(),
        SectionFooter(2),
        DeviceState(app.header(3), app.body()),
        SectionFooter(3),
        DeviceState(verify.header(4), verify.body()),
        SectionFooter(4),
        EndOfFile(),
        vmdescription([app.vmdesc_entry(), verify.vmdesc_entry()]),
    ]
    return b"".join(r.pack() for r in records)


def _synthetic_channel(compression: Compression, layout: PacketLayout) -> bytes:
    """A channel of our own: init, one packet of two pages, a SYNC."""
    pages = [bytes([i]) * TARGET_PAGE_SIZE for i in (1, 2)]
    compressor = make_compressor(compression)
    payload = b"".join(pages) if compressor is None else compressor.compress(pages)
    packet = MultiFDPacket.for_pages(
        "pc.ram",
        [0, 5 * TARGET_PAGE_SIZE],
        flags=compression.flag,
        packet_num=0,
        payload_size=len(payload),
        zero_offsets=[TARGET_PAGE_SIZE] if layout is PacketLayout.V9_0 else (),
        layout=layout,
    )
    sync = MultiFDPacket.sync(1, layout=layout)
    return MultiFDInit(bytes(16), 0).pack() + packet.pack() + payload + sync.pack()


def _first_packets(channel: bytes, count: int) -> tuple[list[bytes], int]:
    """The first `count` packet headers of a recorded (uncompressed) channel,
    and where the last one's payload ends."""
    reader = Reader(BufferSource(channel))
    read_init(reader)
    headers = []
    for _ in range(count):
        start = reader.offset
        packet = read_packet(reader)
        headers.append(channel[start : start + PACKET_HEADER_SIZE])
        reader.take(packet.payload_length(Compression.NONE), "payload")
    return headers, reader.offset


@cache
def seeds(name: str) -> tuple[bytes, ...]:
    """Valid inputs for target `name`, from the QEMU 7.2 recordings and our own
    encoders, each with the option byte that decodes it as intended."""
    qemu_main = _recording(RECORDING, 0)
    qemu_channel = _recording(RECORDING, 2)
    ours = _synthetic_stream()
    tail = _device_tail(qemu_main)
    if name == "main":
        return (
            b"\x01" + _closed_prefix(qemu_main, 2048),  # profile 7.2
            b"\x01" + qemu_main[: _config_end(qemu_main)] + tail,  # no ram section
            b"\xc0" + ours,  # peeking source, our devices known
            b"\x00" + ours,
        )
    if name == "ram":
        records = [
            ZeroPage("pc.ram", 0),
            Page("pc.ram", TARGET_PAGE_SIZE, bytes(range(256)) * 16, continued=True),
            XbzrlePage("pc.ram", 0, b"\x00\x02\xaa\xbb", continued=True),
            CompressedPage("pc.ram", 0, zlib.compress(bytes(TARGET_PAGE_SIZE)), continued=True),
            MultifdFlush(),
            EndOfSection(),
        ]
        zero_run = [ZeroPage("pc.ram", i * TARGET_PAGE_SIZE, continued=True) for i in range(8)]
        return (
            b"\x00" + b"".join(r.pack() for r in records),
            b"\x60" + b"".join(r.pack() for r in zero_run),  # peeking, pc.ram last
            b"\x20" + zero_run[0].pack(),
        )
    if name == "configuration":
        config = Configuration.build("pc-i440fx-7.2", capabilities=("x-verify",), uuid=bytes(16))
        return (config.pack()[1:], qemu_main[9:27])
    if name == "command":
        return (
            VMCommand(Command.PING, be32(7)).pack()[1:],
            VMCommand(Command.PACKAGED, be32(3), b"abc").pack()[1:],
        )
    if name == "init":
        return (b"\x02" + qemu_channel[:INIT_SIZE], b"\x04" + MultiFDInit(bytes(16), 3).pack())
    if name in ("packet", "packet-9.0"):
        layout = PacketLayout.V7_2 if name == "packet" else PacketLayout.V9_0
        ours_packet = _synthetic_channel(Compression.NONE, layout)[INIT_SIZE:]
        recorded = _first_packets(qemu_channel, 2)[0] if name == "packet" else []
        return tuple(b"\x00" + h for h in [*recorded, ours_packet[:PACKET_HEADER_SIZE]])
    if name == "channel":
        return (
            b"\x00" + _synthetic_channel(Compression.NONE, PacketLayout.V7_2),
            b"\x01" + _synthetic_channel(Compression.ZLIB, PacketLayout.V7_2),
            b"\x11" + _synthetic_channel(Compression.ZSTD, PacketLayout.V9_0),
            b"\x00" + qemu_channel[: _first_packets(qemu_channel, 2)[1]],
        )
    if name == "devices":
        app = AppState(b"state")
        ours_tail = ours[ours.index(app.header(3).pack()[:5]) :]
        return (tail, ours_tail, b"\x04" + ours_tail[1:])
    if name == "appstate":
        return (AppState(b"workload state", 5).body(), AppState(b"").body())
    if name == "verify":
        verify = VerifySection(
            7,
            (
                BlockHashes("pc.ram", np.arange(4, dtype=np.uint64)),
                BlockHashes("pc.rom", np.zeros(1, dtype=np.uint64)),
            ),
        )
        return (verify.body(), VerifySection(0, ()).body())
    if name == "xbzrle":
        # Zero run 2, data run 2 (aa bb); then a two-byte ULEB128 run of 200.
        return (b"\x02\x02\xaa\xbb", b"\x00\x01\x55\xc8\x01\x01\x66")
    raise KeyError(f"no fuzz target {name!r}; known: {', '.join(TARGETS)}")
