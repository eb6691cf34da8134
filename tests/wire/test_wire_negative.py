"""Spec 7-C "Negative", the cases that belong to the wire layer: each bad input
fails with the message QEMU gives (or ours, where QEMU has none) and names
where it happened."""

from __future__ import annotations

import re
import uuid

import pytest
from wire_support import decode_main, decode_until_error, pack_all

from multifd.wire import (
    INIT_SIZE,
    PACKET_HEADER_SIZE,
    PROFILES,
    QEMU_7_2,
    BufferSource,
    Command,
    Compression,
    Configuration,
    EndOfSection,
    FileHeader,
    MainRecord,
    MainStreamDecoder,
    MemSize,
    MultifdFlush,
    MultiFDInit,
    MultiFDPacket,
    PacketLayout,
    RamBlockEntry,
    Reader,
    SectionFooter,
    SectionPart,
    SectionStart,
    VMCommand,
    Where,
    WireError,
    ZeroPage,
    read_init,
    read_packet,
)
from multifd.wire.reader import be16, be32, be64, counted_string

UUID_A = uuid.UUID("11111111-2222-3333-4444-555555555555").bytes
UUID_B = uuid.UUID("99999999-8888-7777-6666-555555555555").bytes
BLOCKS = {"pc.ram": 0x8000000, "pc.rom": 0x20000}
RAM_SID = 2


def ram_stream(*records: MainRecord | bytes) -> bytes:
    """Header, configuration, START "ram" (id 2), then the given records or raw bytes."""
    head: list[MainRecord] = [
        FileHeader(),
        Configuration("pc-i440fx-7.2"),
        SectionStart(RAM_SID, "ram", 0, 4),
    ]
    return pack_all(head) + b"".join(r if isinstance(r, bytes) else r.pack() for r in records)


def main_error(data: bytes, **options: object) -> WireError:
    records, error = decode_until_error(data, **options)
    assert error is not None, f"decoded without error: {records}"
    return error


MEM_SIZE = MemSize(tuple(RamBlockEntry(n, length) for n, length in BLOCKS.items()))
RAM_HEAD_LEN = len(ram_stream())


# -- multifd init -----------------------------------------------------------------


def test_wrong_init_magic_is_refused_at_byte_0() -> None:
    data = MultiFDInit(bytes(16), 0, magic=0x5145564D).pack()
    with pytest.raises(WireError) as info:
        read_init(Reader(BufferSource(data)))
    assert str(info.value) == (
        "main channel: byte 0x0: multifd init magic 0x5145564d, expected 0x11223344"
    )
    assert info.value.field == "multifd init magic"


def test_wrong_init_version_is_refused_at_byte_4() -> None:
    data = MultiFDInit(bytes(16), 0, version=2).pack()
    with pytest.raises(WireError) as info:
        read_init(Reader(BufferSource(data)))
    assert str(info.value) == "main channel: byte 0x4: multifd init version 2, expected 1"


def test_init_errors_are_placed_relative_to_where_the_init_starts() -> None:
    data = MultiFDInit(bytes(16), 0, version=2).pack()
    with pytest.raises(WireError, match=r"^channel 1: byte 0x104: multifd init version 2"):
        MultiFDInit.unpack(data, Where(channel=1, offset=0x100))


def test_init_uuid_mismatch_names_both_uuids_and_the_channel() -> None:
    init = MultiFDInit(UUID_A, 1)
    with pytest.raises(WireError) as info:
        init.check(UUID_B, 2)
    assert str(info.value) == (
        "channel 1: byte 0x8: multifd: received uuid '11111111-2222-3333-4444-555555555555' "
        "and expected uuid '99999999-8888-7777-6666-555555555555' for channel 1"
    )


@pytest.mark.parametrize(
    ("channel_id", "channels", "shown"), [(2, 2, "2"), (3, 2, "3"), (255, 16, "0xff")]
)
def test_init_channel_id_at_or_above_the_channel_count_is_refused(
    channel_id: int, channels: int, shown: str
) -> None:
    with pytest.raises(WireError) as info:
        MultiFDInit(UUID_A, channel_id).check(UUID_A, channels)
    assert str(info.value) == (
        f"channel {channel_id}: byte 0x18: channel id {shown}, "
        f"expected below multifd-channels ({channels})"
    )


