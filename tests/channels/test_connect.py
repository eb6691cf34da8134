"""The source side: main first with its header, then the multifd channels with their
init packets; failures close everything; pages round-trip through the wire layer."""

from __future__ import annotations

import socket
import uuid as uuid_module
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from multifd.channels import (
    Channel,
    ChannelEOFError,
    ChannelError,
    Listener,
    TLSConfig,
    URIError,
    connect_channels,
)
from multifd.channels import connect as connect_module
from multifd.wire import (
    INIT_SIZE,
    TARGET_PAGE_SIZE,
    MultiFDInit,
    MultiFDPacket,
    Reader,
    Where,
    WireError,
    read_packet,
)

HEADER = b"QEVM\x00\x00\x00\x03"
UUID = uuid_module.uuid4().bytes
PAGE = TARGET_PAGE_SIZE


def test_main_connects_and_sends_its_header_before_any_multifd_channel() -> None:
    """A QEMU 7.2 destination takes the first connection as main: it must be."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        port = server.getsockname()[1]
        with connect_channels(
            f"tcp:127.0.0.1:{port}", header=HEADER, channels=3, uuid=UUID
        ) as source:
            accepted = [server.accept()[0] for _ in range(4)]
            try:
                assert accepted[0].recv(8, socket.MSG_WAITALL) == HEADER
                inits = [
                    MultiFDInit.unpack(conn.recv(INIT_SIZE, socket.MSG_WAITALL))
                    for conn in accepted[1:]
                ]
            finally:
                for conn in accepted:
                    conn.close()
    assert sorted(init.channel_id for init in inits) == [0, 1, 2]
    assert {init.uuid for init in inits} == {UUID}
    assert [c.name for c in source.all] == ["main channel", "channel 0", "channel 1", "channel 2"]
    assert [c.bytes_written for c in source.all] == [8, 64, 64, 64]
    assert all(c.timeout is None for c in source.all)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_main_that_cannot_connect_names_the_channel_and_the_os_error() -> None:
    port = _free_port()
    with pytest.raises(ChannelError) as info:
        connect_channels(f"tcp:127.0.0.1:{port}", header=HEADER, channels=2)
    assert str(info.value) == (
        f"main channel: connect to tcp:127.0.0.1:{port} failed: [Errno 111] Connection refused"
    )
    assert info.value.errno == 111


def test_a_multifd_channel_that_cannot_connect_fails_all_and_closes_all(
    listen: Callable[..., Listener], monkeypatch: pytest.MonkeyPatch
) -> None:
    listener = listen("tcp:127.0.0.1:0", channels=4, uuid=UUID)
    opened: list[str] = []
    real_connect = connect_module.connect_socket

    def flaky(uri: Any, name: str, timeout: float | None, **options: Any) -> socket.socket:
        if name in ("channel 2", "channel 3"):
            raise ChannelError(name, f"connect to {uri} failed: [Errno 111] Connection refused")
        opened.append(name)
        return real_connect(uri, name, timeout, **options)

    monkeypatch.setattr(connect_module, "connect_socket", flaky)
    with pytest.raises(ChannelError) as info:
        connect_channels(listener.uri, header=HEADER, channels=4, uuid=UUID)
    assert str(info.value) == (
        f"channel 2: connect to {listener.uri} failed: [Errno 111] Connection refused"
    )
    assert info.value.__notes__ == [
        f"also: channel 3: connect to {listener.uri} failed: [Errno 111] Connection refused"
    ]
    assert sorted(opened) == ["channel 0", "channel 1", "main channel"]
    assert not listener.has_all_channels()
    # The leak check (conftest) proves every socket opened was closed.


def test_pages_round_trip_through_the_wire_layer(
    listen: Callable[..., Listener], background: Callable[..., Any]
) -> None:
    """Each channel sends packets of 128 pages straight from a block (header + page
    views in one writev); the destination reads each header and then the pages
    straight into its own block (readv_into page slices)."""
    channels, packets = 4, 8
    block = np.random.default_rng(7).integers(0, 256, channels * packets * 128 * PAGE, np.uint8)
    received = np.zeros_like(block)
    listener = listen("tcp:127.0.0.1:0", channels=channels, uuid=UUID)
    source = connect_channels(listener.uri, header=HEADER, channels=channels, uuid=UUID)

    def send(channel: Channel, first_page: int) -> None:
        view = memoryview(block)
        for p in range(packets):
            pages = range(first_page + p * 128, first_page + (p + 1) * 128)
            header = MultiFDPacket.for_pages(
                "pc.ram",
                [i * PAGE for i in pages],
                flags=0,
                packet_num=p,
                payload_size=128 * PAGE,
            )
            channel.writev_all([header.pack(), *(view[i * PAGE : (i + 1) * PAGE] for i in pages)])

    def receive(channel: Channel, channel_id: int) -> int:
        reader = Reader(channel, Where(channel=channel_id), offset=channel.bytes_read)
        view = memoryview(received)
        for _ in range(packets):
            packet = read_packet(reader)
            slices = [view[int(o) : int(o) + PAGE] for o in packet.offsets()]
            reader.offset += channel.readv_into(slices)
        return reader.offset

    with source, listener.wait(10) as destination:
        tasks = [
            background(send, channel, i * packets * 128) for i, channel in enumerate(source.multifd)
        ]
        tasks += [background(receive, channel, i) for i, channel in enumerate(destination.multifd)]
        results = [task.result(30) for task in tasks]
    assert np.array_equal(block, received)
    per_channel = INIT_SIZE + packets * (1344 + 128 * PAGE)
    assert results[channels:] == [per_channel] * channels
    assert [c.bytes_written for c in source.multifd] == [per_channel] * channels


def test_peer_dying_mid_packet(listen: Callable[..., Listener]) -> None:
    listener = listen("tcp:127.0.0.1:0", channels=2, uuid=UUID)
    source = connect_channels(listener.uri, header=HEADER, channels=2, uuid=UUID)
    with source, listener.wait(10) as destination:
        header = MultiFDPacket.for_pages(
            "pc.ram", [0, PAGE], flags=0, packet_num=0, payload_size=2 * PAGE
        ).pack()
        source.multifd[1].write_all(header[:300])
        source.multifd[1].close()
        with pytest.raises(WireError) as info:
            read_packet(Reader(destination.multifd[1], Where(channel=1), offset=INIT_SIZE))
        assert str(info.value) == (
            "channel 1: byte 0x40: truncated packet header: needs 1344 bytes (channel 1: "
            "peer closed the stream 1044 bytes short: got 300 of 1344 bytes read at stream "
            "offset 0x40)"
        )
        # Dying inside the pages: the page read says how much of them was missing.
        source.multifd[0].writev_all([header, bytes(PAGE + 100)])
        source.multifd[0].close()
        assert read_packet(Reader(destination.multifd[0], offset=INIT_SIZE)).normal_pages == 2
        with pytest.raises(ChannelEOFError) as eof:
            destination.multifd[0].readv_into([bytearray(PAGE), bytearray(PAGE)])
        assert str(eof.value) == (
            "channel 0: peer closed the stream 3996 bytes short: got 4196 of 8192 bytes read "
            "at stream offset 0x580"
        )


def test_shutdown_interrupts_a_blocked_receive(
    listen: Callable[..., Listener], background: Callable[..., Any]
) -> None:
    """The cancel path: shutdown() makes every blocked call return; then join, close."""
    listener = listen("tcp:127.0.0.1:0", channels=2, uuid=UUID)
    source = connect_channels(listener.uri, header=HEADER, channels=2, uuid=UUID)
    with source, listener.wait(10) as destination:
        readers = [background(channel.read_exact, 1344) for channel in destination.multifd]
        destination.shutdown()
        for reader in readers:
            with pytest.raises(ChannelError, match="shut down while reading"):
                reader.result()


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"uuid": b"short"}, ValueError, "UUID is 5 bytes, expected 16"),
        ({"channels": 256}, ValueError, "multifd-channels 256"),
        ({"channels": -1}, ValueError, "multifd-channels -1"),
    ],
)
def test_bad_arguments_refused_before_connecting(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        connect_channels("tcp:127.0.0.1:9", header=HEADER, **options)


def test_tls_refused_on_a_single_stream_transport(tmp_path: Any) -> None:
    with pytest.raises(URIError, match="TLS"):
        connect_channels("exec:cat", header=HEADER, tls=TLSConfig(tmp_path))


def test_tls_on_unix_needs_a_hostname(tmp_path: Any) -> None:
    with pytest.raises(URIError, match="needs tls-hostname"):
        connect_channels(f"unix:{tmp_path}/s", header=HEADER, tls=TLSConfig(tmp_path))
