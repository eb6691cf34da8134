"""Our own device sections (app-state, verify) when they come split from the
stream's tail, after an opaque QEMU device section: their bodies were never
read by their own reader, so parsing them must refuse bad ones with a
`WireError`. Found by the atheris harness (tests/fuzz): `from_body` raised
struct.error, IndexError or UnicodeDecodeError, which the destination
reported as an "internal error"."""

from __future__ import annotations

import numpy as np
import pytest
from wire_support import decode_main, pack_all

from multifd.wire import (
    Configuration,
    DeviceState,
    EndOfFile,
    FileHeader,
    MainRecord,
    SectionFooter,
    SectionStart,
    Where,
    WireError,
)
from multifd.wire.appstate import APP_STATE_IDSTR, AppState, read_app_state
from multifd.wire.reader import be32, be64, counted_string
from multifd.wire.verify import VERIFY_IDSTR, BlockHashes, VerifySection, read_verify

KNOWN = {APP_STATE_IDSTR: read_app_state, VERIFY_IDSTR: read_verify}
WHERE = Where(section='section "multifd/app-state" (id 6)')


def after_opaque_section(idstr: str, body: bytes) -> DeviceState:
    """Decode a stream where our section follows a QEMU device ("timer"), and
    return our section as the decoder split it from the tail."""
    timer = SectionStart(5, "timer", 0, 2, full=True)
    ours = SectionStart(6, idstr, 0, 1, full=True)
    records: list[MainRecord] = [
        FileHeader(),
        Configuration("pc-i440fx-7.2"),
        DeviceState(timer, b"\x01\x02\x03"),
        SectionFooter(5),
        DeviceState(ours, body),
        SectionFooter(6),
        EndOfFile(),
    ]
    decoded = decode_main(pack_all(records), known_devices=KNOWN)
    assert decoded == records  # the split does not look inside our body
    section = decoded[4]
    assert isinstance(section, DeviceState)
    return section


def test_a_good_app_state_after_an_opaque_section_parses() -> None:
    app = AppState(b"workload", 42)
    section = after_opaque_section(APP_STATE_IDSTR, app.body())
    assert AppState.from_body(section.data) == app


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\x00\x01", "truncated app-state header: needs 12 bytes, the section has 2"),
        (be64(1) + be32(9) + b"short", "app-state length 9, expected 5 (the bytes after"),
        (be64(1) + be32(1) + b"long", "app-state length 1, expected 4 (the bytes after"),
    ],
)
def test_a_bad_app_state_after_an_opaque_section_is_a_wire_error(body: bytes, message: str) -> None:
    section = after_opaque_section(APP_STATE_IDSTR, body)
    with pytest.raises(WireError) as info:
        AppState.from_body(section.data, WHERE)
    assert message in str(info.value)
    assert str(info.value).startswith('main channel: section "multifd/app-state" (id 6): ')


def test_a_good_verify_section_after_an_opaque_section_parses() -> None:
    verify = VerifySection(3, (BlockHashes("pc.ram", np.arange(5, dtype=np.uint64)),))
    section = after_opaque_section(VERIFY_IDSTR, verify.body())
    parsed = VerifySection.from_body(section.data)
    assert parsed.seed == 3
    assert parsed.blocks[0].name == "pc.ram"
    assert parsed.blocks[0].hashes.tolist() == [0, 1, 2, 3, 4]


HEAD = be64(7) + be32(1)  # seed, one block


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "truncated verify header"),
        (HEAD + b"\x02\x93\x94" + be64(0), "verify block name"),  # not UTF-8
        (HEAD + counted_string("pc.ram") + be64(4) + bytes(8), "truncated page hashes"),
        (HEAD + counted_string("pc.ram") + be64(1) + bytes(8) + b"!", "1 bytes after its hashes"),
        (be64(7) + be32(5000), "verify block count 0x1388, expected at most 4096"),
    ],
)
def test_a_bad_verify_section_after_an_opaque_section_is_a_wire_error(
    body: bytes, message: str
) -> None:
    section = after_opaque_section(VERIFY_IDSTR, body)
    with pytest.raises(WireError, match=message):
        VerifySection.from_body(section.data)