def test_init_last_channel_id_is_accepted() -> None:
    MultiFDInit(UUID_A, 1).check(UUID_A, 2)


def test_truncated_init_says_so() -> None:
    with pytest.raises(WireError) as info:
        read_init(Reader(BufferSource(bytes(40)), Where(channel=3)))
    assert str(info.value) == (
        "channel 3: byte 0x0: truncated multifd init packet: needs 64 bytes "
        "(stream ended 24 bytes short of 64)"
    )


# -- multifd packet header ----------------------------------------------------------


def header(
    *,
    flags: int = 0,
    alloc: int = 128,
    normal: int = 0,
    zero: int = 0,
    block: str = "pc.ram",
    offsets: tuple[int, ...] = (),
    layout: PacketLayout = PacketLayout.V7_2,
) -> bytes:
    slots = b"".join(be64(o) for o in offsets).ljust(8 * 128, b"\0")
    return MultiFDPacket(
        flags=flags,
        pages_alloc=alloc,
        normal_pages=normal,
        next_packet_size=normal * 4096,
        packet_num=7,
        ramblock=block.encode().ljust(256, b"\0"),
        offset_slots=slots,
        zero_pages=zero,
        layout=layout,
    ).pack()


def unpack_error(data: bytes, layout: PacketLayout = PacketLayout.V7_2) -> WireError:
    with pytest.raises(WireError) as info:
        MultiFDPacket.unpack(data, layout=layout, where=Where(channel=1, packet=4, offset=0x1000))
    return info.value


def test_packet_with_wrong_magic_is_refused_like_qemu() -> None:
    data = b"QEVM" + header()[4:]
    assert str(unpack_error(data)) == (
        "channel 1: packet 4: byte 0x1000: multifd: received packet magic 5145564d "
        "expected 11223344"
    )


def test_packet_with_wrong_version_is_refused_like_qemu() -> None:
    data = header()[:4] + be32(2) + header()[8:]
    assert str(unpack_error(data)) == (
        "channel 1: packet 4: byte 0x1004: multifd: received packet version 2 expected 1"
    )


def test_pages_alloc_above_128_is_refused() -> None:
    error = unpack_error(header(alloc=129))
    assert str(error) == (
        "channel 1: packet 4: byte 0x100c: multifd: received packet with size 129 "
        "and expected a size of 128"
    )
    assert (error.field, error.value) == ("pages_alloc", 129)


def test_normal_pages_above_pages_alloc_is_refused() -> None:
    error = unpack_error(header(alloc=64, normal=65))
    assert str(error) == (
        "channel 1: packet 4: byte 0x1010: multifd: received packet with 65 pages "
        "and expected maximum pages are 64"
    )


def test_zero_pages_above_alloc_minus_normal_is_refused_in_9_0_layout() -> None:
    data = header(alloc=128, normal=100, zero=29, layout=PacketLayout.V9_0)
    error = unpack_error(data, PacketLayout.V9_0)
    assert str(error) == (
        "channel 1: packet 4: byte 0x1020: multifd: received packet with 29 zero pages, "
        "expected maximum 28"
    )
    # The same bytes read by a 7.2 receiver: bytes 32..63 are unused there.
    assert MultiFDPacket.unpack(data).zero_pages == 0


def test_unknown_packet_flag_bit_is_refused() -> None:
    error = unpack_error(header(flags=0x10))
    assert str(error) == (
        "channel 1: packet 4: byte 0x1008: flags 0x10, expected only bits 0xf "
        "(SYNC and compression)"
    )
    assert str(unpack_error(header(flags=0x80, layout=PacketLayout.V9_0), PacketLayout.V9_0)) == (
        "channel 1: packet 4: byte 0x1008: flags 0x80, expected only bits 0x3f "
        "(SYNC and compression)"
    )


@pytest.mark.parametrize("layout", list(PacketLayout))
@pytest.mark.parametrize("bit", [0x80, 0x100, 0x8000_0000])
def test_high_packet_flag_bits_are_refused(layout: PacketLayout, bit: int) -> None:
    error = unpack_error(header(flags=bit | 0x01, layout=layout), layout)
    assert (error.field, error.value) == ("flags", bit | 0x01)


