"""`multifd analyze` on recordings in every shape a user hands it: channels
lost, files broken, hostile block names and sizes, an extraction that fails."""

from __future__ import annotations

import errno
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from multifd.analyze import analyze, load_recording
from multifd.cli import main
from multifd.wire import (
    Configuration,
    EndOfFile,
    EndOfSection,
    FileHeader,
    MemSize,
    Page,
    RamBlockEntry,
    SectionFooter,
    SectionStart,
    XbzrlePage,
    ZeroPage,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "qemu-7.2"
SRC = Path(__file__).resolve().parents[2] / "src"


def _stream(blocks: dict[str, int], *records: object) -> bytes:
    """A whole main stream: one ram section holding `records`, then EOF."""
    mem_size = MemSize(tuple(RamBlockEntry(n, length) for n, length in blocks.items()))
    return b"".join(
        r.pack()  # type: ignore[attr-defined]
        for r in (
            FileHeader(),
            Configuration.build("pc-i440fx-7.2"),
            SectionStart(2, "ram", 0, 4),
            mem_size,
            *records,
            EndOfSection(),
            SectionFooter(2),
            EndOfFile(),
        )
    )


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["analyze", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_lost_channel_is_reported_with_what_it_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("conn0.bin.xz", "conn1.bin.xz", "conn3.bin.xz", "conn4.bin.xz"):
        shutil.copy(FIXTURES / "mf4-mb" / name, tmp_path)
    status, out, err = _cli([str(tmp_path), "--json"], capsys)
    assert status == 1
    result = json.loads(out)
    assert result["multifd_channels"] == 3  # the others are still decoded
    assert result["missing_connections"] == ["conn2.bin"]
    assert result["unsent_pages"] > 0
    coverage = next(c for c in result["checks"] if c["name"] == "coverage")
    assert not coverage["ok"] and "lost with conn2.bin" in coverage["detail"]
    assert "conn2.bin: missing" in err


def test_the_main_stream_alone_of_a_multifd_migration_says_its_channels_are_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(FIXTURES / "mf4-mb" / "conn0.bin.xz", tmp_path)
    status, out, err = _cli([str(tmp_path), "--json"], capsys)
    assert status == 1
    coverage = next(c for c in json.loads(out)["checks"] if c["name"] == "coverage")
    # 8307 pages with data went over the channels; the main stream has none.
    assert coverage["detail"].startswith("8307 of 32898 pages (32.4 MiB) never sent")
    assert "were the multifd channels (conn1.bin …) recorded?" in coverage["detail"]
    assert err == f"multifd analyze: check failed: coverage: {coverage['detail']}\n"


def test_a_complete_recording_sent_every_page() -> None:
    result = analyze(load_recording(FIXTURES / "mf2-mb-bw50M"))
    assert result.unsent_pages == 0
    assert next(c for c in result.checks if c.name == "coverage").ok


def _empty(tmp: Path) -> Path:
    (tmp / "empty.bin").write_bytes(b"")
    return tmp / "empty.bin"


def _bad_xz(tmp: Path) -> Path:
    (tmp / "rec").mkdir()
    data = (FIXTURES / "mf2-nokernel" / "conn0.bin.xz").read_bytes()
    (tmp / "rec" / "conn0.bin.xz").write_bytes(data[: len(data) // 2])
    return tmp / "rec"


def _xz_and_more(tmp: Path) -> Path:
    (tmp / "rec").mkdir()
    data = (FIXTURES / "mf2-nokernel" / "conn0.bin.xz").read_bytes()
    (tmp / "rec" / "conn0.bin.xz").write_bytes(data + b"junk")
    return tmp / "rec"


def _no_main(tmp: Path) -> Path:
    (tmp / "rec").mkdir()
    shutil.copy(FIXTURES / "mf2-nokernel" / "conn1.bin.xz", tmp / "rec")
    return tmp / "rec"


def _truncated_channel(tmp: Path) -> Path:
    (tmp / "rec").mkdir()
    for f in (FIXTURES / "mf2-nokernel").glob("conn*.bin.xz"):
        data = lzma.decompress(f.read_bytes())
        if f.name == "conn1.bin.xz":
            data = data[: 64 + 2 * 1344 + 100]  # inside packet 1's payload
        (tmp / "rec" / f.name.removesuffix(".xz")).write_bytes(data)
    return tmp / "rec"


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda tmp: tmp / "nothing-here", "nothing-here: no such file or folder"),
        (_empty, "empty.bin: main channel: byte 0x0: truncated file magic"),
        (_bad_xz, "conn0.bin.xz: byte 0x2026: the xz stream is truncated"),
        (_xz_and_more, "conn0.bin.xz: byte 0x404c: bytes after the end of the xz stream"),
        (_no_main, "no conn0.bin or conn0.bin.xz (the main channel)"),
        (
            _truncated_channel,
            "conn1.bin: channel 0: packet 1: byte 0xac0: truncated packet payload",
        ),
    ],
    ids=[
        "no such path",
        "empty file",
        "truncated xz",
        "xz then junk",
        "no conn0",
        "truncated packet",
    ],
)
def test_a_bad_recording_exits_1_naming_file_and_offset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: object, says: str
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    status, out, err = _cli([str(path), "--json"], capsys)
    assert status == 1
    result = json.loads(out)  # a script gets its JSON object all the same
    assert any(says in e for e in result["errors"]), result["errors"]
    assert says in err and "Traceback" not in err
    assert all(line.startswith("multifd analyze: error: ") for line in err.splitlines())
    status, out, err = _cli([str(path)], capsys)
    assert status == 1
    assert says in out + err


def test_hostile_block_names_stay_inside_the_folder(tmp_path: Path) -> None:
    names = ["..", ".", "blocks.json", "../../escape", "0000:00:02.0/vga.vram", "é" * 127]
    records = [Page(n, 0, bytes([i + 1]) * 4096) for i, n in enumerate(names)]
    (tmp_path / "main.bin").write_bytes(_stream(dict.fromkeys(names, 8192), *records))
    out = tmp_path / "out"
    result = analyze(load_recording(tmp_path / "main.bin"), extract=out)
    assert not result.errors
    listing = json.loads((out / "blocks.json").read_text())
    assert [b["name"] for b in listing] == names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["main.bin", "out"]
    files = {p.name for p in out.iterdir()}
    assert files == {b["file"] for b in listing} | {"blocks.json"}
    for i, block in enumerate(listing):
        assert len(block["file"].encode()) <= 255
        data = (out / block["file"]).read_bytes()
        assert data == bytes([i + 1]) * 4096 + bytes(4096)


def test_a_block_claiming_64_gib_keeps_memory_bounded(tmp_path: Path) -> None:
    size = 64 << 30
    data = _stream({"pc.ram": size}, Page("pc.ram", size - 4096, b"\x5a" * 4096))
    (tmp_path / "main.bin").write_bytes(data)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from multifd.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-c",
        code,
        "analyze",
        str(tmp_path / "main.bin"),
        "--extract",
        str(out),
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)}
    )
    assert "Traceback" not in done.stderr
    # Every page but one was never sent; the one that was is in place.
    assert done.returncode == 1, done.stderr
    assert "16777215 of 16777216 pages" in " ".join(done.stdout.split())
    with open(out / "pc.ram", "rb") as f:
        assert os.fstat(f.fileno()).st_size == size
        f.seek(size - 4096)
        assert f.read() == b"\x5a" * 4096


