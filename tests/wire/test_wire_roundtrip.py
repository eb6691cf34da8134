"""Property tests: every valid record encodes, decodes to an equal record, and
encodes again to the same bytes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_support import (
    PROPERTY,
    PageRecordMaker,
    SyntheticStream,
    block_lists,
    configurations,
    decode_main,
    main_streams,
    multifd_inits,
    multifd_packets,
    u32,
    vm_commands,
)

from multifd.wire import (
    INIT_SIZE,
    PACKET_HEADER_SIZE,
    PAGES_PER_PACKET,
    TARGET_PAGE_SIZE,
    BufferSource,
    Compression,
    Configuration,
    EndOfSection,
    FileHeader,
    Hook,
    MainStreamDecoder,
    MemSize,
    MultifdFlush,
    MultiFDInit,
    MultiFDPacket,
    PacketFlag,
    PacketLayout,
    RamBlockEntry,
    RamRecord,
    RamRecordEncoder,
    RamStreamState,
    Reader,
    State,
    VMCommand,
    VMDescription,
    page_packet_headers,
)
from multifd.wire.stream import (
    read_command,
    read_configuration,
    read_file_header,
    read_vmdescription,
)

layouts = st.sampled_from(list(PacketLayout))


def _reader(data: bytes) -> tuple[Reader, BufferSource]:
    source = BufferSource(data)
    return Reader(source), source


def _read_ram_records(
    data: bytes, state: RamStreamState, count: int
) -> tuple[list[RamRecord], int]:
    reader, source = _reader(data)
    records = [state.read_record(reader) for _ in range(count)]
    return records, source.remaining


# -- main-channel records one type at a time ------------------------------------


def test_file_header_round_trips() -> None:
    data = FileHeader().pack()
    assert data == b"QEVM\x00\x00\x00\x03"
    reader, source = _reader(data)
    assert read_file_header(reader) == FileHeader()
    assert source.remaining == 0


@PROPERTY
@given(configurations())
def test_configuration_round_trips(config: Configuration) -> None:
    data = config.pack()
    assert data[0] == 0x07
    reader, _ = _reader(data[1:])
    decoded, next_type = read_configuration(reader)
    assert next_type is None  # the stream ended right after the configuration
    assert decoded == config
    assert decoded.pack() == data
    assert decoded.capabilities == config.capabilities
    assert decoded.uuid == config.uuid


@PROPERTY
@given(configurations(), st.sampled_from([0x00, 0x01, 0x08]))
def test_configuration_reports_the_type_byte_that_follows(config: Configuration, kind: int) -> None:
    reader, _ = _reader(config.pack()[1:] + bytes([kind]))
    decoded, next_type = read_configuration(reader)
    assert (decoded, next_type) == (config, kind)


@PROPERTY
@given(vm_commands())
def test_vm_command_round_trips(command: VMCommand) -> None:
    data = command.pack()
    reader, source = _reader(data[1:])
    decoded = read_command(reader)
    assert decoded == command
    assert decoded.pack() == data
    assert source.remaining == 0


@PROPERTY
@given(st.binary(max_size=512))
def test_vmdescription_round_trips(json_bytes: bytes) -> None:
    record = VMDescription(json_bytes)
    data = record.pack()
    reader, source = _reader(data[1:])
    assert read_vmdescription(reader) == record
    assert source.remaining == 0


@PROPERTY
@given(st.data(), st.booleans())
def test_mem_size_round_trips(data: st.DataObject, ignore_shared: bool) -> None:
    mem_size, page_size_blocks = data.draw(block_lists(ignore_shared=ignore_shared, max_blocks=8))
    assert mem_size.total % TARGET_PAGE_SIZE == 0
    state = RamStreamState(page_size_blocks=page_size_blocks, ignore_shared=ignore_shared)
    (decoded,), remaining = _read_ram_records(mem_size.pack(), state, 1)
    assert decoded == mem_size
    assert decoded.pack() == mem_size.pack()
    assert remaining == 0
    assert state.blocks == {b.name: b.used_length for b in mem_size.blocks}


@PROPERTY
@given(st.data())
def test_page_records_round_trip_with_and_without_continue(data: st.DataObject) -> None:
    mem_size, page_size_blocks = data.draw(block_lists())
    maker = PageRecordMaker(mem_size)
    pages = [maker.draw(data.draw) for _ in range(data.draw(st.integers(1, 8)))]
    records: list[RamRecord] = [mem_size, *pages]
    encoded = b"".join(r.pack() for r in records)
    state = RamStreamState(page_size_blocks=page_size_blocks)
    decoded, remaining = _read_ram_records(encoded, state, len(records))
    assert decoded == records
    assert b"".join(r.pack() for r in decoded) == encoded
    assert remaining == 0
    assert state.last_block == pages[-1].block


@PROPERTY
@given(st.sampled_from([EndOfSection(), MultifdFlush(), Hook()]))
def test_marker_records_round_trip(record: RamRecord) -> None:
    (decoded,), remaining = _read_ram_records(record.pack(), RamStreamState(), 1)
    assert decoded == record
    assert decoded.pack() == record.pack()
    assert remaining == 0


def test_ram_record_encoder_continues_only_on_a_repeated_block() -> None:
    encoder = RamRecordEncoder()
    records = [
        encoder.zero("a", 0),
        encoder.zero("a", 4096),
        encoder.page("b", 0, bytes(4096)),
        encoder.zero("b", 4096),
        encoder.zero("a", 8192),
    ]
    assert [r.continued for r in records] == [False, True, False, True, False]
    mem_size = MemSize((RamBlockEntry("a", 3 * 4096), RamBlockEntry("b", 3 * 4096)))
    encoded = mem_size.pack() + b"".join(r.pack() for r in records)
    decoded, _ = _read_ram_records(encoded, RamStreamState(), 1 + len(records))
    assert decoded[1:] == records


# -- whole main streams through MainStreamDecoder ---------------------------------


@PROPERTY
@given(main_streams())
def test_main_stream_round_trips_through_the_decoder(stream: SyntheticStream) -> None:
    data = stream.pack()
    decoded = decode_main(data, page_size_blocks=stream.page_size_blocks)
    assert decoded == stream.records
    assert b"".join(r.pack() for r in decoded) == data


@PROPERTY
@given(main_streams(devices=False))
def test_main_stream_without_devices_round_trips(stream: SyntheticStream) -> None:
    data = stream.pack()
    decoded = decode_main(data, page_size_blocks=stream.page_size_blocks)
    assert decoded == stream.records


@PROPERTY
@given(main_streams())
def test_decoder_keeps_the_configuration_and_ends_done(stream: SyntheticStream) -> None:
    decoder = MainStreamDecoder(
        BufferSource(stream.pack()), page_size_blocks=stream.page_size_blocks
    )
    records = list(decoder)
    assert decoder.configuration == records[1] == stream.records[1]
    assert decoder.state is State.DONE


# -- multifd channel records ----------------------------------------------------------


@PROPERTY
@given(multifd_inits())
def test_multifd_init_round_trips(init: MultiFDInit) -> None:
    data = init.pack()
    assert len(data) == INIT_SIZE
    assert data[:8] == b"\x11\x22\x33\x44\x00\x00\x00\x01"
    assert MultiFDInit.unpack(data) == init
    assert MultiFDInit.unpack(data).pack() == data


@PROPERTY
@given(st.data(), layouts)
def test_multifd_packet_round_trips_in_both_layouts(
    data: st.DataObject, layout: PacketLayout
) -> None:
    packet = data.draw(multifd_packets(layout))
    encoded = packet.pack()
    assert len(encoded) == PACKET_HEADER_SIZE
    decoded = MultiFDPacket.unpack(encoded, layout=layout)
    assert decoded == packet
    assert decoded.pack() == encoded


@PROPERTY
@given(multifd_packets(PacketLayout.V7_2))
def test_7_2_layout_leaves_bytes_32_to_63_zero(packet: MultiFDPacket) -> None:
    assert packet.pack()[32:64] == bytes(32)


@PROPERTY
@given(multifd_packets(PacketLayout.V9_0))
def test_9_0_layout_puts_zero_pages_at_byte_32(packet: MultiFDPacket) -> None:
    encoded = packet.pack()
    assert int.from_bytes(encoded[32:36], "big") == packet.zero_pages
    # A 7.2 receiver reads the same bytes and sees no zero pages (spec 3.2),
    # provided the flags are ones 7.2 knows (no QPL/UADK/QATZIP).
    encoded = replace(packet, flags=packet.flags & 0x0F).pack()
    as_7_2 = MultiFDPacket.unpack(encoded, layout=PacketLayout.V7_2)
    assert as_7_2.zero_pages == 0
    assert as_7_2.normal_pages == packet.normal_pages


@PROPERTY
@given(st.data(), layouts, st.sampled_from(list(Compression)))
def test_data_packet_offsets_survive_check_pages(
    data: st.DataObject, layout: PacketLayout, compression: Compression
) -> None:
    pages = data.draw(st.integers(1, 64))
    used_length = pages * TARGET_PAGE_SIZE
    normal = data.draw(st.lists(st.integers(0, pages - 1), max_size=PAGES_PER_PACKET // 2))
    zero: list[int] = []
    if layout is PacketLayout.V9_0:
        zero = data.draw(st.lists(st.integers(0, pages - 1), max_size=PAGES_PER_PACKET // 2))
    packet = MultiFDPacket.for_pages(
        "pc.ram",
        [p * TARGET_PAGE_SIZE for p in normal],
        zero_offsets=[p * TARGET_PAGE_SIZE for p in zero],
        flags=compression.flag | PacketFlag.SYNC,
        packet_num=data.draw(u32),
        payload_size=len(normal) * TARGET_PAGE_SIZE,
        layout=layout,
    )
    decoded = MultiFDPacket.unpack(packet.pack(), layout=layout)
    assert decoded == packet
    name, offsets = decoded.check_pages({"pc.ram": used_length}, compression)
    expected = [p * TARGET_PAGE_SIZE for p in normal + zero]
    assert offsets.tolist() == expected
    assert name == ("pc.ram" if expected else "")
    assert decoded.payload_length(Compression.NONE) == len(normal) * TARGET_PAGE_SIZE


@PROPERTY
@given(layouts, u32)
def test_sync_packet_round_trips_and_carries_no_pages(layout: PacketLayout, num: int) -> None:
    packet = MultiFDPacket.sync(num, layout=layout)
    decoded = MultiFDPacket.unpack(packet.pack(), layout=layout)
    assert decoded == packet
    assert decoded.is_sync and decoded.page_count == 0
    assert decoded.payload_length(Compression.ZLIB) == 0
    # No pages: QEMU looks at neither the block name nor the compression bits.
    name, offsets = decoded.check_pages({}, Compression.ZSTD)
    assert name == "" and len(offsets) == 0


@PROPERTY
@given(st.data(), layouts, st.sampled_from(list(Compression)))
def test_batch_headers_are_the_packets_for_pages_gives(
    data: st.DataObject, layout: PacketLayout, compression: Compression
) -> None:
    """page_packet_headers (the source's batch encoder) gives, row by row,
    exactly what building each packet alone gives: split at PAGES_PER_PACKET,
    numbered on, and each decodes with its own pages."""
    pages = data.draw(st.lists(st.integers(0, 1 << 20), min_size=1, max_size=3 * PAGES_PER_PACKET))
    offsets = np.array(pages, dtype=np.uint64) * TARGET_PAGE_SIZE
    first = data.draw(st.integers(0, (1 << 64) - 4))
    count = -(-len(pages) // PAGES_PER_PACKET)
    sizes = None
    if compression is not Compression.NONE:
        size = st.integers(1, 2 * PAGES_PER_PACKET * TARGET_PAGE_SIZE)  # QEMU's bound
        sizes = np.array(data.draw(st.lists(size, min_size=count, max_size=count)))
    name = data.draw(st.sampled_from(["pc.ram", "mem", "é" * 127]))
    headers = page_packet_headers(
        name, offsets, first, flags=compression.flag, payload_sizes=sizes, layout=layout
    )
    assert headers.shape == (count, PACKET_HEADER_SIZE)
    for i in range(count):
        part = offsets[i * PAGES_PER_PACKET : (i + 1) * PAGES_PER_PACKET]
        expected = MultiFDPacket.for_pages(
            name,
            part,
            flags=compression.flag,
            packet_num=first + i,
            payload_size=len(part) * TARGET_PAGE_SIZE if sizes is None else int(sizes[i]),
            layout=layout,
        ).pack()
        assert headers[i].tobytes() == expected
        decoded = MultiFDPacket.unpack(headers[i].tobytes(), layout=layout)
        assert decoded.check_pages({name: 1 << 33}, compression)[1].tolist() == part.tolist()


def test_batch_headers_refuse_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="at least one page"):
        page_packet_headers("pc.ram", np.array([], dtype=np.uint64), 0, flags=0)
