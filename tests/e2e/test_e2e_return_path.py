"""Capability return-path: the source hears the destination's verdict.

Against our destination, and against byte-level peers that play a QEMU 7.2
destination or source, so that what goes on the wire is checked byte for byte.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_support import FINISH_TIMEOUT, TRANSPORTS, MiB, Migration, wait_until

from multifd.channels import Channel
from multifd.demo.workload import fill
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.params import MigrationConfigError
from multifd.migration.qemufile import QEMUFileReader
from multifd.migration.source import DEFAULT_MACHINE_TYPE, MigrationSource
from multifd.wire import (
    Configuration,
    FileHeader,
    MainStreamDecoder,
    Pong,
    SectionStart,
    Shut,
    ShutReason,
    VMCommand,
)
from multifd.wire.appstate import APP_STATE_IDSTR, read_app_state

RETURN_PATH = {"return-path": True}


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("multifd", [True, False])
def test_completes_on_the_destinations_word(
    migration: Callable[..., Migration], transport: str, multifd: bool
) -> None:
    m = migration(transport=transport, capabilities={**RETURN_PATH, "multifd": multifd})
    src, _ = m.assert_completed()
    # The PING(1) was answered and the destination said it loaded everything.
    assert src["x-return-path"] == {"pongs": [1], "shut": 0}
    assert m.statuses("source")[-1] == "completed"


def test_without_return_path_nothing_is_sent_back(migration: Callable[..., Migration]) -> None:
    m = migration()
    src, _ = m.assert_completed()
    assert "x-return-path" not in src


def test_a_destination_failure_reaches_the_source(migration: Callable[..., Migration]) -> None:
    """The destination refuses the stream after the source sent everything: the
    source fails with the destination's reason, resumes, and migrates again."""
    m = migration(sizes=(2 * MiB,), capabilities=RETURN_PATH)
    m.destination.set_capabilities({"x-verify": True})
    src, dst = m.run()
    assert dst["status"] == "failed", dst
    assert src["status"] == "failed", src
    assert src["error-desc"] == (
        "the destination reported failure (SHUT 1): main channel: x-verify is on but the "
        "source sent no page hashes (enable x-verify on the source)"
    )
    assert m.stops == m.source_resumes == 1
    assert m.resumed == []
    assert src["x-return-path"] == {"pongs": [1], "shut": 1}
    m.destination.set_capabilities({"x-verify": False})
    m.assert_completed()


def test_a_failure_before_the_return_path_opens(migration: Callable[..., Migration]) -> None:
    """The configuration comes before OPEN_RETURN_PATH: a destination refusing it
    cannot answer, and the source says so rather than `completed`."""
    m = migration(sizes=(2 * MiB,), capabilities=RETURN_PATH)
    m.destination.machine_type = "not-this-one"
    src, dst = m.run()
    assert "Machine type received is 'multifd-python'" in dst["error-desc"], dst
    assert src["status"] == "failed", src
    # Whichever the source saw first: the silent return path, or the broken stream.
    error = src["error-desc"]
    assert re.search(r"without reporting its result \(no SHUT\)|Broken pipe|reset by peer", error)
    m.destination.machine_type = None
    m.assert_completed()


def test_a_destination_cancel_reaches_the_source(migration: Callable[..., Migration]) -> None:
    m = migration(
        sizes=(16 * MiB,), capabilities=RETURN_PATH, parameters={"max-bandwidth": 32 * MiB}
    )
    m.start()
    wait_until(
        lambda: m.destination.query().get("x-ram", {}).get("transferred", 0) > 2 * MiB,
        what="part of round 1 received",
    )
    m.destination.cancel()
    src, dst = m.finish()
    assert dst["status"] == "cancelled", dst
    assert src["status"] == "failed", src
    error = src["error-desc"]
    assert error == "the destination reported failure (SHUT 1): cancelled at the destination"
    m.source.set_parameters({"max-bandwidth": 0})
    m.assert_completed()


