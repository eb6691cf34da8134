"""Return-path bytes: the commands that open it on the main stream, and the
messages the destination sends back, exactly as QEMU 7.2 lays them out."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from wire_support import Recording

from multifd.wire import (
    Command,
    MainStreamDecoder,
    Pong,
    ReturnPathDecoder,
    Shut,
    ShutReason,
    VMCommand,
    VMDescription,
    WireError,
)
from multifd.wire.return_path import MAX_MESSAGE_DATA
from multifd.wire.source import BufferSource


def test_open_return_path_and_ping_bytes() -> None:
    # QEMU_VM_COMMAND (0x08), be16 command, be16 length, data.
    assert VMCommand.open_return_path().pack() == bytes.fromhex("08 0001 0000")
    assert VMCommand.ping(1).pack() == bytes.fromhex("08 0002 0004 00000001")


def test_commands_decode_from_the_main_stream() -> None:
    stream = (
        bytes.fromhex("5145564d 00000003")  # QEVM, version 3
        + bytes.fromhex("07 00000002") + b"pc"  # configuration
        + VMCommand.open_return_path().pack()
        + VMCommand.ping(0xDEADBEEF).pack()
        + bytes.fromhex("00")  # EOF
    )  # fmt: skip
    records = list(MainStreamDecoder(BufferSource(stream)))
    commands = [r for r in records if isinstance(r, VMCommand)]
    assert [c.command for c in commands] == [Command.OPEN_RETURN_PATH, Command.PING]
    assert commands[1].ping_value == 0xDEADBEEF


def test_pong_and_shut_bytes() -> None:
    # be16 type, be16 length, be32 value.
    assert Pong(1).pack() == bytes.fromhex("0002 0004 00000001")
    assert Shut(0).pack() == bytes.fromhex("0001 0004 00000000")
    assert Shut(1).pack() == bytes.fromhex("0001 0004 00000001")


def test_messages_come_out_whole_whatever_the_pieces() -> None:
    wire = Pong(1).pack() + Shut(1).pack() + ShutReason("x-verify: memory differs").pack()
    decoder = ReturnPathDecoder()
    messages = []
    for byte in wire:  # the worst case: one byte at a time
        decoder.feed(bytes([byte]))
        while (message := decoder.next_message()) is not None:
            messages.append(message)
    assert messages == [Pong(1), Shut(1), ShutReason("x-verify: memory differs")]
    assert decoder.pending == 0 and decoder.offset == len(wire)


def test_a_long_reason_is_cut_to_one_message_on_a_character_boundary() -> None:
    packed = ShutReason("é" * MAX_MESSAGE_DATA).pack()
    assert int.from_bytes(packed[2:4], "big") == MAX_MESSAGE_DATA
    decoder = ReturnPathDecoder()
    decoder.feed(packed)
    assert decoder.next_message() == ShutReason("é" * (MAX_MESSAGE_DATA // 2))


@pytest.mark.parametrize(
    ("wire", "words"),
    [
        (bytes.fromhex("0000 0000"), ["message type 0x0000 unknown", "byte 0x8"]),
        (bytes.fromhex("0009 0004 00000000"), ["message type 0x0009 unknown", "byte 0x8"]),
        (bytes.fromhex("0001 0002 0000"), ["SHUT (0x0001) has length 2, expected 4", "byte 0xa"]),
        (bytes.fromhex("0002 0008") + bytes(8), ["PONG (0x0002) has length 8, expected 4"]),
        (bytes.fromhex("8000 0201"), ["X_SHUT_REASON", "length 513, expected at most 512"]),
        (
            bytes.fromhex("0004 000c") + bytes(12),
            ["REQ_PAGES (0x0004) is not expected in a precopy", "byte 0x8"],
        ),
        (bytes.fromhex("0007 0000"), ["SWITCHOVER_ACK", "not expected in a precopy"]),
    ],
)
def test_bad_messages_are_refused_naming_message_and_position(
    wire: bytes, words: list[str]
) -> None:
    decoder = ReturnPathDecoder()
    # A good PONG first, so the bad message starts at byte 8.
    decoder.feed(Pong(1).pack() + wire)
    assert decoder.next_message() == Pong(1)
    with pytest.raises(WireError) as caught:
        decoder.next_message()
    message = str(caught.value)
    assert message.startswith("main channel: return path: byte ")
    for word in words:
        assert word in message, message


class OpenEndedSource:
    """A stream whose sender keeps its end open, as a source waiting for SHUT
    does: reading past its last byte would block for ever, so it fails instead."""

    def __init__(self, data: bytes) -> None:
        self._data = BufferSource(data)

    def read_exact(self, n: int) -> bytes:
        assert n <= self._data.remaining, "read past the end of an open stream"
        return self._data.read_exact(n)

    def read_to_eof(self, limit: int, complete: Callable[[bytes], bool] | None = None) -> bytes:
        data = b""
        while complete is None or not data or not complete(data):
            assert self._data.remaining, "read to the end of an open stream: it would block"
            data += self._data.read_exact(min(4096, self._data.remaining))
        return data


def test_opaque_device_state_ends_at_the_vmdesc_of_an_open_stream(recording: Recording) -> None:
    """A real QEMU 7.2 stream: its device sections are split out without waiting
    for the connection to close."""
    records = list(MainStreamDecoder(OpenEndedSource(recording.main)))
    assert records == recording.records
    assert isinstance(records[-1], VMDescription)
