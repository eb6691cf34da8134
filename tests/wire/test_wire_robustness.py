"""Bad bytes give records or `WireError`, never another exception and never a
hang: random input, every truncation, single bit flips."""

from __future__ import annotations

import json
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_support import (
    FUZZ,
    ChannelCapture,
    Recording,
    RecordingStore,
    SyntheticStream,
    decode_channel,
    decode_until_error,
    main_streams,
    pack_all,
)

from multifd.wire import (
    INIT_SIZE,
    PACKET_HEADER_SIZE,
    PROFILES,
    BufferSource,
    Command,
    CompressedPage,
    Compression,
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MainRecord,
    MemSize,
    MultiFDInit,
    MultiFDPacket,
    PacketLayout,
    Page,
    RamBlockEntry,
    Reader,
    SectionFooter,
    SectionPart,
    SectionStart,
    VMCommand,
    VMDescription,
    WireError,
    WireProfile,
    XbzrlePage,
    ZeroPage,
    plain_pages_header,
    read_init,
    split_device_state,
)
from multifd.wire.reader import be32

profiles = st.sampled_from([None, *PROFILES.values()])
compressions = st.sampled_from(list(Compression))
layouts = st.sampled_from(list(PacketLayout))
PACKET_PREFIX = b"\x11\x22\x33\x44\x00\x00\x00\x01"


def small_stream() -> list[MainRecord]:
    """A short stream with every kind of main-channel record."""
    devices = [{"name": "timer", "instance_id": 0}, {"name": "globalstate", "instance_id": 0}]
    timer = SectionStart(5, "timer", 0, 2, full=True)
    globalstate = SectionStart(9, "globalstate", 0, 1, full=True)
    return [
        FileHeader(),
        Configuration.build(
            "pc-i440fx-7.2", capabilities=("validate-uuid",), uuid=bytes(range(16))
        ),
        VMCommand(Command.OPEN_RETURN_PATH),
        VMCommand(Command.PING, be32(1)),
        SectionStart(2, "ram", 0, 4),
        MemSize((RamBlockEntry("pc.ram", 16 * 4096), RamBlockEntry("pc.rom", 4096))),
        ZeroPage("pc.ram", 0),
        ZeroPage("pc.ram", 4096, continued=True),
        Page("pc.rom", 0, bytes(range(256)) * 16),
        EndOfSection(),
        SectionFooter(2),
        SectionPart(2),
        XbzrlePage("pc.ram", 8192, b"\x01\x02\x03"),
        CompressedPage("pc.ram", 12288, zlib.compress(bytes(4096)), continued=True),
        ZeroPage("pc.ram", 16384, continued=True),
        EndOfSection(),
        SectionFooter(2),
        SectionPart(2, end=True),
        EndOfSection(),
        SectionFooter(2),
        DeviceState(timer, bytes(8) + b"\x01"),
        SectionFooter(5),
        DeviceState(globalstate, b"\x00\x00\x00\x08running"),
        SectionFooter(9),
        EndOfFile(),
        VMDescription(json.dumps({"page_size": 4096, "devices": devices}).encode()),
    ]


SMALL = small_stream()
SMALL_BYTES = pack_all(SMALL)
# A cut right after EOF leaves a complete stream: the vmdesc is optional.
SMALL_EOF_END = len(pack_all(SMALL[:-1]))
SMALL_DEVICES_AT = len(pack_all(SMALL[:20]))
# The 4096 raw bytes of the Page record (after its be64 header and the counted
# name "pc.rom"): flipping them only changes the page's content.
SMALL_PAGE_DATA = range(len(pack_all(SMALL[:8])) + 8 + 7, len(pack_all(SMALL[:9])))


def assert_records_or_wire_error(
    data: bytes, profile: WireProfile | None = None
) -> tuple[list[MainRecord], WireError | None]:
    """Decoding either fails with WireError or yields records that re-encode to
    no more bytes than were read; anything else escapes and fails the test."""
    records, error = decode_until_error(data, profile=profile)
    assert len(pack_all(records)) <= len(data)
    return records, error


def test_small_stream_is_valid() -> None:
    records, error = decode_until_error(SMALL_BYTES)
    assert error is None
    assert records == SMALL
    assert SMALL_BYTES[SMALL_PAGE_DATA.start : SMALL_PAGE_DATA.start + 256] == bytes(range(256))