def test_a_throttled_source_fails_as_soon_as_the_destination_cancels(
    migration: Callable[..., Migration],
) -> None:
    """The migration thread waiting out max-bandwidth (a 4 MiB chunk takes 16 s
    at 256 KiB/s) still notices the destination's failure within its 100 ms steps."""
    m = migration(
        sizes=(16 * MiB,), capabilities=RETURN_PATH, parameters={"max-bandwidth": 256 * 1024}
    )
    m.start()
    wait_until(
        # Received, not only sent: the destination has opened its return path.
        lambda: m.destination.query().get("x-ram", {}).get("transferred", 0) > MiB,
        what="part of the first chunk received",
    )
    m.destination.cancel()
    wait_until(lambda: m.source.state.error is not None, what="the SHUT 1")
    info = m.source.wait(2.0)
    assert info["status"] == "failed", info
    assert info["error-desc"] == (
        "the destination reported failure (SHUT 1): cancelled at the destination"
    )
    m.source.set_parameters({"max-bandwidth": 0})
    m.assert_completed()


def test_return_path_needs_a_socket(tmp_path: Path) -> None:
    block = RAMBlock.anonymous("pc.ram", MiB)
    try:
        source = MigrationSource([block], capabilities=RETURN_PATH)
        for uri in (f"file:{tmp_path}/stream", "exec:cat > /dev/null"):
            with pytest.raises(MigrationConfigError, match="return-path needs a socket") as no:
                source.migrate(uri)
            # As QEMU's: that migration began and failed, and another may start.
            assert source.query() == {"status": "failed", "error-desc": str(no.value)}
    finally:
        block.close()


# -- a byte-level destination, as QEMU 7.2's ------------------------------------


class FakeDestination:
    """Accepts one plain (no multifd) migration, checks what follows the
    configuration byte for byte, reads the stream to its end, then answers with
    `reply`: bytes written on the return path; none, closing at once; or None,
    silent until closed."""

    def __init__(self, reply: Callable[[], bytes | None]) -> None:
        self._reply = reply
        self.server = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.server.getsockname()[1]}"
        self.after_configuration = b""
        self.records: list = []
        self.error: BaseException | None = None
        self.release = threading.Event()  # a reply of None waits for it before closing
        self._thread = threading.Thread(target=self._run, name="fake-destination")
        self._thread.start()

    def _run(self) -> None:
        try:
            sock, _ = self.server.accept()
            with Channel(sock, "main channel", timeout=FINISH_TIMEOUT) as channel:
                prefix = FileHeader().pack() + Configuration.build(DEFAULT_MACHINE_TYPE).pack()
                assert channel.read_exact(len(prefix)) == prefix
                # OPEN_RETURN_PATH (5 bytes), PING (9), then the ram section's START.
                self.after_configuration = channel.read_exact(15)
                channel.unread(prefix + self.after_configuration)
                # Our application state is read by its layout: an opaque device
                # section would be read to the end of the stream, which the
                # source ends only after the verdict.
                decoder = MainStreamDecoder(
                    QEMUFileReader(channel), known_devices={APP_STATE_IDSTR: read_app_state}
                )
                for record in decoder:
                    self.records.append(record)
                    if record == VMCommand.ping(1):
                        channel.write_all(Pong(1).pack())
                reply = self._reply()
                if reply is None:
                    self.release.wait(FINISH_TIMEOUT)
                elif reply:
                    channel.write_all(reply)
                    # The source closes first, once it has the verdict.
                    channel.read_some_into(bytearray(1))
        except BaseException as exc:  # reported by close(), in the test's thread
            self.error = exc

    def close(self) -> None:
        self.release.set()
        self.server.close()
        self._thread.join(FINISH_TIMEOUT)
        if self.error is not None:
            raise self.error


@pytest.fixture
def plain_source() -> Iterator[tuple[MigrationSource, list[str]]]:
    """A source of 1 MiB, return-path on, no multifd; its callbacks recorded."""
    block = RAMBlock.anonymous("pc.ram", MiB)
    fill(block.array)
    calls: list[str] = []
    source = MigrationSource(
        [block],
        capabilities=RETURN_PATH,
        parameters={"max-bandwidth": 0, "x-io-timeout": 2},
        on_stop=lambda: calls.append("stop"),
        on_resume=lambda: calls.append("resume"),
    )
    yield source, calls
    source.cancel()
    source.wait(FINISH_TIMEOUT)
    block.close()