def test_a_second_block_list_that_differs_is_an_error_not_a_crash(tmp_path: Path) -> None:
    other = MemSize((RamBlockEntry("other", 4096),))
    data = _stream({"pc.ram": 8192}, other, Page("other", 0, b"\x01" * 4096))
    (tmp_path / "main.bin").write_bytes(data)
    result = analyze(load_recording(tmp_path / "main.bin"), extract=tmp_path / "out")
    assert "a second MEM_SIZE block list ['other'] differs" in result.errors[0]
    assert result.extracted is not None and not result.extracted["complete"]


def test_an_extraction_that_fails_removes_what_it_wrote(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full)
    out = tmp_path / "new" / "out"
    status, report, _ = _cli([str(FIXTURES / "mf2-nokernel"), "--extract", str(out)], capsys)
    assert status == 1
    assert f"error: --extract {out}: No space left on device" in report
    assert "the files it had written are removed" in report
    assert "RAM blocks written" not in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
    assert not any((tmp_path / "new").iterdir())


def test_zero_pages_leave_the_images_sparse(tmp_path: Path) -> None:
    analyze(load_recording(FIXTURES / "plain-nokernel"), extract=tmp_path)
    ram = tmp_path / "pc.ram"
    assert ram.stat().st_size == 128 << 20
    # 111 pages with data; the 32k zero pages are holes, not written zeros.
    assert ram.stat().st_blocks * 512 < 4 << 20
    assert np.count_nonzero(np.fromfile(ram, dtype=np.uint8)) > 0


def test_zero_pages_after_data_clear_it(tmp_path: Path) -> None:
    records = [Page("pc.ram", 4096, b"\x07" * 4096), ZeroPage("pc.ram", 4096)]
    (tmp_path / "main.bin").write_bytes(_stream({"pc.ram": 8192}, *records))
    analyze(load_recording(tmp_path / "main.bin"), extract=tmp_path / "out")
    assert (tmp_path / "out" / "pc.ram").read_bytes() == bytes(8192)


def test_an_xbzrle_delta_lands_on_the_page_it_changes(tmp_path: Path) -> None:
    # A delta: 7 bytes unchanged, then 1 byte that becomes 9.
    records = [Page("pc.ram", 4096, b"\x01" * 4096), XbzrlePage("pc.ram", 4096, bytes([7, 1, 9]))]
    (tmp_path / "main.bin").write_bytes(_stream({"pc.ram": 8192}, *records))
    result = analyze(load_recording(tmp_path / "main.bin"), extract=tmp_path / "out")
    assert not result.errors and result.normal == 2
    page = bytearray(b"\x01" * 4096)
    page[7] = 9
    assert (tmp_path / "out" / "pc.ram").read_bytes() == bytes(4096) + page
