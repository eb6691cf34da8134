"""Real QEMU 7.2 migrations (tests/fixtures) replayed into our destination, their
multifd channels altered: data held past the main stream's last sync, channels
idle between rounds, a channel that goes silent before its SYNC, and a source
that does not read its return path."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from e2e_support import FINISH_TIMEOUT, wait_until

from multifd.analyze import load_recording
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.wire import (
    INIT_SIZE,
    PACKET_HEADER_SIZE,
    TARGET_PAGE_SIZE,
    Configuration,
    FileHeader,
    MultiFDInit,
    MultiFDPacket,
    RamBlockEntry,
    VMCommand,
)

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "qemu-7.2"
RECORDINGS = ("mf2-nokernel", "mf4-mb", "mf2-mb-bw50M")


class Replay:
    """A destination made for a recording (its blocks from the source's list)
    and the source's sockets, all closed at the end."""

    def __init__(self, channels: int, listen: str, **parameters: Any) -> None:
        self.blocks: list[RAMBlock] = []
        self.resumed: list[bool] = []
        self.destination = MigrationDestination(
            self._make_blocks,
            capabilities={"multifd": channels > 0},
            parameters={"multifd-channels": channels or 2, **parameters},
            on_resume=lambda state: self.resumed.append(True),
        )
        self.uri = self.destination.incoming(listen)
        self.socks: list[socket.socket] = []

    def _make_blocks(self, entries: Sequence[RamBlockEntry]) -> list[RAMBlock]:
        self.blocks = [RAMBlock.anonymous(e.name, e.used_length) for e in entries]
        return self.blocks

    def connect(self, count: int) -> list[socket.socket]:
        for _ in range(count):
            if self.uri.startswith("unix:"):
                self.socks.append(socket.socket(socket.AF_UNIX))
                self.socks[-1].connect(self.uri.removeprefix("unix:"))
            else:
                host, port = self.uri.removeprefix("tcp:").rsplit(":", 1)
                self.socks.append(socket.create_connection((host, int(port))))
        return self.socks

    def send(self, streams: Sequence[bytes], *, close: bool = True) -> None:
        """Each stream on its own connection, all at once (as a source's threads
        do); `close`: then end them, as a source does once it has completed."""
        socks = self.connect(len(streams))
        senders = [
            threading.Thread(target=_send, args=(s, data))
            for s, data in zip(socks, streams, strict=True)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(FINISH_TIMEOUT)
        if close:
            for s in socks:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.destination.cancel()
        self.destination.wait(FINISH_TIMEOUT)
        for s in self.socks:
            s.close()
        for block in self.blocks:
            block.close()


def _send(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # a destination that failed stops reading
        sock.sendall(data)


@pytest.fixture
def replay() -> Iterator[Any]:
    made: list[Replay] = []

    def make(channels: int, listen: str = "tcp:127.0.0.1:0", **parameters: Any) -> Replay:
        made.append(Replay(channels, listen, **parameters))
        return made[-1]

    yield make
    for r in made:
        r.close()


def _recording(name: str) -> tuple[bytes, list[bytes], dict[str, Any]]:
    recording = load_recording(FIXTURES / name)
    meta = json.loads((FIXTURES / name / "meta.json").read_text())
    return recording.main, list(recording.channels), meta


def _packets(stream: bytes) -> tuple[bytes, list[bytes]]:
    """A recorded (uncompressed) multifd channel: its init, then each packet whole."""
    packets = []
    at = INIT_SIZE
    while at < len(stream):
        header = MultiFDPacket.unpack(stream[at : at + PACKET_HEADER_SIZE])
        end = at + PACKET_HEADER_SIZE + header.normal_pages * TARGET_PAGE_SIZE
        packets.append(stream[at:end])
        at = end
    return stream[:INIT_SIZE], packets


def _channel_id(stream: bytes) -> int:
    return MultiFDInit.unpack(stream[:INIT_SIZE]).channel_id


@pytest.mark.parametrize("close", [True, False], ids=["channels closed", "channels left open"])
@pytest.mark.parametrize("name", RECORDINGS)
def test_recorded_migrations_complete(replay: Any, name: str, close: bool) -> None:
    """The check for data past the last sync finds none in what QEMU sends,
    whether its channels are closed by then or still open (a source cleans
    up after the destination has loaded, with return-path)."""
    main, channels, meta = _recording(name)
    r = replay(len(channels), **{"x-io-timeout": 5})
    r.send([main, *channels], close=close)
    info = r.destination.wait(FINISH_TIMEOUT)
    assert info["status"] == "completed", info
    # What QEMU counted as sent is what arrived, to the byte: RAM records on
    # main (not the header, block list, section headers or device state) and
    # the multifd packets (not their init).
    qemu = meta["query_migrate"]["ram"]
    for key in ("normal", "duplicate", "transferred", "multifd-bytes"):
        assert info["x-ram"][key] == qemu[key], key
    assert r.resumed == [True]


def test_pages_behind_extra_syncs_fail_naming_the_channel(replay: Any) -> None:
    """A channel whose first SYNC comes three more times ahead of its pages uses
    up the main stream's syncs with them: its pages would land after the last
    sync, or never. The destination fails, names it, and does not resume."""
    main, channels, _ = _recording("mf2-nokernel")
    init, packets = _packets(channels[0])
    altered = init + b"".join([packets[0]] * 3) + b"".join(packets)
    r = replay(len(channels))
    r.send([main, altered, *channels[1:]])
    info = r.destination.wait(FINISH_TIMEOUT)
    assert info["status"] == "failed", info
    assert info["error-desc"].startswith(
        f"channel {_channel_id(altered)}: data after its last SYNC (the main stream asked for 3): "
    ), info
    assert r.resumed == []


def test_channels_idle_after_their_last_sync_wait_for_a_slow_main_channel(replay: Any) -> None:
    """The channels have sent everything and stay open; the main channel sends
    its last bytes slowly, each within x-io-timeout but all of them in more:
    idle channels owe nothing, the migration completes."""
    main, channels, _ = _recording("mf2-nokernel")
    r = replay(len(channels), **{"x-io-timeout": 1})
    socks = r.connect(1 + len(channels))
    for s, data in zip(socks[1:], channels, strict=True):
        s.sendall(data)
    tail = 2000
    socks[0].sendall(main[:-tail])
    for start in range(-tail, 0, 500):
        time.sleep(0.6)
        socks[0].sendall(main[start : start + 500 or None])
    info = r.destination.wait(FINISH_TIMEOUT)
    assert info["status"] == "completed", info


def test_silent_main_channel_is_named(replay: Any) -> None:
    """The main channel stops in the middle while the channels have sent
    everything: the timeout is the main channel's."""
    main, channels, _ = _recording("mf2-nokernel")
    r = replay(len(channels), **{"x-io-timeout": 1})
    socks = r.connect(1 + len(channels))
    for s, data in zip(socks, [main[:-2000], *channels], strict=True):
        s.sendall(data)
    info = r.destination.wait(FINISH_TIMEOUT)
    assert info["status"] == "failed", info
    assert info["error-desc"].startswith("main channel: "), info
    assert "no data for 1 s" in info["error-desc"], info


def test_channel_silent_before_its_sync_fails_once_it_is_due(replay: Any) -> None:
    """Channel sends its first SYNC and one packet of pages, then nothing (the
    socket stays open): the main stream waits for its next SYNC for x-io-timeout,
    no longer, and the error names the packet that never came (the one after
    the pages)."""
    main, channels, _ = _recording("mf2-nokernel")
    init, packets = _packets(channels[0])
    assert MultiFDPacket.unpack(packets[1][:PACKET_HEADER_SIZE]).normal_pages
    r = replay(len(channels), **{"x-io-timeout": 1})
    socks = r.connect(1 + len(channels))
    for s, data in zip(socks, [main, init + packets[0] + packets[1], *channels[1:]], strict=True):
        s.sendall(data)
    sent = time.monotonic()
    info = r.destination.wait(FINISH_TIMEOUT)
    took = time.monotonic() - sent
    assert info["status"] == "failed", info
    channel_id = _channel_id(channels[0])
    assert info["error-desc"].startswith(
        f"channel {channel_id}: packet 2: no SYNC for round 1 within 1 s (x-io-timeout); "
        f"received up to stream offset {INIT_SIZE + len(packets[0]) + len(packets[1]):#x}"
    ), info
    assert took < 1.7, took  # one timeout, not two


def _flood_pings(r: Replay, channels: int) -> tuple[list[socket.socket], threading.Thread]:
    """A source that opens the return path, then sends PINGs and never reads
    the PONGs; returns once the destination's migration thread is blocked
    writing one (its return path's writer stays busy). A unix socket: once
    full, TCP would still let a PONG through now and then (window probes)."""
    socks = r.connect(1 + channels)
    main = socks[0]
    for channel_id, s in enumerate(socks[1:]):
        s.sendall(MultiFDInit(bytes(16), channel_id).pack())
    main.sendall(
        FileHeader().pack()
        + Configuration.build("pc-i440fx-7.2").pack()
        + VMCommand.open_return_path().pack()
    )
    pings = VMCommand.ping(1).pack() * 4096

    def flood() -> None:
        with contextlib.suppress(OSError):  # until the destination ends
            while True:
                main.sendall(pings)

    flooding = threading.Thread(target=flood)
    flooding.start()

    def writer_blocked() -> bool:
        return_path = r.destination._return_path
        if return_path is None or not return_path._lock.locked():
            return False
        written = return_path._channel.bytes_written
        time.sleep(0.5)
        return return_path._lock.locked() and return_path._channel.bytes_written == written

    wait_until(writer_blocked, what="a PONG that cannot be written")
    return socks, flooding


@pytest.mark.parametrize("failing", [False, True], ids=["idle", "a channel failing"])
def test_cancel_does_not_wait_for_a_source_that_does_not_read(
    replay: Any, tmp_path: Path, failing: bool
) -> None:
    """The migration thread is blocked writing a PONG: cancel returns at once
    (no SHUT: it could not be written without waiting), even while a receive
    thread's failure waits to send its own SHUT."""
    r = replay(2, f"unix:{tmp_path / 'm.sock'}", **{"x-io-timeout": 10})
    socks, flooding = _flood_pings(r, 2)
    if failing:
        socks[1].sendall(bytes(PACKET_HEADER_SIZE))  # no packet magic
        wait_until(
            lambda: r.destination._receiver.channels[0].stats.error is not None,
            what="channel 0's failure",
        )
        time.sleep(0.2)  # into its SHUT, which waits for the PONG being written
    started = time.monotonic()
    r.destination.cancel()
    took = time.monotonic() - started
    info = r.destination.wait(FINISH_TIMEOUT)
    flooding.join(FINISH_TIMEOUT)
    assert took < 2, took
    assert info["status"] == ("failed" if failing else "cancelled"), info
