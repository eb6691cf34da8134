"""`multifd analyze` on real QEMU 7.2 recordings: counts, checks, RAM rebuilt."""

from __future__ import annotations

import json
import lzma
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from multifd.analyze import analyze, load_recording
from multifd.cli import main
from multifd.wire import PACKET_HEADER_SIZE

FIXTURES = Path(__file__).parent.parent / "fixtures" / "qemu-7.2"
RECORDINGS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
PAGE_MAGIC = 0x50414745  # the mb guest's "EGAP" tag in every pattern word


def meta(name: str) -> dict:
    return json.loads((FIXTURES / name / "meta.json").read_text())


@pytest.mark.parametrize("name", RECORDINGS)
def test_counts_equal_qemus_own(name: str) -> None:
    result = analyze(load_recording(FIXTURES / name)).to_json()
    qemu = meta(name)
    assert result["ram"]["normal"] == qemu["query_migrate"]["ram"]["normal"]
    assert result["ram"]["duplicate"] == qemu["query_migrate"]["ram"]["duplicate"]
    assert result["ram"]["total"] == qemu["query_migrate"]["ram"]["total"]
    assert result["multifd_channels"] == qemu["channels"]
    assert result["machine_type"] == "pc-i440fx-7.2"
    assert result["errors"] == []
    assert all(check["ok"] for check in result["checks"]), result["checks"]


@pytest.mark.parametrize("name", [n for n in RECORDINGS if meta(n)["channels"]])
def test_channels_reported_by_id_with_their_bytes(name: str) -> None:
    qemu = meta(name)
    result = analyze(load_recording(FIXTURES / name)).to_json()
    assert [c["id"] for c in result["channels"]] == list(range(qemu["channels"]))
    by_accept = {c["accept_order"]: c for c in result["channels"]}
    for conn in qemu["connections"][1:]:
        assert by_accept[conn["idx"]]["bytes"] == conn["bytes"]
    # every EOS is matched by exactly one SYNC packet on every channel
    assert {c["sync_packets"] for c in result["channels"]} == {result["rounds"]}
    assert sum(c["pages"] for c in result["channels"]) == (
        result["ram"]["normal"] + result["ram"]["repeated"]
    )


def test_extracted_ram_holds_the_guest_pattern(tmp_path: Path) -> None:
    analyze(load_recording(FIXTURES / "mf4-mb"), extract=tmp_path)
    blocks = json.loads((tmp_path / "blocks.json").read_text())
    files = {b["name"]: tmp_path / b["file"] for b in blocks}
    assert files["/rom@etc/acpi/tables"].name == "%2From@etc%2Facpi%2Ftables"
    for block in blocks:
        assert files[block["name"]].stat().st_size == block["used_length"]
    ram = np.fromfile(files["pc.ram"], dtype="<u8")
    # 32 MiB at 16 MiB: 8192 pages of 512 words (page index, "EGAP"); word 1 of
    # each page in the 2 MiB hot set carries the guest's bump counter.
    region = ram[(16 << 20) // 8 : (48 << 20) // 8].reshape(8192, 512)
    assert np.all(region >> 32 == PAGE_MAGIC)
    index = (region & 0xFFFFFFFF).astype(np.int64)
    expected = np.arange(8192)[:, None]
    assert np.all(np.delete(index, 1, axis=1) == expected)
    bumps = index[:, 1] - expected[:, 0]
    assert np.all(bumps[512:] == 0)
    hot = bumps[:512]
    assert hot.min() > 0 and hot.max() - hot.min() <= 1


def test_cli_json_has_the_promised_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(FIXTURES / "mf2-nokernel"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("machine_type", "multifd_channels", "rounds", "ram", "blocks", "channels"):
        assert key in out
    assert set(out["ram"]) >= {"normal", "duplicate", "total"}
    assert {"name", "used_length"} <= set(out["blocks"][0])
    assert {"id", "packets", "sync_packets", "pages", "bytes"} <= set(out["channels"][0])
    assert out["device_sections"][0] == "timer"
    assert out["errors"] == []


def test_cli_report_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(FIXTURES / "mf4-mb")]) == 0
    out = capsys.readouterr().out
    assert "pc-i440fx-7.2" in out
    assert "8820 normal" in out and "24591 zero" in out
    assert "multifd channels (by id)" in out
    assert "globalstate" in out


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    target.mkdir()
    for f in (FIXTURES / name).glob("conn*.bin.xz"):
        (target / f.name[:-3]).write_bytes(lzma.decompress(f.read_bytes()))
    return target


