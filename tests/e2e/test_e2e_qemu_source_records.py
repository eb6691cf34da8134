"""What a QEMU 7.2 source sends with capabilities beyond multifd, from a fake
source on the main channel (plain precopy): XBZRLE and COMPRESS_PAGE records
land and are counted apart from `normal`, as QEMU's source counts them; bad
ones, postcopy's advice and x-ignore-shared are refused with the place named.
The same against a real QEMU: tests/qemu/test_qemu_source_capabilities.py."""

from __future__ import annotations

import socket
import zlib
from pathlib import Path

import numpy as np
import pytest

from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.wire import (
    Command,
    CompressedPage,
    Configuration,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    Page,
    RamBlockEntry,
    SectionFooter,
    SectionPart,
    SectionStart,
    VMCommand,
    XbzrlePage,
)

SIZE = 16 * 4096
SECTION = 2
MACHINE = "pc-i440fx-7.2"


def _ram_start() -> bytes:
    return (
        SectionStart(SECTION, "ram", 0, 4).pack()
        + MemSize((RamBlockEntry("pc.ram", SIZE),)).pack()
        + EndOfSection().pack()
        + SectionFooter(SECTION).pack()
    )


def _ram_end(records: bytes) -> bytes:
    return (
        SectionPart(SECTION, end=True).pack()
        + records
        + EndOfSection().pack()
        + SectionFooter(SECTION).pack()
        + EndOfFile().pack()
    )


def _migrate(
    tmp_path: Path,
    body: bytes,
    capabilities: tuple[str, ...] = (),
    *,
    uuid: bytes | None = None,
    our_uuid: bytes = bytes(16),
) -> tuple[dict, np.ndarray]:
    """`body` after the header and configuration (with the source's `uuid` if
    given, as validate-uuid sends it), sent to a destination with one 16-page
    block; returns its query-migrate and the block's bytes."""
    block = RAMBlock.anonymous("pc.ram", SIZE)
    destination = MigrationDestination([block], uuid=our_uuid)
    try:
        uri = destination.incoming(f"unix:{tmp_path}/main.sock")
        with socket.socket(socket.AF_UNIX) as peer:
            peer.connect(uri.removeprefix("unix:"))
            config = Configuration.build(MACHINE, capabilities=capabilities, uuid=uuid)
            try:
                peer.sendall(FileHeader().pack() + config.pack() + body)
                peer.shutdown(socket.SHUT_WR)  # the end of the stream, after EOF
            except (BrokenPipeError, ConnectionResetError):  # refused before reading it all
                pass
            info = destination.wait(10)
        return info, np.array(block.array)
    finally:
        destination.cancel()
        block.close()


def _delta(*runs: tuple[int, bytes]) -> bytes:
    """An XBZRLE delta from (unchanged bytes, new bytes) runs, each count below 128."""
    return b"".join(bytes([skip, len(new)]) + new for skip, new in runs)


def test_xbzrle_and_compressed_pages_land_and_are_counted_apart(tmp_path: Path) -> None:
    first = bytes(range(256)) * 16
    records = (
        Page("pc.ram", 0x1000, first).pack()
        + XbzrlePage("pc.ram", 0x1000, _delta((4, b"ab"), (10, b"z")), continued=True).pack()
        + CompressedPage("pc.ram", 0x3000, zlib.compress(b"\x07" * 4096), True).pack()
    )
    info, ram = _migrate(tmp_path, _ram_start() + _ram_end(records))
    assert info["status"] == "completed", info
    expected = bytearray(first)
    expected[4:6] = b"ab"
    expected[16:17] = b"z"
    assert ram[0x1000:0x2000].tobytes() == bytes(expected)
    assert ram[0x3000:0x4000].tobytes() == b"\x07" * 4096
    # QEMU's source counts XBZRLE and compressed pages apart from `normal`.
    assert info["x-ram"]["normal"] == 1
    assert info["x-xbzrle"] == {"pages": 1, "encoded-bytes": 7}
    assert info["x-compression"]["pages"] == 1


