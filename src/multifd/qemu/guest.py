"""A guest that writes memory all the time: a 512-byte x86 boot sector.

It switches to 32-bit protected mode, zeroes one byte in every page of
[1 MiB, 100 MiB), then forever increments that byte page after page, writing
"B" to the serial port after each pass. At any instant the page bytes read
c+1 … c+1, c … c (mod 256): each page equals the previous one, or is one
less, at most once. A migration that loses or mixes up a page breaks that.
Hand-assembled here so the tests need no assembler.
"""

from __future__ import annotations

import struct

import numpy as np

LOAD_ADDRESS = 0x7C00
TEST_START = 1 << 20
TEST_END = 100 << 20
PAGE = 4096
CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
SERIAL_PORT = 0x3F8


def _rel8(source_end: int, target: int) -> int:
    offset = target - source_end
    assert -128 <= offset <= 127, offset
    return offset & 0xFF


def boot_sector(end: int = TEST_END) -> bytes:
    """The 512-byte boot sector (ends with the 0x55 0xAA signature); its pages
    are those of [1 MiB, `end`): a smaller guest gives a faster test."""
    code = bytearray()
    # GDT and its descriptor sit at fixed places near the end of the sector.
    gdt_at, desc_at = 0x1C0, 0x1D8
    # -- 16-bit real mode, at 0x7c00 --
    code += b"\xfa"  # cli
    code += b"\x0f\x01\x16" + struct.pack("<H", LOAD_ADDRESS + desc_at)  # lgdt [desc]
    code += b"\x0f\x20\xc0"  # mov eax, cr0
    code += b"\x0c\x01"  # or al, 1 (PE)
    code += b"\x0f\x22\xc0"  # mov cr0, eax
    far_jump_at = len(code)
    code += b"\x66\xea" + b"\0\0\0\0" + struct.pack("<H", CODE_SELECTOR)  # jmp 08:pm
    # -- 32-bit protected mode --
    pm = len(code)
    struct.pack_into("<I", code, far_jump_at + 2, LOAD_ADDRESS + pm)
    code += b"\x66\xb8" + struct.pack("<H", DATA_SELECTOR)  # mov ax, 0x10
    code += b"\x8e\xd8\x8e\xc0\x8e\xd0"  # mov ds, ax / es / ss
    code += b"\xbc" + struct.pack("<I", LOAD_ADDRESS)  # mov esp, 0x7c00
    code += b"\xb8" + struct.pack("<I", TEST_START)  # mov eax, START
    zero = len(code)
    code += b"\xc6\x00\x00"  # mov byte [eax], 0
    code += b"\x05" + struct.pack("<I", PAGE)  # add eax, 4096
    code += b"\x3d" + struct.pack("<I", end)  # cmp eax, END
    code += b"\x72" + bytes([_rel8(len(code) + 2, zero)])  # jb zero
    main = len(code)
    code += b"\xb8" + struct.pack("<I", TEST_START)  # mov eax, START
    inner = len(code)
    code += b"\xfe\x00"  # inc byte [eax]
    code += b"\x05" + struct.pack("<I", PAGE)  # add eax, 4096
    code += b"\x3d" + struct.pack("<I", end)  # cmp eax, END
    code += b"\x72" + bytes([_rel8(len(code) + 2, inner)])  # jb inner
    code += b"\x66\xba" + struct.pack("<H", SERIAL_PORT)  # mov dx, 0x3f8
    code += b"\xb0\x42"  # mov al, 'B'
    code += b"\xee"  # out dx, al
    code += b"\xeb" + bytes([_rel8(len(code) + 2, main)])  # jmp main
    assert len(code) <= gdt_at
    sector = bytearray(512)
    sector[: len(code)] = code
    # Flat 4 GiB segments: null, code (execute/read), data (read/write).
    gdt = bytes(8) + bytes.fromhex("ffff0000009acf00") + bytes.fromhex("ffff00000092cf00")
    sector[gdt_at : gdt_at + len(gdt)] = gdt
    sector[desc_at : desc_at + 6] = struct.pack("<HI", len(gdt) - 1, LOAD_ADDRESS + gdt_at)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def disk_image(end: int = TEST_END) -> bytes:
    """A raw disk: the boot sector, padded to 1 MiB."""
    return boot_sector(end).ljust(1 << 20, b"\0")


def counters(ram: np.ndarray, end: int = TEST_END) -> np.ndarray:
    """The guest's counter byte of every test page, from guest RAM starting at 0."""
    return ram[TEST_START:end:PAGE]


def check_counters(values: np.ndarray) -> str | None:
    """None if the counters hold the guest's invariant, else what is wrong."""
    drops = (values[:-1].astype(np.int16) - values[1:].astype(np.int16)) % 256
    bad = np.flatnonzero((drops != 0) & (drops != 1))
    if len(bad):
        i = int(bad[0])
        return (
            f"page {TEST_START + i * PAGE:#x} holds {values[i]} but the next page holds "
            f"{values[i + 1]}: a page was lost or is stale"
        )
    steps = int(np.count_nonzero(drops == 1))
    if steps > 1:
        return f"the counters step down {steps} times (at most once allowed)"
    return None