# -- truncations -------------------------------------------------------------------


def test_every_truncation_of_a_small_stream_is_a_wire_error() -> None:
    cuts = [c for c in range(len(SMALL_BYTES)) if c not in SMALL_PAGE_DATA]
    for cut in [*cuts, *SMALL_PAGE_DATA[::256]]:
        records, error = decode_until_error(SMALL_BYTES[:cut])
        assert SMALL_BYTES.startswith(pack_all(records)), cut
        if cut == SMALL_EOF_END:
            assert error is None, cut
            assert records == SMALL[:-1]
            continue
        assert error is not None, f"cut at {cut} decoded without error"
        if cut < SMALL_DEVICES_AT:
            assert "truncated" in error.message or "stream ended" in error.message, error
            assert error.where.offset is not None and error.where.offset <= cut, error


def test_every_truncation_of_a_real_stream_prefix_names_truncation_and_position(
    recordings: RecordingStore,
) -> None:
    prefix = recordings["mf2-nokernel"].main[:1536]
    for cut in range(len(prefix)):
        records, error = decode_until_error(prefix[:cut])
        assert error is not None, cut
        assert "truncated" in error.message or "stream ended" in error.message, error
        assert error.where.offset is not None and error.where.offset <= cut, error
        assert prefix.startswith(pack_all(records))
        assert f"byte {error.where.offset:#x}" in str(error)


def _channel_with_payload(recording: Recording) -> tuple[bytes, ChannelCapture]:
    index = next(
        i for i, c in enumerate(recording.channels) if any(p.normal_pages for p, _ in c.packets[:3])
    )
    return recording.channel_bytes[index], recording.channels[index]


def test_every_truncation_of_a_real_channel_prefix_is_a_wire_error(
    recordings: RecordingStore,
) -> None:
    data, capture = _channel_with_payload(recordings["mf2-nokernel"])
    boundaries = [INIT_SIZE]
    for _, payload in capture.packets[:3]:
        boundaries.append(boundaries[-1] + PACKET_HEADER_SIZE + len(payload))
    cuts = set(range(INIT_SIZE + 2 * PACKET_HEADER_SIZE + 1))
    cuts |= set(range(0, boundaries[-1], 97)) | {b + d for b in boundaries for d in (-1, 0, 1)}
    for cut in sorted(cuts):
        if cut in boundaries:
            assert decode_channel(data[:cut]).pack() == data[:cut]
            continue
        with pytest.raises(WireError, match="truncated") as info:
            decode_channel(data[:cut], channel=0)
        assert str(info.value).startswith("channel 0: byte ")
        assert info.value.where.offset is not None and info.value.where.offset <= cut


def test_every_truncation_of_a_real_device_tail_is_a_wire_error_or_ends_at_eof(
    recordings: RecordingStore,
) -> None:
    recording = recordings["plain-nokernel"]
    first = next(i for i, r in enumerate(recording.records) if isinstance(r, DeviceState))
    tail = recording.main[recording.offset_of(first) :]
    eof_end = len(tail) - len(recording.records[-1].pack())
    cuts = set(range(1, len(tail), 53)) | set(range(eof_end - 40, eof_end + 40))
    for cut in sorted(cuts):
        try:
            records = split_device_state(tail[:cut])
        except WireError:
            continue
        # Only a cut right after EOF is a complete stream (the vmdesc is optional).
        assert cut == eof_end, cut
        assert records == recording.records[first:-1]


# -- single bit flips --------------------------------------------------------------------


def test_every_bit_flip_of_a_small_stream_gives_records_or_wire_error() -> None:
    for byte in range(len(SMALL_BYTES)):
        if byte in SMALL_PAGE_DATA:
            continue
        for bit in range(8):
            flipped = bytearray(SMALL_BYTES)
            flipped[byte] ^= 1 << bit
            assert_records_or_wire_error(bytes(flipped))


def test_every_bit_flip_of_a_real_stream_prefix_gives_records_or_wire_error(
    recordings: RecordingStore,
) -> None:
    prefix = recordings["mf4-mb"].main[:768]
    for byte in range(256):
        for bit in range(8):
            flipped = bytearray(prefix)
            flipped[byte] ^= 1 << bit
            _, error = assert_records_or_wire_error(bytes(flipped), PROFILES["7.2"])
            assert error is not None  # a prefix never reaches EOF