def test_offset_out_of_range_is_reported_with_channel_and_packet(tmp_path: Path) -> None:
    folder = _copy("mf2-nokernel", tmp_path)
    conn = folder / "conn1.bin"
    data = bytearray(conn.read_bytes())
    # packet 1 is the first data packet; its offset[0] sits at byte 320 of its header
    slot = 64 + PACKET_HEADER_SIZE + 320
    data[slot : slot + 8] = (0x7FFFF000).to_bytes(8, "big")
    conn.write_bytes(bytes(data))
    result = analyze(load_recording(folder))
    assert result.errors, "a bad offset must be reported"
    assert "packet 1" in result.errors[0]
    assert "offset too long" in result.errors[0]
    assert "beyond block" in result.errors[0]
    assert not next(c for c in result.checks if c.name == "offsets").ok


def test_truncated_channel_reports_the_missing_sync(tmp_path: Path) -> None:
    folder = _copy("mf2-nokernel", tmp_path)
    conn = folder / "conn2.bin"
    conn.write_bytes(conn.read_bytes()[:64])
    result = analyze(load_recording(folder))
    assert any("stream ended before the SYNC of round 0" in e for e in result.errors)
    assert not next(c for c in result.checks if c.name == "sync").ok


def test_single_main_stream_file(tmp_path: Path) -> None:
    main_file = tmp_path / "stream.bin"
    main_file.write_bytes(
        lzma.decompress((FIXTURES / "plain-nokernel" / "conn0.bin.xz").read_bytes())
    )
    result = analyze(load_recording(main_file))
    assert result.normal == 111 and result.duplicate == 32787
    assert result.sync_mode is None


def test_folder_without_main_channel_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(FIXTURES / "mf2-nokernel" / "conn1.bin.xz", tmp_path)
    assert main(["analyze", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no conn0.bin or conn0.bin.xz (the main channel)" in err
    assert str(tmp_path) in err


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("afile", "exists and is not a folder"),
        ("afile/sub", "cannot be created: {tmp}/afile is not a folder"),
        ("full", "is not empty (give a new or empty folder: nothing is overwritten)"),
    ],
)
def test_extract_folder_is_refused_before_the_recording_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], target: str, problem: str
) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "pc.ram").write_text("mine")
    # The recording does not exist: the --extract problem is the one reported,
    # so it was found before any reading or decoding.
    argv = ["analyze", str(tmp_path / "no-such-recording"), "--extract", str(tmp_path / target)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == (
        f"multifd analyze: error: --extract {tmp_path / target} {problem.format(tmp=tmp_path)}\n"
    )
    assert (tmp_path / "full" / "pc.ram").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full"]


def test_extract_folder_that_is_not_writable_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # root may write anywhere: the permission is what os.access answers.
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real(p, mode))
    recording = str(FIXTURES / "mf2-nokernel")
    assert main(["analyze", recording, "--extract", str(locked)]) == 2
    assert (
        capsys.readouterr().err == f"multifd analyze: error: --extract {locked} is not writable\n"
    )
    assert main(["analyze", recording, "--extract", str(locked / "new")]) == 2
    assert capsys.readouterr().err == (
        f"multifd analyze: error: --extract {locked / 'new'} cannot be created: "
        f"{locked} is not writable\n"
    )
    assert not any(locked.iterdir())


def test_extract_creates_a_new_folder_with_its_parents(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper"
    analyze(load_recording(FIXTURES / "mf2-nokernel"), extract=target)
    names = {b["file"] for b in json.loads((target / "blocks.json").read_text())}
    assert names | {"blocks.json"} == {p.name for p in target.iterdir()}


def test_library_refuses_an_extract_file_before_decoding(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        analyze(load_recording(FIXTURES / "mf2-nokernel"), extract=afile)