def _migrate(source: MigrationSource, reply: Callable[[], bytes | None]) -> dict:
    peer = FakeDestination(reply)
    try:
        source.migrate(peer.uri)
        result = source.wait(FINISH_TIMEOUT)
    finally:
        peer.close()
    # The return path is opened and pinged right after the configuration.
    assert peer.after_configuration == (
        bytes.fromhex("08 0001 0000") + bytes.fromhex("08 0002 0004 00000001") + b"\x01"
    )
    assert peer.records[2:5] == [
        VMCommand.open_return_path(),
        VMCommand.ping(1),
        SectionStart(2, "ram", 0, 4),
    ]
    return result


def test_shut_0_completes(plain_source: tuple[MigrationSource, list[str]]) -> None:
    source, calls = plain_source
    result = _migrate(source, lambda: Shut(0).pack())
    assert result["status"] == "completed", result
    assert result["x-return-path"] == {"pongs": [1], "shut": 0}
    assert calls == ["stop"]


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (Shut(1).pack(), "the destination reported failure (SHUT 1)"),
        (
            Shut(7).pack() + ShutReason("x-verify: memory differs").pack(),
            "the destination reported failure (SHUT 7): x-verify: memory differs",
        ),
        (b"", "the destination closed the return path without reporting its result (no SHUT)"),
        (
            bytes.fromhex("0009 0000"),
            "bad return path message from the destination: main channel: return path: "
            "byte 0x8: return path message type 0x0009 unknown (length 0x0000)",
        ),
        (
            bytes.fromhex("0001 0008") + bytes(8),
            "bad return path message from the destination: main channel: return path: "
            "byte 0xa: return path message SHUT (0x0001) has length 8, expected 4",
        ),
        (None, "the destination did not report its result (no SHUT on the return path) within 2 s"),
    ],
    ids=["shut 1", "shut 7 with a reason", "closed", "unknown", "bad length", "silent"],
)
def test_anything_but_shut_0_fails_and_resumes(
    plain_source: tuple[MigrationSource, list[str]], reply: bytes | None, error: str
) -> None:
    source, calls = plain_source
    result = _migrate(source, lambda: reply)
    assert result["status"] == "failed", result
    assert result["error-desc"] == error
    assert calls == ["stop", "resume"]


# -- a byte-level source, as QEMU 7.2's ------------------------------------------


@pytest.fixture
def destination() -> Iterator[MigrationDestination]:
    block = RAMBlock.anonymous("pc.ram", MiB)
    dst = MigrationDestination([block], parameters={"x-io-timeout": 5})
    yield dst
    dst.cancel()
    dst.wait(FINISH_TIMEOUT)
    block.close()


def _connect(uri: str) -> socket.socket:
    host, port = uri.removeprefix("tcp:").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=FINISH_TIMEOUT)
    sock.sendall(FileHeader().pack() + Configuration.build(DEFAULT_MACHINE_TYPE).pack())
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    while chunk := sock.recv(4096):
        data += chunk
    return bytes(data)


def test_destination_pongs_then_shuts_1_with_its_reason(
    destination: MigrationDestination,
) -> None:
    uri = destination.incoming("tcp:127.0.0.1:0")
    with _connect(uri) as sock:
        sock.sendall(VMCommand.open_return_path().pack() + VMCommand.ping(0xC0FFEE).pack())
        assert sock.recv(8, socket.MSG_WAITALL) == bytes.fromhex("0002 0004 00c0ffee")
        sock.sendall(b"\x42")  # no such record type
        answer = _read_all(sock)
    result = destination.wait(FINISH_TIMEOUT)
    assert result["status"] == "failed"
    reason = result["error-desc"].encode()
    assert reason.startswith(b"main channel: byte 0x")
    assert answer == (
        bytes.fromhex("0001 0004 00000001")
        + bytes.fromhex("8000")
        + len(reason).to_bytes(2, "big")
        + reason
    )


def test_destination_refuses_a_ping_without_return_path(
    destination: MigrationDestination,
) -> None:
    uri = destination.incoming("tcp:127.0.0.1:0")
    with _connect(uri) as sock:
        sock.sendall(VMCommand.ping(1).pack())
        assert _read_all(sock) == b""  # nothing to answer on
    result = destination.wait(FINISH_TIMEOUT)
    assert result["status"] == "failed"
    assert result["error-desc"].endswith("PING (0x1) received with no return path")