@pytest.mark.parametrize(
    ("delta", "problem"),
    [
        (bytes([0x81, 0x40, 1]) + b"x", "zero run overflows the page (to 8193 of 4096) at byte 0"),
        (bytes([0, 0, 0]), "bad data run at byte 1"),
        (bytes([0, 0]), "ends before a data run at byte 1"),
        (bytes([0, 0x81, 0x20]) + b"x" * 8, "data run overflows the page (to 4097 of 4096)"),
        (bytes([0, 8]) + b"x" * 4, "data run of 8 bytes runs past the delta's end at byte 1"),
        (bytes([4]), "ends inside a zero run at byte 0 of 1"),
        (bytes([0, 0xFF, 0xFF]), "bad data run at byte 1"),
    ],
)
def test_a_bad_xbzrle_delta_names_its_page(tmp_path: Path, delta: bytes, problem: str) -> None:
    records = XbzrlePage("pc.ram", 0x2000, delta).pack()
    info, _ = _migrate(tmp_path, _ram_start() + _ram_end(records))
    assert info["status"] == "failed", info
    error = info["error-desc"]
    assert 'XBZRLE delta of page 0x2000 in block "pc.ram"' in error, error
    assert problem in error, error
    assert error.startswith('main channel: section "ram" (id 2): byte 0x'), error


def test_a_compressed_page_inflating_beyond_a_page_is_refused(tmp_path: Path) -> None:
    records = CompressedPage("pc.ram", 0x2000, zlib.compress(bytes(1 << 20))).pack()
    info, _ = _migrate(tmp_path, _ram_start() + _ram_end(records))
    assert info["status"] == "failed", info
    assert (
        'compressed page 0x2000 of block "pc.ram": inflates to more than a page'
        in info["error-desc"]
    ), info


def test_postcopy_advice_is_refused_by_name(tmp_path: Path) -> None:
    """QEMU's source with postcopy-ram sends a 16-byte advice first thing."""
    advise = VMCommand(Command.POSTCOPY_ADVISE, (4096).to_bytes(8, "big") * 2).pack()
    info, _ = _migrate(tmp_path, advise + _ram_start() + _ram_end(b""))
    assert info["status"] == "failed", info
    assert "the source has postcopy-ram on" in info["error-desc"], info
    assert "RAM postcopy is disabled but have 16 byte advise" in info["error-desc"], info


def test_an_empty_postcopy_advice_is_taken(tmp_path: Path) -> None:
    """dirty-bitmaps without postcopy-ram advises with no data: QEMU carries on."""
    advise = VMCommand(Command.POSTCOPY_ADVISE).pack()
    info, _ = _migrate(tmp_path, advise + _ram_start() + _ram_end(b""))
    assert info["status"] == "completed", info


@pytest.mark.parametrize(
    ("capability", "error"),
    [
        ("x-ignore-shared", "Capability x-ignore-shared is off, but received capability is on"),
        ("x-no-such-thing", "Received unknown capability x-no-such-thing"),
    ],
)
def test_a_capability_the_source_requires_is_refused(
    tmp_path: Path, capability: str, error: str
) -> None:
    """x-ignore-shared leaves shared RAM out of the stream: taken silently, the
    destination would complete with that memory missing."""
    info, _ = _migrate(tmp_path, _ram_start() + _ram_end(b""), capabilities=(capability,))
    assert info["status"] == "failed", info
    assert error in info["error-desc"], info


SOURCE_UUID = bytes.fromhex("6f1c52c8f4a34d0c9a3be7e1a0b2c3d4")


def test_the_source_uuid_is_checked_whenever_ours_is_set(tmp_path: Path) -> None:
    """As QEMU's destination: a source with validate-uuid sends its UUID, and a
    destination whose own UUID is set refuses another, whatever its own
    validate-uuid (which only tells a source to send it)."""
    body = _ram_start() + _ram_end(b"")
    info, _ = _migrate(tmp_path, body, uuid=SOURCE_UUID, our_uuid=SOURCE_UUID)
    assert info["status"] == "completed", info
    info, _ = _migrate(tmp_path, body, uuid=SOURCE_UUID, our_uuid=b"\1" * 16)
    assert info["status"] == "failed", info
    assert (
        "UUID received is 6f1c52c8-f4a3-4d0c-9a3b-e7e1a0b2c3d4 and local is "
        "01010101-0101-0101-0101-010101010101. Mismatch in UUIDs"
    ) in info["error-desc"], info


def test_a_source_uuid_with_ours_unset_is_only_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    info, _ = _migrate(tmp_path, _ram_start() + _ram_end(b""), uuid=SOURCE_UUID)
    assert info["status"] == "completed", info
    assert (
        "UUID is received 6f1c52c8-f4a3-4d0c-9a3b-e7e1a0b2c3d4, but local uuid isn't set"
        in caplog.text
    )
