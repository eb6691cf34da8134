"""The one exception the wire layer raises on bad bytes, and where it happened.

Every decoder failure names the field, the value, what was expected and the
position (channel, packet, byte offset, section) so an operator can find it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class Where:
    """A position in a migration: which channel, which packet, which byte."""

    channel: int | None = None  # multifd channel id; None is the main channel
    packet: int | None = None  # packet index on that channel, counted from 0
    offset: int | None = None  # byte offset from the start of the channel's stream
    section: str | None = None  # the section being decoded, e.g. 'section "ram" (id 2)'

    def at(self, offset: int) -> Where:
        return replace(self, offset=offset)

    def __str__(self) -> str:
        parts = ["main channel" if self.channel is None else f"channel {self.channel}"]
        if self.packet is not None:
            parts.append(f"packet {self.packet}")
        if self.section is not None:
            parts.append(self.section)
        if self.offset is not None:
            parts.append(f"byte {self.offset:#x}")
        return ": ".join(parts)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:#x}" if value > 9 else str(value)
    if isinstance(value, bytes | bytearray):
        shown = bytes(value[:16]).hex(" ")
        return shown + (" …" if len(value) > 16 else "")
    return repr(value)


class WireError(ValueError):
    """Bytes that are not a valid QEMU migration stream or multifd channel.

    `str(error)` reads like ``channel 3: packet 17: byte 0x5c0: normal_pages 200,
    expected at most 128``. The attributes keep the parts for programs.
    """

    def __init__(
        self,
        message: str,
        *,
        where: Where | None = None,
        field: str | None = None,
        value: Any = None,
        expected: str | None = None,
    ) -> None:
        self.message = message
        self.where = where or Where()
        self.field = field
        self.value = value
        self.expected = expected
        super().__init__(f"{self.where}: {message}")

    @classmethod
    def bad_field(cls, field: str, value: Any, expected: str, where: Where) -> WireError:
        return cls(
            f"{field} {_show(value)}, expected {expected}",
            where=where,
            field=field,
            value=value,
            expected=expected,
        )

    def located(self, where: Where) -> WireError:
        """The same error, placed at a more precise position."""
        return WireError(
            self.message, where=where, field=self.field, value=self.value, expected=self.expected
        )