def test_device_state_packet_is_refused_in_9_0_layout() -> None:
    error = unpack_error(header(flags=0x40, layout=PacketLayout.V9_0), PacketLayout.V9_0)
    assert "device-state packet (MULTIFD_FLAG_DEVICE_STATE, QEMU 10.0+) is not supported" in str(
        error
    )
    assert error.where.offset == 0x1008


def test_truncated_packet_header_says_so_and_where() -> None:
    data = MultiFDInit(bytes(16), 1).pack() + header()[:1000]
    reader = Reader(BufferSource(data), Where(channel=1))
    read_init(reader)
    with pytest.raises(WireError) as info:
        read_packet(reader)
    assert str(info.value) == (
        f"channel 1: byte {INIT_SIZE:#x}: truncated packet header: needs {PACKET_HEADER_SIZE} "
        f"bytes (stream ended 344 bytes short of {PACKET_HEADER_SIZE})"
    )


def test_truncated_packet_payload_says_so_and_where() -> None:
    data = header(normal=2, offsets=(0, 4096)) + bytes(4096)
    reader = Reader(BufferSource(data), Where(channel=0))
    packet = read_packet(reader)
    with pytest.raises(WireError, match=r"^channel 0: byte 0x540: truncated payload: needs 8192"):
        reader.take(packet.payload_length(Compression.NONE), "payload")


# -- check_pages: what QEMU checks before touching memory ----------------------------


def check_error(data: bytes, compression: Compression = Compression.NONE) -> WireError:
    packet = MultiFDPacket.unpack(data)
    with pytest.raises(WireError) as info:
        packet.check_pages(BLOCKS, compression, Where(channel=3, packet=17, offset=0x5C0))
    return info.value


def test_packet_for_an_unknown_ram_block_is_refused() -> None:
    error = check_error(header(normal=1, block="pc.nosuch", offsets=(0,)))
    assert str(error) == "channel 3: packet 17: byte 0x600: multifd: unknown ram block pc.nosuch"


def test_packet_offset_past_the_last_page_names_block_and_offset() -> None:
    offsets = (0, 0x7FFF000, 0x8000000)
    error = check_error(header(normal=3, offsets=offsets))
    assert str(error) == (
        "channel 3: packet 17: byte 0x710: multifd: offset too long: offset 0x8000000 "
        'beyond block "pc.ram" (used_length 0x8000000)'
    )
    assert (error.field, error.value) == ("offset[2]", 0x8000000)


def test_packet_offset_of_the_last_page_is_accepted() -> None:
    packet = MultiFDPacket.unpack(header(normal=1, offsets=(0x7FFF000,)))
    name, offsets = packet.check_pages(BLOCKS, Compression.NONE)
    assert (name, offsets.tolist()) == ("pc.ram", [0x7FFF000])


def test_packet_compression_flag_mismatch_is_refused() -> None:
    error = check_error(header(flags=0x02, normal=1, offsets=(0,)))
    assert str(error) == (
        "channel 3: packet 17: byte 0x5c8: multifd: flags received 0x2 flags expected 0x0 "
        "(multifd-compression is none)"
    )
    error = check_error(header(flags=0x01, normal=1, offsets=(0,)), Compression.ZSTD)
    assert "flags received 0x0 flags expected 0x4 (multifd-compression is zstd)" in str(error)


def test_compressed_payload_larger_than_qemus_buffer_is_refused() -> None:
    data = bytearray(header(flags=0x02, normal=1, offsets=(0,)))
    data[20:24] = be32(0x100001)  # next_packet_size
    error = check_error(bytes(data), Compression.ZLIB)
    assert str(error) == (
        "channel 3: packet 17: byte 0x5d4: next_packet_size 0x100001, expected at most "
        "1048576 bytes of compressed pages"
    )


def test_empty_packet_is_not_checked_for_block_or_compression() -> None:
    # 7.2 quirk: SYNC packets carry stale fields; QEMU stops before looking at them.
    packet = MultiFDPacket.unpack(header(flags=0x01, block="stale", normal=0))
    assert packet.check_pages(BLOCKS, Compression.ZLIB)[0] == ""


