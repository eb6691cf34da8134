"""Real QEMU 7.2 recordings: every record decodes and re-encodes byte for byte,
and what the decoder reports matches what QEMU said it sent (meta.json)."""

from __future__ import annotations

import hashlib
import json

from wire_support import Recording, pack_all

from multifd.wire import (
    INIT_SIZE,
    PACKET_HEADER_SIZE,
    PAGES_PER_PACKET,
    TARGET_PAGE_SIZE,
    Compression,
    Configuration,
    DeviceState,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    PacketLayout,
    Page,
    SectionFooter,
    SectionPart,
    SectionStart,
    VMDescription,
    ZeroPage,
)


def test_recording_bytes_match_the_recorded_sizes_and_hashes(recording: Recording) -> None:
    streams = [recording.main, *recording.channel_bytes]
    connections = recording.meta["connections"]
    assert len(streams) == len(connections)
    for data, conn in zip(streams, connections, strict=True):
        assert len(data) == conn["bytes"]
        assert hashlib.sha256(data).hexdigest() == conn["sha256"]


def test_main_stream_reencodes_byte_for_byte(recording: Recording) -> None:
    assert pack_all(recording.records) == recording.main


def test_every_main_record_reencodes_to_its_own_bytes(recording: Recording) -> None:
    offset = 0
    for record in recording.records:
        packed = record.pack()
        assert recording.main[offset : offset + len(packed)] == packed, record
        offset += len(packed)
    assert offset == len(recording.main)


def test_multifd_channels_reencode_byte_for_byte(recording: Recording) -> None:
    assert len(recording.channels) == recording.meta["channels"]
    for capture, data in zip(recording.channels, recording.channel_bytes, strict=True):
        assert capture.pack() == data


def test_main_stream_shape_is_header_configuration_ram_devices_eof_vmdesc(
    recording: Recording,
) -> None:
    records = recording.records
    assert records[0] == FileHeader(3)
    assert isinstance(records[1], Configuration)
    assert isinstance(records[2], SectionStart) and records[2].idstr == "ram"
    assert isinstance(records[3], MemSize)
    assert isinstance(records[-2], EndOfFile)
    assert isinstance(records[-1], VMDescription)


def test_machine_type_is_pc_i440fx_7_2_without_subsections(recording: Recording) -> None:
    config = recording.records[1]
    assert config == Configuration("pc-i440fx-7.2")
    assert config.capabilities == ()
    assert config.uuid is None


def test_exactly_one_ram_section_start_with_version_4(recording: Recording) -> None:
    starts = [r for r in recording.records if isinstance(r, SectionStart) and not r.full]
    assert len(starts) == 1
    assert (starts[0].idstr, starts[0].instance_id, starts[0].version_id) == ("ram", 0, 4)


def test_every_part_and_end_continues_the_ram_section(recording: Recording) -> None:
    ram = next(r for r in recording.records if isinstance(r, SectionStart))
    parts = [r for r in recording.records if isinstance(r, SectionPart)]
    assert parts, "QEMU sends at least the END section"
    assert {p.section_id for p in parts} == {ram.section_id}
    assert [p.end for p in parts] == [False] * (len(parts) - 1) + [True]


def test_every_section_has_one_footer(recording: Recording) -> None:
    records = recording.records
    opened = [r for r in records if isinstance(r, SectionStart | SectionPart | DeviceState)]
    footers = [r for r in records if isinstance(r, SectionFooter)]
    assert len(footers) == len(opened)
    eos = sum(isinstance(r, EndOfSection) for r in records)
    ram_sections = sum(isinstance(r, SectionStart | SectionPart) for r in records)
    assert eos == ram_sections


def test_mem_size_lists_the_i440fx_blocks_with_128_mib_of_ram(recording: Recording) -> None:
    mem_size = next(r for r in recording.records if isinstance(r, MemSize))
    assert recording.blocks["pc.ram"] == recording.meta["vm"]["mem_mb"] << 20
    assert {"pc.bios", "pc.rom"} <= set(recording.blocks)
    assert mem_size.total == sum(recording.blocks.values())
    assert all(length % TARGET_PAGE_SIZE == 0 for length in recording.blocks.values())


