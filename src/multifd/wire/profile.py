"""Which QEMU generation's stream format to speak.

The format changed in small, switchable ways after 7.2 (spec section 6.2). A
profile names one combination; the code branches on its fields, never on a
version string.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGET_PAGE_SIZE = 4096
# MULTIFD_PACKET_SIZE / TARGET_PAGE_SIZE on x86: the page slots of every packet.
PAGES_PER_PACKET = 128


@dataclass(frozen=True)
class WireProfile:
    """A stream format: the QEMU machine-type generation it matches."""

    name: str
    # Sync points are MULTIFD_FLUSH records (8.1+ "round mode"), not every EOS.
    flush: bool
    # Packets carry zero pages (9.0 layout with a zero_pages field).
    zero_pages_in_packets: bool
    # A ZERO record's fill byte must be 0 (8.2+ destinations refuse others).
    zero_fill_must_be_zero: bool
    # The source sends MIG_CMD_SWITCHOVER_START before the END sections (10.0+).
    switchover_start: bool


QEMU_7_2 = WireProfile("7.2", False, False, False, False)
QEMU_8_1 = WireProfile("8.1", True, False, False, False)
QEMU_8_2 = WireProfile("8.2", True, False, True, False)
QEMU_9_0 = WireProfile("9.0", True, True, True, False)
QEMU_10_0 = WireProfile("10.0", True, True, True, True)

PROFILES: dict[str, WireProfile] = {
    p.name: p for p in (QEMU_7_2, QEMU_8_1, QEMU_8_2, QEMU_9_0, QEMU_10_0)
}