# -- the ram section -----------------------------------------------------------------


def test_flush_is_refused_by_the_7_2_profile_and_accepted_without_one() -> None:
    data = ram_stream(MEM_SIZE, MultifdFlush(), EndOfSection(), SectionFooter(RAM_SID))
    flush_at = RAM_HEAD_LEN + len(MEM_SIZE.pack())
    error = main_error(data, profile=QEMU_7_2)
    assert str(error) == (
        f'main channel: section "ram" (id 2): byte {flush_at:#x}: '
        "Unknown combination of migration flags: 0x200"
    )
    records, error = decode_until_error(data)
    assert error is not None and "stream ended" in error.message  # no EOF: only the end is bad
    assert MultifdFlush() in records


def test_flush_is_accepted_by_the_8_1_profile() -> None:
    data = ram_stream(MEM_SIZE, MultifdFlush(), EndOfSection(), SectionFooter(RAM_SID))
    records, _ = decode_until_error(data, profile=PROFILES["8.1"])
    assert MultifdFlush() in records


def test_mem_size_lengths_beyond_the_total_are_refused() -> None:
    entries = be64(0x2000 | 0x04) + counted_string("a") + be64(0x1000)
    entries += counted_string("b") + be64(0x2000)
    error = main_error(ram_stream(entries))
    assert str(error) == (
        f'main channel: section "ram" (id 2): byte {RAM_HEAD_LEN + 8 + 10:#x}: MEM_SIZE block '
        "lengths add up to 0x3000, beyond the announced total 0x2000 (at block 'b')"
    )


def test_mem_size_lengths_short_of_the_total_are_refused() -> None:
    # QEMU keeps reading block entries until the total is reached: the EOS
    # that follows is misread as an empty block name.
    entries = be64(0x3000 | 0x04) + counted_string("a") + be64(0x1000)
    error = main_error(ram_stream(entries, EndOfSection()))
    assert "RAM block name length 0, expected 1 to 255 bytes" in str(error)


def test_page_record_for_an_unknown_block_is_refused() -> None:
    zero = ZeroPage("pc.nosuch", 0)
    error = main_error(ram_stream(MEM_SIZE, zero))
    name_at = RAM_HEAD_LEN + len(MEM_SIZE.pack()) + 8
    assert str(error) == (
        f'main channel: section "ram" (id 2): byte {name_at:#x}: '
        'Unknown ramblock "pc.nosuch", cannot load'
    )
    error = main_error(ram_stream(zero))
    assert 'Unknown ramblock "pc.nosuch", cannot load (no MEM_SIZE block list was received)' in str(
        error
    )


def test_page_record_offset_outside_its_block_is_refused() -> None:
    error = main_error(ram_stream(MEM_SIZE, ZeroPage("pc.rom", 0x20000)))
    assert "Illegal RAM offset 0x20000 in block 'pc.rom' (used_length 0x20000)" in str(error)


def test_continue_without_a_previous_block_is_refused() -> None:
    error = main_error(ram_stream(MEM_SIZE, ZeroPage("pc.ram", 0, continued=True)))
    at = RAM_HEAD_LEN + len(MEM_SIZE.pack())
    assert str(error) == (
        f'main channel: section "ram" (id 2): byte {at:#x}: RAM_SAVE_FLAG_CONTINUE with no '
        "previous block (QEMU: 'Ack, bad migration stream!')"
    )


def test_continue_after_a_new_block_list_dropped_its_block_is_refused() -> None:
    other = MemSize((RamBlockEntry("pc.bios", 0x40000),))
    records = (MEM_SIZE, ZeroPage("pc.ram", 0), other, ZeroPage("pc.ram", 0, continued=True))
    error = main_error(ram_stream(*records))
    assert "RAM_SAVE_FLAG_CONTINUE with no previous block" in str(error)


def test_continue_carries_the_block_across_sections() -> None:
    records = decode_main(
        ram_stream(
            MEM_SIZE,
            ZeroPage("pc.rom", 0),
            EndOfSection(),
            SectionFooter(RAM_SID),
            SectionPart(RAM_SID),
            ZeroPage("pc.rom", 4096, continued=True),
            EndOfSection(),
            SectionFooter(RAM_SID),
            b"\x00",
        )
    )
    assert ZeroPage("pc.rom", 4096, 0, continued=True) in records