def test_every_bit_flip_of_a_real_packet_header_gives_a_packet_or_wire_error(
    recordings: RecordingStore,
) -> None:
    recording = recordings["mf2-nokernel"]
    data, capture = _channel_with_payload(recording)
    index = next(i for i, (p, _) in enumerate(capture.packets) if p.normal_pages)
    start = INIT_SIZE + sum(PACKET_HEADER_SIZE + len(p) for _, p in capture.packets[:index])
    header = data[start : start + PACKET_HEADER_SIZE]
    assert MultiFDPacket.unpack(header) == capture.packets[index][0]
    accepted = 0
    for byte in range(PACKET_HEADER_SIZE):
        for bit in range(8):
            flipped = bytearray(header)
            flipped[byte] ^= 1 << bit
            for layout in PacketLayout:
                try:
                    packet = MultiFDPacket.unpack(bytes(flipped), layout=layout)
                    packet.check_pages(recording.blocks, Compression.NONE)
                except WireError:
                    continue
                accepted += 1
    assert accepted > 0  # most flips (offset low bits, packet_num) stay valid


def test_every_bit_flip_of_a_real_init_gives_an_init_or_wire_error(
    recordings: RecordingStore,
) -> None:
    data = recordings["mf4-mb"].channel_bytes[0][:INIT_SIZE]
    for byte in range(INIT_SIZE):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[byte] ^= 1 << bit
            try:
                init = read_init(Reader(BufferSource(bytes(flipped))))
                init.check(bytes(16), 4)
            except WireError:
                continue
            # Bytes 25..63 are unused: QEMU ignores them and pack() writes zeros.
            assert init.pack()[:25] == bytes(flipped)[:25]


# -- hypothesis: random input -----------------------------------------------------------


@FUZZ
@given(st.binary(max_size=2048), profiles)
def test_random_bytes_give_records_or_wire_error(data: bytes, profile: WireProfile | None) -> None:
    assert_records_or_wire_error(data, profile)


@FUZZ
@given(st.binary(max_size=1024), st.integers(0, len(SMALL_BYTES)), profiles)
def test_random_bytes_after_a_valid_prefix_give_records_or_wire_error(
    tail: bytes, cut: int, profile: WireProfile | None
) -> None:
    assert_records_or_wire_error(SMALL_BYTES[:cut] + tail, profile)


