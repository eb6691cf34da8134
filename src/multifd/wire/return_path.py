"""Return-path messages: what a destination sends back on the main channel (spec 1.4).

Each message is be16 type, be16 length, then that many bytes. A precopy source
hears only PONG (the answer to a PING command) and SHUT (the destination's
verdict: 0 loaded, anything else failed). `ReturnPathDecoder` takes bytes as
they arrive and hands out whole messages; it never reads a socket itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from .errors import Where, WireError
from .reader import be16, be32

HEADER_SIZE = 4
# QEMU's source reads a message's data into a 512-byte buffer and refuses longer ones.
MAX_MESSAGE_DATA = 512
RETURN_PATH = "return path"


class MessageType(IntEnum):
    """QEMU's `mig_rp_message_type`, and ours after it."""

    INVALID = 0
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7  # QEMU 8.1+
    # Ours: the text of a failure, sent right after SHUT(nonzero). A QEMU source
    # stops reading the return path at SHUT, so it never sees one.
    X_SHUT_REASON = 0x8000


# rp_cmd_args[].len: None means variable (up to MAX_MESSAGE_DATA).
MESSAGE_LENGTHS: dict[MessageType, int | None] = {
    MessageType.SHUT: 4,
    MessageType.PONG: 4,
    MessageType.REQ_PAGES_ID: None,
    MessageType.REQ_PAGES: 12,
    MessageType.RECV_BITMAP: None,
    MessageType.RESUME_ACK: 4,
    MessageType.SWITCHOVER_ACK: 0,
    MessageType.X_SHUT_REASON: None,
}
# The others belong to postcopy, resuming a postcopy, or a later QEMU.
PRECOPY_MESSAGES = frozenset({MessageType.SHUT, MessageType.PONG, MessageType.X_SHUT_REASON})


@dataclass(frozen=True)
class Shut:
    """SHUT: the destination is done; `status` 0 means it loaded everything."""

    status: int

    def pack(self) -> bytes:
        return be16(MessageType.SHUT) + be16(4) + be32(self.status)


@dataclass(frozen=True)
class Pong:
    """PONG: the answer to PING, carrying the same value."""

    value: int

    def pack(self) -> bytes:
        return be16(MessageType.PONG) + be16(4) + be32(self.value)


@dataclass(frozen=True)
class ShutReason:
    """Why the destination failed (ours; UTF-8, cut to fit one message)."""

    text: str

    def pack(self) -> bytes:
        data = self.text.encode()[:MAX_MESSAGE_DATA]
        # Cutting may split a character: drop the broken tail, not the message.
        data = data.decode(errors="ignore").encode()
        return be16(MessageType.X_SHUT_REASON) + be16(len(data)) + data


ReturnPathMessage = Shut | Pong | ShutReason


class ReturnPathDecoder:
    """Whole messages out of the bytes fed in, checked as a QEMU 7.2 source
    checks them; a bad one raises `WireError` naming it and its byte offset."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.offset = 0  # stream offset of the first byte in the buffer

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buffer += data

    @property
    def pending(self) -> int:
        """Bytes received that do not yet make a whole message."""
        return len(self._buffer)

    def next_message(self) -> ReturnPathMessage | None:
        """The next whole message, or None until more bytes are fed."""
        if len(self._buffer) < HEADER_SIZE:
            return None
        where = Where(section=RETURN_PATH, offset=self.offset)
        raw_type = int.from_bytes(self._buffer[0:2], "big")
        length = int.from_bytes(self._buffer[2:4], "big")
        kind = _message_type(raw_type, length, where)
        expected = MESSAGE_LENGTHS[kind]
        if (expected is not None and length != expected) or length > MAX_MESSAGE_DATA:
            shown = f"{expected}" if expected is not None else f"at most {MAX_MESSAGE_DATA}"
            raise WireError(
                f"return path message {kind.name} ({raw_type:#06x}) has length {length}, "
                f"expected {shown}",
                where=where.at(self.offset + 2),
                field="message length",
                value=length,
                expected=shown,
            )
        if kind not in PRECOPY_MESSAGES:
            raise WireError(
                f"return path message {kind.name} ({raw_type:#06x}) is not expected in a "
                "precopy migration (postcopy and switchover-ack are not implemented)",
                where=where,
                field="message type",
                value=raw_type,
                expected="SHUT or PONG",
            )
        if len(self._buffer) < HEADER_SIZE + length:
            return None
        data = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + length])
        del self._buffer[: HEADER_SIZE + length]
        self.offset += HEADER_SIZE + length
        if kind is MessageType.SHUT:
            return Shut(int.from_bytes(data, "big"))
        if kind is MessageType.PONG:
            return Pong(int.from_bytes(data, "big"))
        return ShutReason(data.decode(errors="replace"))


def _message_type(raw_type: int, length: int, where: Where) -> MessageType:
    try:
        kind = MessageType(raw_type)
    except ValueError:
        kind = MessageType.INVALID
    if kind is MessageType.INVALID:
        raise WireError(
            f"return path message type {raw_type:#06x} unknown (length {length:#06x})",
            where=where,
            field="message type",
            value=raw_type,
            expected="1 to 7",
        )
    return kind