def test_zero_page_records_match_qemu_duplicate_counter(recording: Recording) -> None:
    zeros = [r for r in recording.records if isinstance(r, ZeroPage)]
    assert len(zeros) == recording.meta["query_migrate"]["ram"]["duplicate"]
    assert all(z.fill == 0 for z in zeros)
    # QEMU names the block once and then uses CONTINUE while it repeats.
    first_page = next(r for r in recording.records if isinstance(r, ZeroPage | Page))
    assert not first_page.continued
    assert any(z.continued for z in zeros)


def test_plain_precopy_pages_match_qemu_normal_counter(recording: Recording) -> None:
    pages = sum(isinstance(r, Page) for r in recording.records)
    if recording.meta["channels"] == 0:
        assert pages == recording.meta["query_migrate"]["ram"]["normal"]
    else:
        assert pages == 0, "with multifd, 7.2 sends normal pages on the channels only"


def test_device_sections_match_the_vmdesc_device_list(recording: Recording) -> None:
    devices = [r.header for r in recording.records if isinstance(r, DeviceState)]
    vmdesc = json.loads(recording.records[-1].json)
    assert vmdesc["page_size"] == TARGET_PAGE_SIZE
    listed = [(d["name"], d["instance_id"]) for d in vmdesc["devices"]]
    assert [(h.idstr, h.instance_id) for h in devices] == listed
    assert all(h.full for h in devices)
    assert devices[-1].idstr == "globalstate"


def test_channel_ids_are_exactly_zero_to_n_minus_one(multifd_recording: Recording) -> None:
    ids = [c.init.channel_id for c in multifd_recording.channels]
    count = multifd_recording.meta["channels"]
    assert sorted(ids) == list(range(count))
    assert all(c.init.uuid == bytes(16) for c in multifd_recording.channels)


def test_each_channel_has_one_sync_per_end_of_section(multifd_recording: Recording) -> None:
    eos = sum(isinstance(r, EndOfSection) for r in multifd_recording.records)
    assert eos >= 3
    assert [c.sync_count for c in multifd_recording.channels] == [eos] * len(
        multifd_recording.channels
    )


def test_multifd_packets_pass_qemu_checks_against_the_block_list(
    multifd_recording: Recording,
) -> None:
    normal = 0
    for capture in multifd_recording.channels:
        for packet, payload in capture.packets:
            assert packet.layout is PacketLayout.V7_2
            assert packet.pages_alloc == PAGES_PER_PACKET
            name, offsets = packet.check_pages(multifd_recording.blocks, Compression.NONE)
            assert len(offsets) == packet.normal_pages
            assert len(payload) == packet.normal_pages * TARGET_PAGE_SIZE
            if packet.normal_pages:
                assert name in multifd_recording.blocks
                assert all(o % TARGET_PAGE_SIZE == 0 for o in offsets.tolist())
            normal += packet.normal_pages
    assert normal >= multifd_recording.meta["query_migrate"]["ram"]["normal"]


def test_multifd_bytes_counter_is_headers_plus_payloads(multifd_recording: Recording) -> None:
    sent = sum(
        PACKET_HEADER_SIZE * len(c.packets) + sum(len(p) for _, p in c.packets)
        for c in multifd_recording.channels
    )
    assert sent == multifd_recording.meta["query_migrate"]["ram"]["multifd-bytes"]
    assert sent + INIT_SIZE * len(multifd_recording.channels) == sum(
        len(b) for b in multifd_recording.channel_bytes
    )


def test_stale_sync_packets_carry_no_payload(multifd_recording: Recording) -> None:
    """7.2 quirk (spec 3.5): an empty SYNC keeps the previous next_packet_size and
    block name; reading next_packet_size bytes would desynchronise the channel."""
    stale = [
        packet
        for capture in multifd_recording.channels
        for packet, payload in capture.packets
        if packet.normal_pages == 0 and packet.next_packet_size and payload == b""
    ]
    assert stale
    assert all(p.payload_length(Compression.NONE) == 0 for p in stale)
