"""The listener: channels arriving in any order are placed by id; each kind of bad
connection is refused with its own message and leaves the accepted ones alone."""

from __future__ import annotations

import contextlib
import logging
import random
import select
import socket
import uuid as uuid_module
from collections.abc import Callable
from typing import Any

import pytest

from multifd.channels import (
    ChannelError,
    ChannelTimeoutError,
    Connections,
    Listener,
    MigrationURI,
)
from multifd.wire import MultiFDInit

HEADER = b"QEVM\x00\x00\x00\x03"
UUID = uuid_module.UUID("6a3c1f0e-1b2d-4c5e-9f70-8192a3b4c5d6").bytes
N = 4

Connect = Callable[[MigrationURI], socket.socket]


def init(channel_id: int, *, uuid: bytes = UUID, version: int = 1) -> bytes:
    return MultiFDInit(uuid, channel_id, version=version).pack()


@pytest.fixture(params=["tcp", "unix"])
def listener(
    request: pytest.FixtureRequest, listen: Callable[..., Listener], unix_path: str
) -> Listener:
    uri = "tcp:127.0.0.1:0" if request.param == "tcp" else f"unix:{unix_path}"
    return listen(uri, channels=N, uuid=UUID)


def send_source(
    raw_connect: Connect, uri: MigrationURI, who: list[str | int]
) -> dict[str | int, socket.socket]:
    """Play a source: connect in the order given, each sending its first bytes and a tag."""
    socks = {}
    for name in who:
        sock = raw_connect(uri)
        if name == "main":
            sock.sendall(HEADER + b"main tag")
        else:
            assert isinstance(name, int)
            sock.sendall(init(name) + b"tag %d" % name)
        socks[name] = sock
    return socks


def check_placed(destination: Connections) -> None:
    """Every channel is where its id says, and its stream starts where it should."""
    assert destination.main.name == "main channel"
    assert destination.main.read_exact(len(HEADER)) == HEADER
    assert destination.main.read_exact(8) == b"main tag"
    assert len(destination.multifd) == N
    for i, channel in enumerate(destination.multifd):
        assert channel.name == f"channel {i}"
        assert channel.bytes_read == 64
        assert channel.read_exact(5) == b"tag %d" % i


def wait_closed_by_listener(sock: socket.socket) -> None:
    """The listener records a refusal before it closes the connection, so once we
    see the end of stream the refusal is there to read."""
    # Closed with our bytes unread, TCP resets instead.
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(1) == b""


ORDERS: dict[str, list[str | int]] = {
    "main first": ["main", 0, 1, 2, 3],
    "reverse, main last": [3, 2, 1, 0, "main"],
    "multifd first, main in the middle": [1, 3, "main", 0, 2],
}
for seed in range(4):
    shuffled: list[str | int] = ["main", 0, 1, 2, 3]
    random.Random(seed).shuffle(shuffled)
    ORDERS[f"random {seed}"] = shuffled


@pytest.mark.parametrize("order", ORDERS.values(), ids=ORDERS.keys())
def test_channels_in_any_order(listener: Listener, raw_connect: Connect, order: list) -> None:
    send_source(raw_connect, listener.uri, order)
    with listener.wait(10) as destination:
        assert listener.has_all_channels()
        check_placed(destination)
    assert listener.refusals == []


def test_first_bytes_arriving_in_another_order_than_the_connections(
    listener: Listener, raw_connect: Connect
) -> None:
    """All connect first, then send in reverse, init packets split in two writes."""
    socks = [raw_connect(listener.uri) for _ in range(N + 1)]  # socks[0] is main
    for i in reversed(range(1, N + 1)):
        data = init(i - 1) + b"tag %d" % (i - 1)
        socks[i].sendall(data[:30])
    socks[0].sendall(HEADER[:2])
    for i in range(1, N + 1):
        data = init(i - 1) + b"tag %d" % (i - 1)
        socks[i].sendall(data[30:])
    assert not listener.has_all_channels()
    socks[0].sendall(HEADER[2:] + b"main tag")
    with listener.wait(10) as destination:
        check_placed(destination)


