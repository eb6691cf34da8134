"""Splitting opaque device state with the vmdesc tail (spec 1.6)."""

from __future__ import annotations

import json

import pytest
from wire_support import Recording, decode_main, pack_all

from multifd.wire import (
    Configuration,
    DeviceState,
    EndOfFile,
    FileHeader,
    Reader,
    SectionFooter,
    SectionStart,
    VMDescription,
    Where,
    WireError,
    split_device_state,
)


def device_tail(recording: Recording, skip: int = 0) -> tuple[bytes, list]:
    """The main stream from its first (+ `skip`) FULL section to the end, and the
    records the decoder gave for it."""
    first = next(i for i, r in enumerate(recording.records) if isinstance(r, DeviceState))
    first += 2 * skip  # each device is a DeviceState and a SectionFooter
    return recording.main[recording.offset_of(first) :], recording.records[first:]


def test_split_of_a_real_tail_gives_the_decoders_sections(recording: Recording) -> None:
    tail, expected = device_tail(recording)
    records = split_device_state(tail)
    assert records == expected
    assert pack_all(records) == tail
    assert sum(isinstance(r, DeviceState) for r in records) == 31


def test_split_from_a_later_device_gives_the_same_sections(recording: Recording) -> None:
    tail, expected = device_tail(recording, skip=12)
    assert isinstance(expected[0], DeviceState)
    assert split_device_state(tail) == expected


def test_split_without_vmdesc_finds_the_same_sections(recording: Recording) -> None:
    tail, expected = device_tail(recording)
    vmdesc = expected[-1]
    assert isinstance(vmdesc, VMDescription)
    records = split_device_state(tail[: -len(vmdesc.pack())])
    assert records == expected[:-1]
    assert isinstance(records[-1], EndOfFile)


def test_split_of_a_tail_without_eof_is_refused(recording: Recording) -> None:
    tail, expected = device_tail(recording)
    without_eof = tail[: -len(expected[-1].pack()) - 1]
    with pytest.raises(WireError) as info:
        split_device_state(without_eof, Where(offset=0x1000))
    assert str(info.value) == (
        f"main channel: byte {0x1000 + len(without_eof):#x}: device state does not end with "
        "QEMU_VM_EOF (and an optional vmdesc JSON)"
    )


def test_split_of_an_empty_tail_is_refused() -> None:
    with pytest.raises(WireError, match="does not end with QEMU_VM_EOF"):
        split_device_state(b"")


def test_split_names_a_device_whose_footer_is_missing(recording: Recording) -> None:
    tail, expected = device_tail(recording)
    first = expected[0]
    assert isinstance(first, DeviceState)
    footer = SectionFooter(first.header.section_id).pack()
    broken = tail.replace(first.pack() + footer, first.pack() + b"\x7f" + footer[1:], 1)
    with pytest.raises(WireError) as info:
        split_device_state(broken)
    header = first.header
    assert f'device section "{header.idstr}" (id {header.section_id}): no footer' in str(info.value)


def test_split_refuses_a_record_that_is_not_a_full_section() -> None:
    tail = SectionStart(3, "ram", 0, 4).pack() + b"\x00"
    with pytest.raises(WireError, match=r"byte 0x0: record type 1, expected 0x04"):
        split_device_state(tail)


def synthetic_tail(vmdesc_json: bytes) -> bytes:
    timer = DeviceState(SectionStart(5, "timer", 0, 2, full=True), b"\x01\x02")
    return pack_all([timer, SectionFooter(5), EndOfFile(), VMDescription(vmdesc_json)])


@pytest.mark.parametrize(
    "vmdesc_json",
    [
        b'{"devices": [{"name": "timer", "instance_id": Infinity}]}',
        b'{"devices": [{"name": "timer", "instance_id": NaN}]}',
        b'{"devices": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"devices": {"timer": 0}}',
        b'{"devices": "timer"}',
        b"{not json",
    ],
    ids=["infinity", "nan", "deeply-nested", "dict", "string", "garbage"],
)
def test_hostile_vmdesc_json_falls_back_to_footer_search(vmdesc_json: bytes) -> None:
    records = split_device_state(synthetic_tail(vmdesc_json))
    assert records[0] == DeviceState(SectionStart(5, "timer", 0, 2, full=True), b"\x01\x02")
    assert records[-1] == VMDescription(vmdesc_json)


def test_vmdesc_device_list_picks_the_real_footer_over_a_lookalike() -> None:
    # The first body contains "7e <id> 04 …" that looks like a footer and the
    # header of the next device; only the vmdesc tells which one is real.
    second = SectionStart(6, "rtc", 0, 1, full=True)
    lookalike = SectionFooter(5).pack() + SectionStart(6, "other", 0, 1, full=True).pack()
    records = [
        DeviceState(SectionStart(5, "timer", 0, 2, full=True), b"\x01" + lookalike + b"\x02"),
        SectionFooter(5),
        DeviceState(second, b"\x03"),
        SectionFooter(6),
        EndOfFile(),
    ]
    listed = [{"name": "timer", "instance_id": 0}, {"name": "rtc", "instance_id": 0}]
    records.append(VMDescription(json.dumps({"devices": listed}).encode()))
    assert split_device_state(pack_all(records)) == records


def test_decoder_splits_opaque_devices_and_stops_after_the_vmdesc() -> None:
    timer = DeviceState(SectionStart(5, "timer", 0, 2, full=True), b"\x01\x02")
    records = [FileHeader(), Configuration("pc"), timer, SectionFooter(5), EndOfFile()]
    vmdesc = VMDescription(b'{"devices": [{"name": "timer", "instance_id": 0}]}')
    assert decode_main(pack_all([*records, vmdesc])) == [*records, vmdesc]
    assert decode_main(pack_all(records)) == records


def test_decoder_refuses_device_state_beyond_its_limit() -> None:
    timer = DeviceState(SectionStart(5, "timer", 0, 2, full=True), bytes(100))
    data = pack_all([FileHeader(), Configuration("pc"), timer, SectionFooter(5), EndOfFile()])
    with pytest.raises(WireError, match=r"^main channel: byte 0xf: device state too large"):
        decode_main(data, max_device_state=64)


def test_decoder_reads_known_devices_with_their_reader() -> None:
    def read_timer(reader: Reader) -> bytes:
        return reader.take(2, "timer state")

    timer = DeviceState(SectionStart(5, "timer", 0, 2, full=True), b"\x7e\x00")
    records = [FileHeader(), Configuration("pc"), timer, SectionFooter(5), EndOfFile()]
    assert decode_main(pack_all(records), known_devices={"timer": read_timer}) == records
    bad = pack_all(records[:3]) + SectionFooter(6).pack() + b"\x00"
    with pytest.raises(WireError, match=r"Mismatched section id in footer for timer -- read 0x6"):
        decode_main(bad, known_devices={"timer": read_timer})
    missing = pack_all(records[:3]) + b"\x00"
    with pytest.raises(WireError, match=r"Missing section footer for timer"):
        decode_main(missing, known_devices={"timer": read_timer})


def test_vmdesc_after_eof_may_be_absent_or_any_bytes() -> None:
    head = [FileHeader(), Configuration("pc"), EndOfFile()]
    assert decode_main(pack_all(head)) == head
    odd = VMDescription(b"\x00\x01 not json")
    assert decode_main(pack_all([*head, odd])) == [*head, odd]
