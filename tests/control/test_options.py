"""The daemons' command-line values: blocks as NAME=SIZE[@PATH], sizes with suffixes,
capabilities and parameters, refused with the form that would work."""

from __future__ import annotations

from pathlib import Path

import pytest

from multifd.control import BlockSpec, OptionError, open_blocks, parse_capability, parse_parameter
from multifd.control.options import parse_size


@pytest.mark.parametrize(
    ("text", "size"),
    [("4096", 4096), ("64K", 64 << 10), ("8m", 8 << 20), ("1G", 1 << 30), ("1.5M", 3 << 19)],
)
def test_sizes_take_binary_suffixes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_bad_size_says_what_would_do() -> None:
    with pytest.raises(OptionError, match=r"not a size: '12Q' \(try 4096, 64M, 1G\)"):
        parse_size("12Q")


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("pc.ram=64M", BlockSpec("pc.ram", 64 << 20)),
        ("pc.ram=4M@/dev/shm/vm ram", BlockSpec("pc.ram", 4 << 20, Path("/dev/shm/vm ram"))),
        # QEMU's block names hold "/" and "@"; the size decides where the name ends.
        ("/rom@etc/acpi/tables=128K", BlockSpec("/rom@etc/acpi/tables", 128 << 10)),
        ("vga.vram=16M@/tmp/a=b@c", BlockSpec("vga.vram", 16 << 20, Path("/tmp/a=b@c"))),
    ],
)
def test_block_specs(text: str, spec: BlockSpec) -> None:
    assert BlockSpec.parse(text) == spec


@pytest.mark.parametrize("text", ["pc.ram", "pc.ram=", "=4M", "pc.ram=big", "pc.ram=4M@"])
def test_bad_block_specs(text: str) -> None:
    with pytest.raises(OptionError, match=r"not a block: .* \(NAME=SIZE or NAME=SIZE@PATH"):
        BlockSpec.parse(text)


def test_blocks_at_paths_are_created_for_a_destination(tmp_path: Path) -> None:
    specs = [BlockSpec.parse(f"pc.ram=64K@{tmp_path / 'ram'}"), BlockSpec.parse("rom=8K")]
    blocks = open_blocks(specs, create=True)
    try:
        assert [(b.name, b.kind, b.used_length) for b in blocks] == [
            ("pc.ram", "file", 64 << 10),
            ("rom", "anonymous", 8 << 10),
        ]
        assert (tmp_path / "ram").stat().st_size == 64 << 10
    finally:
        for block in blocks:
            block.close()


def test_a_source_block_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="No such file"):
        open_blocks([BlockSpec.parse(f"pc.ram=64K@{tmp_path / 'missing'}")], create=False)


def test_a_short_source_block_file_is_refused_with_options_that_would_work(
    tmp_path: Path,
) -> None:
    """A source sends the file as it is: the advice is an option to give, not the
    library's create=True (which only a destination uses)."""
    small, odd = tmp_path / "small", tmp_path / "odd"
    small.write_bytes(b"\1" * 8192)
    odd.write_bytes(b"\1" * 5000)
    with pytest.raises(OptionError) as refused:
        open_blocks([BlockSpec.parse(f"a=4M@{small}")], create=False)
    assert str(refused.value) == (
        f"block 'a': {small} has 8192 bytes, fewer than the 4M given; "
        f"give the file's size (--block a=8K@{small}) or a file of at least 4194304 bytes"
    )
    with pytest.raises(OptionError) as refused:
        open_blocks([BlockSpec.parse(f"a=8K@{odd}")], create=False)
    assert str(refused.value) == (
        f"block 'a': {odd} has 5000 bytes, fewer than the 8K given; "
        "give a file of at least 8192 bytes"
    )
    assert small.read_bytes() == b"\1" * 8192 and odd.stat().st_size == 5000


def test_duplicate_block_names_are_refused() -> None:
    with pytest.raises(OptionError, match=r"block names must be unique: pc\.ram"):
        open_blocks([BlockSpec.parse("pc.ram=8K"), BlockSpec.parse("pc.ram=16K")], create=True)


def test_capabilities() -> None:
    assert parse_capability("multifd=on") == ("multifd", True)
    assert parse_capability("events=off") == ("events", False)
    with pytest.raises(OptionError, match=r"not a capability setting: 'multifd' \(NAME=on"):
        parse_capability("multifd")
    with pytest.raises(OptionError, match=r"unknown capability 'warp' \(known: xbzrle, "):
        parse_capability("warp=on")


def test_parameters() -> None:
    assert parse_parameter("multifd-channels=4") == ("multifd-channels", 4)
    assert parse_parameter("max-bandwidth=1G") == ("max-bandwidth", 1 << 30)
    assert parse_parameter("multifd-compression=zstd") == ("multifd-compression", "zstd")
    with pytest.raises(OptionError, match="Parameter 'warp' is unexpected"):
        parse_parameter("warp=9")
    with pytest.raises(OptionError, match="expects an integer, got 'many'"):
        parse_parameter("multifd-channels=many")
    assert parse_parameter("cpu-throttle-tailslow=on") == ("cpu-throttle-tailslow", True)
    assert parse_parameter("block-incremental=off") == ("block-incremental", False)
    with pytest.raises(OptionError, match="expects on or off, got 'maybe'"):
        parse_parameter("compress-wait-thread=maybe")
    mapping = '[{"node-name": "d", "alias": "d", "bitmaps": []}]'
    assert parse_parameter(f"block-bitmap-mapping={mapping}") == (
        "block-bitmap-mapping",
        [{"node-name": "d", "alias": "d", "bitmaps": []}],
    )
