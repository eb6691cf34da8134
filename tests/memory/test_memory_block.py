"""RAMBlock: every kind of memory built, written and closed; QEMU's name and size
rules with their messages; views, prefault, marking and digests."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np
import pytest
from memory_support import (
    ALL_KINDS,
    BlockMaker,
    MiB,
    anonymous_thp_mode,
    mapping_fields,
    open_fds,
    present_pages,
)

from multifd.memory import PAGE_SIZE, FileTooShortError, RAMBlock, validate_name
from multifd.memory import block as block_module


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_kind_is_built_written_and_read(make_block: BlockMaker, kind: str) -> None:
    block = make_block(kind, 2 * MiB, name="pc.ram")
    assert (block.name, block.used_length, block.page_size, block.pages) == (
        "pc.ram",
        2 * MiB,
        PAGE_SIZE,
        512,
    )
    assert not block.array.any()
    block.page(5)[:3] = b"abc"
    block.array[-1] = 9
    assert bytes(block.buffer[5 * PAGE_SIZE : 5 * PAGE_SIZE + 3]) == b"abc"
    assert block.page_rows()[511, -1] == 9
    assert block.page_rows(np.uint64).shape == (512, 512)
    assert len(block.page(10, count=4)) == 4 * PAGE_SIZE


def test_from_buffer_is_zero_copy_and_leaves_the_buffer_alone() -> None:
    memory = np.zeros(PAGE_SIZE * 4, dtype=np.uint8)
    block = RAMBlock.from_buffer("app", memory)
    block.page(2)[0] = 7
    assert memory[2 * PAGE_SIZE] == 7
    assert block.kind == "buffer"
    block.close()
    memory[0] = 1  # still the application's, still writable
    assert block.closed


def test_from_buffer_accepts_other_dtypes_and_shapes() -> None:
    memory = np.zeros((4, 1024), dtype=np.float32)
    block = RAMBlock.from_buffer("floats", memory)
    block.array[:4] = np.frombuffer(np.float32(1.5).tobytes(), np.uint8)
    assert memory[0, 0] == 1.5
    block.close()


def test_file_block_writes_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    with RAMBlock.from_file("file", path, 8 * PAGE_SIZE, create=True) as block:
        assert block.kind == "file" and block.path == str(path)
        block.page(1)[:5] = b"hello"
    assert path.read_bytes()[PAGE_SIZE : PAGE_SIZE + 5] == b"hello"
    with RAMBlock.from_file("again", path) as block:  # size defaults to the file's
        assert block.used_length == 8 * PAGE_SIZE
        assert bytes(block.page(1)[:5]) == b"hello"


def test_file_block_refuses_what_it_should_not_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"RAMBlock 'f': open .*missing"):
        RAMBlock.from_file("f", tmp_path / "missing", PAGE_SIZE)
    (tmp_path / "short").write_bytes(bytes(PAGE_SIZE))
    with pytest.raises(
        FileTooShortError, match="has 4096 bytes, fewer than size 8192; pass create=True"
    ) as short:
        RAMBlock.from_file("f", tmp_path / "short", 2 * PAGE_SIZE)
    assert (short.value.length, short.value.size) == (PAGE_SIZE, 2 * PAGE_SIZE)
    (tmp_path / "empty").touch()
    with pytest.raises(ValueError, match="is empty; pass size="):
        RAMBlock.from_file("f", tmp_path / "empty")
    (tmp_path / "odd").write_bytes(bytes(5000))
    with pytest.raises(ValueError, match="size 5000 bytes is not a non-zero multiple"):
        RAMBlock.from_file("f", tmp_path / "odd")


def test_memfd_can_be_mapped_again_through_its_fd() -> None:
    with RAMBlock.memfd("shared", 4 * PAGE_SIZE) as block:
        assert block.fd is not None
        block.page(3)[0] = 42
        with RAMBlock.from_file("view", f"/proc/self/fd/{block.fd}") as other:
            assert other.page(3)[0] == 42
            other.page(0)[0] = 1
        assert block.page(0)[0] == 1


@pytest.mark.parametrize("kind", ["memfd", "shm-file", "disk-file"])
def test_an_alias_maps_the_same_memory_again(make_block: BlockMaker, kind: str) -> None:
    block = make_block(kind, MiB)
    block.page(3)[0] = 42
    alias = block.alias()
    assert alias is not None
    with alias:
        assert alias.address != block.address
        assert (alias.name, alias.kind, alias.pages) == (block.name, block.kind, block.pages)
        assert alias.page(3)[0] == 42
        block.page(200)[5] = 7  # written after the alias was made: seen through it
        assert alias.page(200)[5] == 7
        # Page tables of its own: mapping its pages in maps none of the block's.
        before = present_pages(block)
        assert before < block.pages
        alias.populate()
        assert present_pages(alias) == block.pages
        assert present_pages(block) == before
    assert alias.closed and block.page(3)[0] == 42  # closing the alias leaves the block
    alias = block.alias()
    assert alias is not None
    block.close()
    assert alias.page(200)[5] == 7  # and the other way round
    alias.close()


@pytest.mark.parametrize("kind", ["anonymous", "shared-anonymous", "bytearray", "mmap"])
def test_only_file_and_memfd_blocks_have_an_alias(make_block: BlockMaker, kind: str) -> None:
    block = make_block(kind, MiB)
    assert block.alias() is None
    block.close()
    with pytest.raises(ValueError, match=f"RAMBlock '{block.name}' is closed"):
        block.alias()


def test_anonymous_blocks_ask_for_transparent_huge_pages() -> None:
    # As QEMU does for its RAM; with THP set to "madvise" (as on these
    # machines), nothing else makes the mapping eligible.
    if anonymous_thp_mode() == "never":
        pytest.skip("transparent huge pages are off in this kernel")
    with RAMBlock.anonymous("huge", 4 * MiB) as block:
        assert mapping_fields(block)["THPeligible"] == "1"


def test_a_file_blocks_fd_stays_private(tmp_path: Path) -> None:
    # Kept open for alias(), but `fd` is documented for memfd blocks only.
    with RAMBlock.from_file("f", tmp_path / "f", MiB, create=True) as block:
        assert block.fd is None


def test_shared_anonymous_memory_is_shared_with_a_fork() -> None:
    with RAMBlock.anonymous("shared", PAGE_SIZE, shared=True) as block:
        pid = os.fork()
        if pid == 0:
            block.array[0] = 77
            os._exit(0)
        os.waitpid(pid, 0)
        assert block.array[0] == 77


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "must be 1-255 bytes of UTF-8 \\(QEMU idstr\\), got 0 bytes"),
        ("x" * 256, "must be 1-255 bytes of UTF-8 \\(QEMU idstr\\), got 256 bytes"),
        ("é" * 128, "got 256 bytes"),  # 128 characters, but 256 bytes
        ("a\0b", "must not contain NUL"),
        ("a\udc80", "not valid UTF-8"),
    ],
)
def test_names_follow_qemu_idstr_rules(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RAMBlock.anonymous(name, PAGE_SIZE)


def test_valid_names_up_to_255_bytes() -> None:
    assert validate_name("x" * 255) == "x" * 255
    assert validate_name("/rom@etc/acpi/tables") == "/rom@etc/acpi/tables"
    with RAMBlock.memfd("é" * 127, PAGE_SIZE) as block:  # 254 bytes: memfd label trimmed
        assert block.name == "é" * 127
    with pytest.raises(TypeError, match="must be a str"):
        validate_name(b"pc.ram")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 100, 4097, -4096])
def test_sizes_must_be_whole_pages(size: int) -> None:
    with pytest.raises(
        ValueError, match=rf"RAMBlock 'pc.ram': size {size} bytes is not a non-zero"
    ):
        RAMBlock.anonymous("pc.ram", size)


def test_buffers_must_be_writable_contiguous_whole_pages() -> None:
    with pytest.raises(ValueError, match="read-only"):
        RAMBlock.from_buffer("ro", bytes(PAGE_SIZE))
    with pytest.raises(ValueError, match="contiguous"):
        RAMBlock.from_buffer("strided", np.zeros(2 * PAGE_SIZE, np.uint8)[::2])
    with pytest.raises(ValueError, match="size 100 bytes is not a non-zero multiple"):
        RAMBlock.from_buffer("small", bytearray(100))


def test_page_views_are_bounds_checked() -> None:
    with RAMBlock.anonymous("pc.ram", 4 * PAGE_SIZE) as block:
        with pytest.raises(IndexError, match=r"'pc.ram': pages 4..4 outside 0..3"):
            block.page(4)
        with pytest.raises(IndexError, match=r"pages 3..4 outside"):
            block.page(3, count=2)


def test_mark_dirty_is_bounds_checked() -> None:
    with RAMBlock.anonymous("pc.ram", 4 * PAGE_SIZE) as block:
        with pytest.raises(ValueError, match=r"'pc.ram': mark_dirty\(0x3fff, 0x2\) outside"):
            block.mark_dirty(4 * PAGE_SIZE - 1, 2)
        block.mark_dirty(4 * PAGE_SIZE - 1, 1)  # the last byte is fine


def test_sha256_compares_contents() -> None:
    with RAMBlock.anonymous("a", 4 * PAGE_SIZE) as a, RAMBlock.memfd("b", 4 * PAGE_SIZE) as b:
        assert a.sha256() == b.sha256()
        a.page(2)[100] = 1
        assert a.sha256() != b.sha256()
        b.page(2)[100] = 1
        assert a.sha256() == b.sha256()


@pytest.mark.parametrize("kind", ["anonymous", "memfd", "numpy"])
def test_prefault_keeps_contents(make_block: BlockMaker, kind: str) -> None:
    block = make_block(kind, MiB)
    block.array[::PAGE_SIZE] = 5
    block.prefault()
    assert (block.array[::PAGE_SIZE] == 5).all()
    assert block.array.sum() == 5 * block.pages


def test_prefault_falls_back_to_touching_pages(
    make_block: BlockMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_populate_write(address: int, length: int, advice: int) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")  # a kernel older than 5.14

    monkeypatch.setattr(block_module._linux, "madvise", no_populate_write)
    block = make_block("memfd", MiB)
    block.array[::PAGE_SIZE] = 5
    block.prefault()
    assert block.array.sum() == 5 * block.pages


def test_prefault_reports_real_failures(
    make_block: BlockMaker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def out_of_memory(address: int, length: int, advice: int) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(block_module._linux, "madvise", out_of_memory)
    block = make_block("anonymous", MiB, name="pc.ram")
    with pytest.raises(OSError, match=r"'pc.ram': madvise\(MADV_POPULATE_WRITE\): Cannot alloc"):
        block.prefault()


# More than the 47 bits of a process's address space, less than what mmap takes.
UNMAPPABLE = 1 << 60


def test_memory_that_cannot_be_had_is_named_with_its_size(tmp_path: Path) -> None:
    with pytest.raises(
        OSError,
        match=rf"^\[Errno 12\] RAMBlock 'pc.ram': map {UNMAPPABLE} bytes of anonymous memory: ",
    ):
        RAMBlock.anonymous("pc.ram", UNMAPPABLE)
    # A file system refuses the length (EFBIG), or the mapping fails (tmpfs).
    with pytest.raises(OSError, match=rf"^\[Errno \d+\] RAMBlock 'f': (extend|map) .*{UNMAPPABLE}"):
        RAMBlock.from_file("f", tmp_path / "f", UNMAPPABLE, create=True)
    too_big = 1 << 63  # not even a signed length: the call could not be made
    for make in (RAMBlock.anonymous, RAMBlock.memfd):
        with pytest.raises(ValueError, match=f"RAMBlock 'x': size {too_big} bytes is more than"):
            make("x", too_big)


def test_close_releases_what_the_block_owns_and_is_idempotent(tmp_path: Path) -> None:
    before = open_fds()
    blocks = [
        RAMBlock.anonymous("a", MiB),
        RAMBlock.memfd("m", MiB),
        RAMBlock.from_file("f", tmp_path / "f", MiB, create=True),
    ]
    # The memfd's and the file's own fds (kept for alias()), plus the copy
    # CPython's mmap keeps of each mapped file.
    assert len(open_fds() - before) == 4
    for block in blocks:
        block.close()
        block.close()
        with pytest.raises(ValueError, match=f"RAMBlock '{block.name}' is closed"):
            _ = block.buffer
        assert "closed" in repr(block)
    assert open_fds() == before


def test_close_with_live_views_unmaps_when_the_last_view_goes() -> None:
    mapping_views = []
    block = RAMBlock.anonymous("pc.ram", 4 * PAGE_SIZE)
    mapping_views.append(block.page(1))
    mapping_views.append(block.array[:10])
    block.close()  # does not fail, and does not pull the memory from under the views
    mapping_views[0][0] = 3
    assert mapping_views[1][0] == 0
    mapping_views.clear()


def test_an_application_mmap_is_not_closed() -> None:
    mapping = mmap.mmap(-1, 2 * PAGE_SIZE)
    RAMBlock.from_buffer("app", mapping).close()
    mapping[0] = 1
    mapping.close()