def test_zero_page_with_non_zero_fill_is_refused_by_8_2_and_kept_by_7_2() -> None:
    data = ram_stream(MEM_SIZE, ZeroPage("pc.ram", 0x1000, fill=7))
    error = main_error(data, profile=PROFILES["8.2"])
    assert str(error) == (
        f'main channel: section "ram" (id 2): byte {RAM_HEAD_LEN + len(MEM_SIZE.pack()):#x}: '
        "Found a zero page with value 7"
    )
    records, error = decode_until_error(data, profile=QEMU_7_2)
    assert records[-1] == ZeroPage("pc.ram", 0x1000, fill=7)
    assert error is not None and "stream ended" in error.message


def test_unknown_ram_flag_combination_is_refused() -> None:
    error = main_error(ram_stream(MEM_SIZE, be64(0x02 | 0x08)))
    assert "Unknown combination of migration flags: 0xa" in str(error)


# -- sections and footers ---------------------------------------------------------------


def test_missing_section_footer_is_refused() -> None:
    data = ram_stream(MEM_SIZE, EndOfSection(), SectionPart(RAM_SID))
    at = RAM_HEAD_LEN + len(MEM_SIZE.pack()) + 8
    assert str(main_error(data)) == (
        f'main channel: section "ram" (id 2): byte {at:#x}: Missing section footer for ram'
    )


def test_mismatched_footer_id_is_refused() -> None:
    data = ram_stream(MEM_SIZE, EndOfSection(), SectionFooter(3))
    at = RAM_HEAD_LEN + len(MEM_SIZE.pack()) + 8
    assert str(main_error(data)) == (
        f'main channel: section "ram" (id 2): byte {at:#x}: Mismatched section id in footer '
        "for ram -- read 0x3 expected 0x2"
    )


def test_part_for_a_section_never_started_is_refused() -> None:
    data = ram_stream(MEM_SIZE, EndOfSection(), SectionFooter(RAM_SID), SectionPart(7))
    at = RAM_HEAD_LEN + len(MEM_SIZE.pack()) + 8 + 5
    assert str(main_error(data)) == (
        f"main channel: byte {at:#x}: section id 7, expected a section opened by SECTION_START"
    )


def test_unknown_savevm_section_type_is_refused() -> None:
    data = ram_stream(MEM_SIZE, EndOfSection(), SectionFooter(RAM_SID), b"\x09")
    at = RAM_HEAD_LEN + len(MEM_SIZE.pack()) + 8 + 5
    assert str(main_error(data)) == f"main channel: byte {at:#x}: Unknown savevm section type 9"


def test_live_section_other_than_ram_is_refused() -> None:
    data = pack_all([FileHeader(), Configuration("pc"), SectionStart(3, "block", 0, 1)])
    assert "Unknown savevm section or instance 'block' 0" in str(main_error(data))


def test_ram_section_version_other_than_4_is_refused() -> None:
    data = pack_all([FileHeader(), Configuration("pc"), SectionStart(2, "ram", 0, 5)])
    assert "savevm: unsupported version 5 for 'ram' v4" in str(main_error(data))


# -- file header and configuration -------------------------------------------------------


def test_wrong_file_magic_is_refused() -> None:
    assert str(main_error(b"QEMU\x00\x00\x00\x03\x07")) == (
        'main channel: byte 0x0: file magic 0x51454d55, expected 0x5145564d ("QEVM")'
    )


def test_stream_version_2_is_refused_as_obsolete() -> None:
    assert str(main_error(FileHeader(2).pack())) == (
        "main channel: byte 0x4: SaveVM v2 format is obsolete and don't work anymore"
    )


def test_stream_version_4_is_refused_as_unsupported() -> None:
    assert str(main_error(FileHeader(4).pack())) == (
        "main channel: byte 0x4: Unsupported migration stream version 4"
    )


def test_missing_configuration_is_refused_unless_not_required() -> None:
    data = FileHeader().pack() + SectionStart(2, "ram", 0, 4).pack() + MEM_SIZE.pack()
    assert str(main_error(data)) == (
        "main channel: byte 0x8: record type 1, expected 0x07 (Configuration section missing)"
    )
    records, _ = decode_until_error(data, require_configuration=False)
    assert records[1:3] == [SectionStart(2, "ram", 0, 4), MEM_SIZE]