def test_a_silent_peer_does_not_hold_up_the_others(
    listen: Callable[..., Listener], raw_connect: Connect
) -> None:
    listener = listen("tcp:127.0.0.1:0", channels=N, uuid=UUID, handshake_timeout=60)
    silent = raw_connect(listener.uri)
    send_source(raw_connect, listener.uri, ["main", 0, 1, 2, 3])
    with listener.wait(10) as destination:
        check_placed(destination)
    # close() ends the silent handshake at once (no 60 s wait), and it is no refusal.
    listener.close()
    wait_closed_by_listener(silent)
    assert listener.refusals == []


def _refused(
    listener: Listener, raw_connect: Connect, first_bytes: bytes, *, then_end: bool = False
) -> str:
    """Accept main and channels 0-1, send one bad connection, then the rest: the bad
    one is refused with one message, and the others make a working set.
    `then_end` ends the bad connection's stream after its bytes, as a dying peer does."""
    send_source(raw_connect, listener.uri, ["main", 0, 1])
    bad = raw_connect(listener.uri)
    if first_bytes:
        bad.sendall(first_bytes)
    if then_end:
        bad.shutdown(socket.SHUT_WR)
    wait_closed_by_listener(bad)
    send_source(raw_connect, listener.uri, [2, 3])
    with listener.wait(10) as destination:
        check_placed(destination)
    (refusal,) = listener.refusals
    return refusal


def test_refuses_unknown_magic(listener: Listener, raw_connect: Connect) -> None:
    refusal = _refused(listener, raw_connect, b"GET / HTTP/1.1\r\n")
    assert refusal.startswith("incoming connection #4 ")
    assert refusal.endswith(
        'unknown channel magic 0x47455420, expected 0x5145564d ("QEVM", the main channel) '
        "or 0x11223344 (a multifd channel)"
    )


def test_refuses_wrong_version(listener: Listener, raw_connect: Connect) -> None:
    refusal = _refused(listener, raw_connect, init(2, version=2))
    assert refusal.endswith(": multifd init version 2, expected 1")


def test_refuses_another_migrations_uuid(listener: Listener, raw_connect: Connect) -> None:
    other = uuid_module.UUID("00000000-0000-0000-0000-00000000beef")
    refusal = _refused(listener, raw_connect, init(2, uuid=other.bytes))
    assert refusal.endswith(
        f": multifd: received uuid '{other}' and expected uuid "
        f"'{uuid_module.UUID(bytes=UUID)}' for channel 2"
    )


def test_refuses_channel_id_beyond_the_count(listener: Listener, raw_connect: Connect) -> None:
    refusal = _refused(listener, raw_connect, init(N))
    assert refusal.endswith(f": channel id {N}, expected below multifd-channels ({N})")


def _refused_claim(listener: Listener, raw_connect: Connect, first_bytes: bytes) -> str:
    """Two connections claim the same place: whichever finishes its handshake second
    is refused, and the other one is placed."""
    claims = [raw_connect(listener.uri) for _ in range(2)]
    for sock in claims:
        sock.sendall(first_bytes)
    readable, _, _ = select.select(claims, [], [], 10)
    assert len(readable) == 1
    wait_closed_by_listener(readable[0])
    (refusal,) = listener.refusals
    return refusal


def test_refuses_a_duplicate_id(listener: Listener, raw_connect: Connect) -> None:
    send_source(raw_connect, listener.uri, ["main", 0])
    refusal = _refused_claim(listener, raw_connect, init(1) + b"tag 1")
    assert refusal.endswith(": multifd: received id '1' already setup")
    send_source(raw_connect, listener.uri, [2, 3])
    with listener.wait(10) as destination:
        check_placed(destination)


def test_refuses_a_second_main_channel(listener: Listener, raw_connect: Connect) -> None:
    refusal = _refused_claim(listener, raw_connect, HEADER + b"main tag")
    assert refusal.endswith(": a second main channel (QEVM); ignoring")
    send_source(raw_connect, listener.uri, [0, 1, 2, 3])
    with listener.wait(10) as destination:
        check_placed(destination)


