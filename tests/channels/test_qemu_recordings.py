"""Real QEMU 7.2 sources, replayed: the recorded connections of a multifd migration
reach the listener in any order, land in the place their init packet names, and
every byte comes through unchanged."""

from __future__ import annotations

import ast
import hashlib
import json
import lzma
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from multifd.channels import Listener, MigrationURI
from multifd.wire import INIT_SIZE, MultiFDInit

FIXTURES = Path(__file__).parent.parent / "fixtures" / "qemu-7.2"


def load(name: str) -> tuple[list[bytes], list[str], int]:
    """The connections in accept order (main first), their sha256, the channel count."""
    folder = FIXTURES / name
    meta = json.loads((folder / "meta.json").read_text())
    connections = meta["connections"]
    if isinstance(connections, str):  # recorded as a Python repr
        connections = ast.literal_eval(connections)
    streams = [
        lzma.decompress((folder / f"conn{c['idx']}.bin.xz").read_bytes()) for c in connections
    ]
    return streams, [c["sha256"] for c in connections], int(meta["channels"])


def send_and_end(sock: socket.socket, data: bytes) -> None:
    """What the QEMU source did on this connection: send it all, then close."""
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("name", ["mf2-nokernel", "mf4-mb"])
@pytest.mark.parametrize("main_last", [False, True], ids=["recorded order", "main last"])
def test_recorded_qemu_migration_through_the_listener(
    listen: Callable[..., Listener],
    raw_connect: Callable[[MigrationURI], socket.socket],
    background: Callable[..., Any],
    name: str,
    main_last: bool,
) -> None:
    streams, digests, channels = load(name)
    listener = listen("tcp:127.0.0.1:0", channels=channels)  # QEMU's default UUID: zeros
    order = [*range(1, len(streams)), 0] if main_last else list(range(len(streams)))
    socks = {i: raw_connect(listener.uri) for i in order}
    senders = [background(send_and_end, socks[i], streams[i]) for i in order]

    with listener.wait(10) as destination:
        received = destination.main.read_to_eof(len(streams[0]))
        assert hashlib.sha256(received).hexdigest() == digests[0]
        for i in range(1, len(streams)):
            channel_id = MultiFDInit.unpack(streams[i][:INIT_SIZE]).channel_id
            channel = destination.multifd[channel_id]
            rest = channel.read_to_eof(len(streams[i]))
            assert hashlib.sha256(streams[i][:INIT_SIZE] + rest).hexdigest() == digests[i]
        for sender in senders:
            sender.result()
    assert listener.refusals == []