@FUZZ
@given(main_streams(), st.data(), profiles)
def test_bit_flips_of_generated_streams_give_records_or_wire_error(
    stream: SyntheticStream, data: st.DataObject, profile: WireProfile | None
) -> None:
    encoded = bytearray(stream.pack())
    for _ in range(data.draw(st.integers(1, 3))):
        bit = data.draw(st.integers(0, 8 * len(encoded) - 1))
        encoded[bit // 8] ^= 1 << (bit % 8)
    assert_records_or_wire_error(bytes(encoded), profile)


@FUZZ
@given(main_streams(), st.data())
def test_truncations_of_generated_streams_give_a_prefix_or_wire_error(
    stream: SyntheticStream, data: st.DataObject
) -> None:
    encoded = stream.pack()
    cut = data.draw(st.integers(0, len(encoded)))
    records, error = decode_until_error(encoded[:cut], page_size_blocks=stream.page_size_blocks)
    if error is None:
        assert records == stream.records[: len(records)]
        assert pack_all(records) == encoded[:cut]


@FUZZ
@given(st.binary(max_size=128))
def test_random_init_bytes_give_an_init_or_wire_error(data: bytes) -> None:
    try:
        init = read_init(Reader(BufferSource(data)))
        init.check(bytes(16), 8)
    except WireError:
        return
    assert len(data) >= INIT_SIZE


@FUZZ
@given(st.binary(min_size=INIT_SIZE - 8, max_size=INIT_SIZE - 8))
def test_random_init_body_gives_an_init_or_wire_error(body: bytes) -> None:
    init = MultiFDInit.unpack(b"\x11\x22\x33\x44\x00\x00\x00\x01" + body)
    try:
        init.check(body[:16], 16)
    except WireError as exc:
        assert "channel id" in exc.message
        return
    assert init.channel_id < 16


small_or_any = st.one_of(st.integers(0, 0x84), st.integers(0, 2**32 - 1))


@FUZZ
@given(
    st.tuples(small_or_any, small_or_any, small_or_any),
    st.one_of(st.integers(0, 4), st.integers(0, 2**32 - 1)),
    st.binary(max_size=PACKET_HEADER_SIZE - 36),
    layouts,
    compressions,
    st.dictionaries(st.text(max_size=8), st.integers(0, 1 << 40), max_size=3),
)
def test_random_packet_headers_give_a_checked_packet_or_wire_error(
    fields: tuple[int, int, int],
    zero: int,
    rest: bytes,
    layout: PacketLayout,
    compression: Compression,
    blocks: dict[str, int],
) -> None:
    flags, alloc, normal = fields
    body = be32(flags) + be32(alloc) + be32(normal) + bytes(12) + be32(zero) + rest
    try:
        packet = MultiFDPacket.unpack(
            (PACKET_PREFIX + body).ljust(PACKET_HEADER_SIZE, b"\0"), layout=layout
        )
    except WireError:
        return
    # Whatever unpack accepts passed every structural check QEMU makes.
    known = 0x0F if layout is PacketLayout.V7_2 else 0x3F
    assert packet.flags & ~known == 0
    assert packet.normal_pages <= packet.pages_alloc <= 128
    assert packet.zero_pages <= packet.pages_alloc - packet.normal_pages
    try:
        name, offsets = packet.check_pages(blocks, compression)
    except WireError:
        return
    assert len(offsets) == packet.page_count
    assert name in blocks or packet.page_count == 0
    assert all(o <= blocks[name] - 4096 for o in offsets.tolist())


@FUZZ
@given(
    st.tuples(small_or_any, small_or_any, small_or_any),
    st.binary(max_size=PACKET_HEADER_SIZE - 24),
    st.booleans(),
)
def test_the_receivers_shortcut_accepts_only_what_unpack_accepts(
    fields: tuple[int, int, int], rest: bytes, good_prefix: bool
) -> None:
    """plain_pages_header (the receive threads' shortcut) says yes only to
    headers that the full decoder also accepts as a flagless packet of pages,
    with the same counts, number and block field."""
    flags, alloc, normal = fields
    prefix = PACKET_PREFIX if good_prefix else bytes(len(PACKET_PREFIX))
    header = (prefix + be32(flags) + be32(alloc) + be32(normal) + rest).ljust(
        PACKET_HEADER_SIZE, b"\0"
    )[:PACKET_HEADER_SIZE]
    plain = plain_pages_header(header)
    if plain is None:
        return
    packet = MultiFDPacket.unpack(header, layout=PacketLayout.V7_2)
    assert packet.flags == 0 and packet.normal_pages > 0
    assert plain == (packet.normal_pages, packet.packet_num, packet.ramblock)


@FUZZ
@given(
    st.integers(0, 0x0F),
    st.integers(0, 128).flatmap(lambda a: st.tuples(st.just(a), st.integers(0, a))),
    st.binary(min_size=12, max_size=12),
    st.binary(max_size=64),
    st.booleans(),
    st.binary(max_size=PACKET_HEADER_SIZE + 64),
)
def test_random_bytes_on_a_channel_give_packets_or_wire_error(
    flags: int,
    counts: tuple[int, int],
    size_and_num: bytes,
    name_and_offsets: bytes,
    with_payload: bool,
    tail: bytes,
) -> None:
    # A valid init, a header with plausible counts and random fields, maybe its
    # payload, then random bytes: read as the destination would. Bytes 32..63
    # stay zero: 7.2 ignores them and pack() writes zeros.
    alloc, normal = counts
    data = MultiFDInit(bytes(16), 0).pack()
    data += PACKET_PREFIX + be32(flags) + be32(alloc) + be32(normal) + size_and_num
    data += bytes(32) + name_and_offsets.ljust(PACKET_HEADER_SIZE - 64, b"\0")
    data += bytes(normal * 4096) if with_payload else b""
    data += tail
    try:
        capture = decode_channel(data)
    except WireError:
        return
    assert capture.pack() == data


@FUZZ
@given(st.binary(max_size=512))
def test_random_device_tails_give_sections_or_wire_error(blob: bytes) -> None:
    for candidate in (blob, b"\x04" + blob, b"\x04" + blob + b"\x00"):
        try:
            records = split_device_state(candidate)
        except WireError:
            continue
        assert isinstance(records[-1], EndOfFile | VMDescription)