def test_refuses_a_peer_dying_mid_init(listener: Listener, raw_connect: Connect) -> None:
    refusal = _refused(listener, raw_connect, init(2)[:24], then_end=True)
    assert refusal.endswith(
        ": peer closed the stream 40 bytes short: got 20 of 60 bytes read at stream offset 0x4"
    )


def test_refuses_a_peer_closing_at_once(listener: Listener, raw_connect: Connect) -> None:
    refusal = _refused(listener, raw_connect, b"", then_end=True)
    assert refusal.endswith(
        "peer closed the stream 4 bytes short: got 0 of 4 bytes read at stream offset 0x0"
    )


def test_refuses_a_silent_peer_after_the_handshake_timeout(
    listen: Callable[..., Listener], raw_connect: Connect
) -> None:
    listener = listen("tcp:127.0.0.1:0", channels=N, uuid=UUID, handshake_timeout=0.2)
    refusal = _refused(listener, raw_connect, b"")  # connected, sends nothing
    assert refusal.endswith(
        ": channel magic not received within the handshake timeout (0.2 s); ignoring"
    )


def test_refuses_a_peer_stalling_mid_init(
    listen: Callable[..., Listener], raw_connect: Connect
) -> None:
    listener = listen("tcp:127.0.0.1:0", channels=N, uuid=UUID, handshake_timeout=0.2)
    refusal = _refused(listener, raw_connect, init(2)[:10])
    assert refusal.endswith(
        ": multifd init packet not received within the handshake timeout (0.2 s); ignoring"
    )


def test_refuses_a_connection_beyond_n(listener: Listener, raw_connect: Connect) -> None:
    send_source(raw_connect, listener.uri, ["main", 0, 1, 2, 3])
    with listener.wait(10) as destination:
        extra = raw_connect(listener.uri)
        extra.sendall(HEADER)  # not a multifd channel: a stray peer
        wait_closed_by_listener(extra)
        check_placed(destination)
    (refusal,) = listener.refusals
    assert refusal.startswith("incoming connection #6 ")
    assert refusal.endswith(": Extra incoming migration connection; ignoring")
    assert listener.mismatches == []  # a stray peer does not condemn the migration


def test_a_source_with_more_channels_is_a_mismatch(
    listener: Listener, raw_connect: Connect
) -> None:
    """Our UUID and an id past ours: that source's pages on the refused channel
    would be lost, so the owner must fail the migration."""
    send_source(raw_connect, listener.uri, ["main", 0, 1, 2, 3])
    with listener.wait(10) as destination:
        extra = raw_connect(listener.uri)
        extra.sendall(init(N))
        wait_closed_by_listener(extra)
        check_placed(destination)
    (mismatch,) = listener.mismatches
    assert f"channel id {N}, expected below multifd-channels ({N})" in mismatch
    assert listener.refusals == [mismatch]


@pytest.mark.parametrize(
    ("first_bytes", "reason"),
    [
        (init(1), "multifd: received id '1' already setup"),
        (init(0, uuid=bytes(16)), "multifd: received uuid '00000000-"),
    ],
)
def test_another_sources_channel_is_refused_not_a_mismatch(
    listener: Listener, raw_connect: Connect, first_bytes: bytes, reason: str
) -> None:
    """Another UUID is another source; an id already placed is a second source
    (no source sends an id twice). Like a second main channel, they are refused
    and leave the migration alone: a stray peer cannot end it with 64 bytes."""
    send_source(raw_connect, listener.uri, ["main", 0, 1, 2, 3])
    with listener.wait(10) as destination:
        extra = raw_connect(listener.uri)
        extra.sendall(first_bytes)
        wait_closed_by_listener(extra)
        check_placed(destination)
    (refusal,) = listener.refusals
    assert reason in refusal
    assert listener.mismatches == []


def test_another_uuid_while_waiting_is_refused_not_a_mismatch(
    listener: Listener, raw_connect: Connect
) -> None:
    bad = raw_connect(listener.uri)
    bad.sendall(init(0, uuid=bytes(16)))
    wait_closed_by_listener(bad)
    assert listener.mismatches == []
    send_source(raw_connect, listener.uri, ["main", 0, 1, 2, 3])
    with listener.wait(10, until_mismatch=True) as destination:
        check_placed(destination)