def test_unknown_configuration_subsection_is_refused() -> None:
    data = Configuration("pc").pack() + b"\x05" + counted_string("configuration/x") + be32(1)
    error = main_error(FileHeader().pack() + data)
    assert "unknown subsection 'configuration/x' of the configuration section" in str(error)


# -- commands ---------------------------------------------------------------------------------


def commands_stream(raw: bytes) -> bytes:
    return pack_all([FileHeader(), Configuration("pc")]) + raw


def test_unknown_command_is_refused() -> None:
    data = commands_stream(b"\x08" + be16(12) + be16(0))
    # The position is the command field, after the 0x08 type byte at 0xf.
    assert str(main_error(data)) == "main channel: byte 0x10: MIG_CMD 0xc unknown (len 0x0)"
    data = commands_stream(b"\x08" + be16(0) + be16(0))
    assert "MIG_CMD 0x0 unknown" in str(main_error(data))


def test_command_with_a_bad_length_is_refused() -> None:
    data = commands_stream(b"\x08" + be16(Command.PING) + be16(3) + b"\0\0\1")
    assert str(main_error(data)) == (
        "main channel: byte 0x12: PING received bad command length 3 (expected 4)"
    )


def test_switchover_start_with_data_is_refused() -> None:
    data = commands_stream(b"\x08" + be16(Command.SWITCHOVER_START) + be16(1) + b"\0")
    assert "SWITCHOVER_START received bad command length 1 (expected 0)" in str(main_error(data))


def test_oversized_packaged_command_is_refused() -> None:
    data = commands_stream(VMCommand(Command.PACKAGED, be32(1 << 25)).pack())
    assert "PACKAGED length 0x2000000, expected at most 16777216" in str(main_error(data))


# -- vmdesc, EOF and truncation ------------------------------------------------------------------


class BoundedSource(BufferSource):
    """A BufferSource that fails the test if asked for more than `limit` bytes at once."""

    def __init__(self, data: bytes, limit: int) -> None:
        super().__init__(data)
        self.limit = limit

    def read_exact(self, n: int) -> bytes:
        assert n <= self.limit, f"decoder asked for {n} bytes at once"
        return super().read_exact(n)


def test_vmdesc_of_4_gib_is_refused_without_reading_it() -> None:
    data = pack_all([FileHeader(), Configuration("pc")]) + b"\x00\x06" + be32(0xFFFFFFFF)
    decoder = MainStreamDecoder(BoundedSource(data + bytes(64), 1 << 20))
    with pytest.raises(WireError) as info:
        list(decoder)
    assert str(info.value) == (
        "main channel: byte 0x11: vmdesc length 0xffffffff, expected at most 67108864 bytes"
    )


def test_something_other_than_vmdesc_after_eof_is_refused() -> None:
    data = pack_all([FileHeader(), Configuration("pc")]) + b"\x00\x04"
    assert str(main_error(data)) == (
        "main channel: byte 0x10: Expected vmdescription section, but got 4"
    )


def test_truncated_stream_says_truncated_and_where() -> None:
    data = ram_stream(MEM_SIZE, ZeroPage("pc.ram", 0).pack()[:5])
    at = RAM_HEAD_LEN + len(MEM_SIZE.pack())
    assert str(main_error(data)) == (
        f'main channel: section "ram" (id 2): byte {at:#x}: truncated RAM record header: '
        "needs 8 bytes (stream ended 3 bytes short of 8)"
    )


def test_stream_ending_between_records_says_where_eof_was_expected() -> None:
    data = ram_stream(MEM_SIZE, EndOfSection(), SectionFooter(RAM_SID))
    assert str(main_error(data)) == (
        f"main channel: byte {len(data):#x}: stream ended before QEMU_VM_EOF (expected record type)"
    )


def test_error_messages_never_lose_their_position() -> None:
    for data in (b"", b"QEVM", FileHeader().pack(), ram_stream(be64(0x04))):
        assert re.search(r"byte 0x[0-9a-f]+: ", str(main_error(data))), data
