"""Verified memory (capability x-verify): the destination compares a hash of every
page with the source's before it resumes, and the stream is unchanged without it."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from e2e_support import PAGE, Migration, write_pages

from multifd.memory import RAMBlock
from multifd.migration.params import MigrationConfigError, MigrationSettings
from multifd.migration.source import VERIFY_SECTION_ID, MigrationSource
from multifd.wire import DeviceState, MainStreamDecoder, SectionFooter, VMDescription, WireError
from multifd.wire.appstate import APP_STATE_IDSTR, read_app_state
from multifd.wire.reader import Reader
from multifd.wire.source import BufferSource
from multifd.wire.verify import (
    MAX_VERIFY_BLOCKS,
    VERIFY_IDSTR,
    BlockHashes,
    VerifySection,
    read_verify,
)

MiB = 1 << 20


@pytest.mark.parametrize("multifd", [True, False])
def test_verified_migration_reports_its_pages(
    migration: Callable[..., Migration], multifd: bool
) -> None:
    m = migration(sizes=(4 * MiB, 1 * MiB), capabilities={"x-verify": True, "multifd": multifd})
    src, dst = m.assert_completed()
    pages = (5 * MiB) // PAGE
    assert dst["x-verify"] == {"pages": pages, "mismatches": 0}
    assert src["x-verify"] == {"pages": pages}


def test_verified_migration_with_a_live_workload(migration: Callable[..., Migration]) -> None:
    m = migration(capabilities={"x-verify": True}, workload_rate=20_000)
    _, dst = m.assert_completed()
    assert dst["x-verify"]["mismatches"] == 0


def test_a_corrupted_page_fails_before_resume(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page that differs once everything has landed: the destination fails,
    names the block and the offsets, and never resumes; the next migration
    completes."""
    m = migration(sizes=(2 * MiB, 1 * MiB), capabilities={"x-verify": True})
    compare = m.destination._verify

    def corrupt_then_compare(section: VerifySection) -> None:
        write_pages(m.dst_blocks[1], [3, 7])
        compare(section)

    monkeypatch.setattr(m.destination, "_verify", corrupt_then_compare)
    src, dst = m.run()
    # No return path: the source finished its part; the destination refuses.
    assert src["status"] == "completed", src
    assert dst["status"] == "failed", dst
    error = dst["error-desc"]
    assert 'block "block1"' in error and "0x3000, 0x7000" in error, error
    assert "2 page(s) differ" in error, error
    assert dst["x-verify"] == {"pages": (3 * MiB) // PAGE, "mismatches": 2}
    assert m.resumed == []

    monkeypatch.undo()
    m.assert_completed()


def test_destination_wants_hashes_the_source_did_not_send(
    migration: Callable[..., Migration],
) -> None:
    m = migration()
    m.destination.set_capabilities({"x-verify": True})
    _, dst = m.run()
    assert dst["status"] == "failed"
    assert "x-verify" in dst["error-desc"] and "no page hashes" in dst["error-desc"]
    assert m.resumed == []


def _stream(tmp_path: Path, verify: bool) -> list:
    """The main stream of a plain migration to a file, decoded as a QEMU-like
    reader would (our app-state known, any other device section opaque)."""
    block = RAMBlock.anonymous("pc.ram", 1 * MiB)
    block.array[::PAGE] = 7
    path = tmp_path / f"stream-{verify}"
    source = MigrationSource([block], capabilities={"x-verify": verify})
    source.migrate(f"file:{path}")
    assert source.wait(30)["status"] == "completed"
    block.close()
    decoder = MainStreamDecoder(
        BufferSource(path.read_bytes()), known_devices={APP_STATE_IDSTR: read_app_state}
    )
    return list(decoder)


def test_stream_without_x_verify_has_no_verify_section(tmp_path: Path) -> None:
    plain = _stream(tmp_path, verify=False)
    verified = _stream(tmp_path, verify=True)

    def devices(records: list) -> list[str]:
        return [r.header.idstr for r in records if isinstance(r, DeviceState)]

    def described(records: list) -> list[str]:
        vmdesc = next(r for r in records if isinstance(r, VMDescription))
        return [d["name"] for d in json.loads(vmdesc.json)["devices"]]

    assert devices(plain) == described(plain) == [APP_STATE_IDSTR]
    # With it, the section is split out by the vmdesc like any QEMU device's.
    assert devices(verified) == described(verified) == [VERIFY_IDSTR, APP_STATE_IDSTR]

    # Apart from the verify section, the streams hold the same records.
    def others(records: list) -> list:
        return [
            r
            for r in records
            if not isinstance(r, DeviceState | VMDescription)
            and r != SectionFooter(VERIFY_SECTION_ID)
        ]

    assert others(plain) == others(verified)


def test_x_verify_is_listed_and_off_by_default() -> None:
    listed = {c["capability"]: c["state"] for c in MigrationSettings().query_capabilities()}
    assert listed["x-verify"] is False
    MigrationSettings({"x-verify": True})


def test_verify_section_round_trip() -> None:
    hashes = np.arange(5, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    section = VerifySection(2**64 - 1, (BlockHashes("pc.ram", hashes),))
    body = read_verify(Reader(BufferSource(section.body())))
    parsed = VerifySection.from_body(body)
    assert parsed.seed == section.seed
    assert parsed.blocks[0].name == "pc.ram"
    assert np.array_equal(parsed.blocks[0].hashes, hashes)


def test_verify_section_bounds_are_checked_before_allocating() -> None:
    """A block count or a page count off the wire claiming terabytes is refused
    from its header, without reading or allocating the hashes."""
    too_many = struct.pack(">QI", 0, MAX_VERIFY_BLOCKS + 1)
    with pytest.raises(WireError, match="verify block count"):
        read_verify(Reader(BufferSource(too_many)))
    terabytes = struct.pack(">QI", 0, 1) + b"\x06pc.ram" + struct.pack(">Q", 1 << 40)
    with pytest.raises(WireError, match=r'verify page count of block "pc\.ram"'):
        read_verify(Reader(BufferSource(terabytes)))


def test_x_verify_is_refused_towards_a_qemu_destination() -> None:
    """With a QEMU VM's device state the destination is a real QEMU, which would
    refuse our section: the source says so before starting."""
    block = RAMBlock.anonymous("pc.ram", 1 * MiB)
    source = MigrationSource([block], capabilities={"x-verify": True}, device_state=b"\x00")
    with pytest.raises(MigrationConfigError, match="x-verify needs a Python multifd destination"):
        source.migrate("tcp:127.0.0.1:1")
    # As QEMU's refusals after migrate began: failed, and nothing was sent.
    assert source.query()["status"] == "failed"
    block.close()