def test_refuses_multifd_when_it_is_off(
    listen: Callable[..., Listener], raw_connect: Connect
) -> None:
    listener = listen("tcp:127.0.0.1:0")
    bad = raw_connect(listener.uri)
    bad.sendall(init(0))
    wait_closed_by_listener(bad)
    main = raw_connect(listener.uri)
    main.sendall(HEADER)
    with listener.wait(10) as destination:
        assert destination.multifd == []
        assert destination.main.read_exact(8) == HEADER
    (refusal,) = listener.refusals
    assert refusal.endswith(": a multifd channel, but multifd is off here (multifd-channels 0)")


def test_refusal_names_the_peer_address(
    listen: Callable[..., Listener], raw_connect: Connect
) -> None:
    listener = listen("tcp:127.0.0.1:0", channels=1)
    bad = raw_connect(listener.uri)
    port = bad.getsockname()[1]
    bad.sendall(b"\0\0\0\0")
    wait_closed_by_listener(bad)
    assert listener.refusals[0].startswith(f"incoming connection #1 from 127.0.0.1:{port}: ")


def test_wait_times_out_saying_what_is_missing(listener: Listener, raw_connect: Connect) -> None:
    send_source(raw_connect, listener.uri, [1, 3])
    bad = raw_connect(listener.uri)
    bad.sendall(b"XXXX")
    wait_closed_by_listener(bad)
    with pytest.raises(ChannelTimeoutError) as info:
        listener.wait(0.05)
    assert str(info.value) == (
        f"listener: timed out after 0.05 s waiting for channels on {listener.uri} "
        f"(missing the main channel and channels 0, 2; 1 connection(s) refused, the last: "
        f"{listener.refusals[0]})"
    )
    assert not listener.has_all_channels()


def test_close_during_wait(listener: Listener, background: Callable[..., Any]) -> None:
    waiting = background(listener.wait, 30)
    listener.close()
    with pytest.raises(
        ChannelError, match=r"listener: closed on .* before the channels were handed over"
    ):
        waiting.result()


def test_close_releases_channels_not_handed_over(listener: Listener, raw_connect: Connect) -> None:
    socks = send_source(raw_connect, listener.uri, ["main", 0, 1, 2])
    silent = raw_connect(listener.uri)
    for sock in socks.values():  # each placed or in handshake; close() must end all
        sock.settimeout(10)
    listener.close()
    for sock in [*socks.values(), silent]:
        wait_closed_by_listener(sock)
    with pytest.raises(ChannelError, match=r"closed on .* before the channels were handed over"):
        listener.wait(0)


def test_wait_hands_over_once_for_all(listener: Listener, raw_connect: Connect) -> None:
    send_source(raw_connect, listener.uri, ["main", 0, 1, 2, 3])
    destination = listener.wait(10)
    assert listener.wait(0) == destination
    listener.close()
    with destination:
        check_placed(destination)  # still open: they belong to the caller now


def test_header_magic_stays_in_the_main_stream(
    listen: Callable[..., Listener], raw_connect: Connect
) -> None:
    listener = listen("tcp:127.0.0.1:0")
    main = raw_connect(listener.uri)
    main.sendall(HEADER)
    with listener.wait(10) as destination:
        assert destination.main.bytes_read == 0
        assert destination.main.read_exact(4) == b"QEVM"


def test_a_refusal_prints_nothing_where_logging_is_not_configured(
    listen: Callable[..., Listener],
    raw_connect: Connect,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A program that imports the library and configures no logging: the warning
    for a refused connection must not reach its stderr through Python's
    last-resort handler (the package has a NullHandler)."""
    # As in a plain program: no handler anywhere (pytest puts its own on the root).
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    listener = listen("tcp:127.0.0.1:0")
    sock = raw_connect(listener.uri)
    sock.sendall(b"junk")
    wait_closed_by_listener(sock)
    assert listener.refusals and "unknown channel magic 0x6a756e6b" in listener.refusals[0]
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
