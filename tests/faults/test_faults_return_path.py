"""With return-path, a destination that refuses or dies is the source's failure
too: never `completed` for memory the destination does not hold."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from e2e_support import FINISH_TIMEOUT, MiB, Migration, source_threads, wait_until
from relay import Relay, block_name

from multifd.demo.workload import fill
from multifd.memory import RAMBlock
from multifd.migration.source import MigrationSource

SIZE = 8 * MiB


def corrupt_a_block1_page(header: bytearray, payload: bytes) -> bytes | None:
    """One flipped byte in a page of "block1", a block the workload leaves alone
    (a page it rewrote would be sent again, right, and hide the corruption)."""
    if block_name(header) != "block1":
        return None
    return bytes([payload[0] ^ 0xFF]) + payload[1:]


def test_corrupted_page_fails_the_source_too(migration: Callable[..., Migration]) -> None:
    m = migration(
        sizes=(SIZE, 1 * MiB),
        workload_rate=5_000,
        capabilities={"x-verify": True, "return-path": True},
        # One channel: the relay corrupts the packets of channel 0.
        parameters={"multifd-channels": 1, "x-io-timeout": 5},
    )
    untouched = m.src_blocks[1].sha256()
    m.uri = m.destination.incoming(m.listen_uri)
    relay = Relay(m.uri, corrupt_a_block1_page)
    try:
        m.workload.start()
        m.source.migrate(relay.uri)
        src, dst = m.finish()
    finally:
        relay.close()
    assert relay.mutated.is_set()
    # The destination refused to resume ...
    assert dst["status"] == "failed", dst
    assert m.resumed == []
    assert dst["x-verify"]["mismatches"] == 1
    # ... and the source knows it, in the destination's words.
    assert src["status"] == "failed", src
    error = src["error-desc"]
    assert error.startswith("the destination reported failure (SHUT 1): "), error
    assert 'x-verify: memory differs from the source\'s: block "block1": 1 page(s) differ' in error
    assert m.source.query()["status"] == "failed"
    assert src["x-return-path"] == {"pongs": [1], "shut": 1}
    # The workload runs on, its memory untouched by the migration.
    assert m.stops == m.source_resumes == 1
    assert not m.workload.paused
    written = m.workload.pages_written
    wait_until(lambda: m.workload.pages_written > written, what="the workload to write again")
    assert m.src_blocks[1].sha256() == untouched
    assert source_threads() == []
    m.assert_completed()


DESTINATION = """
import sys, time
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination

def resume(state):
    # Everything landed: killed now, it never sends SHUT.
    print("resumed", flush=True)
    time.sleep(60)

blocks = [RAMBlock.anonymous("pc.ram", int(sys.argv[1]))]
destination = MigrationDestination(blocks, capabilities={"multifd": True}, on_resume=resume)
print(destination.incoming("tcp:127.0.0.1:0"), flush=True)
destination.wait()
"""


@pytest.fixture
def destination_process() -> Iterator[subprocess.Popen]:
    child = subprocess.Popen(
        [sys.executable, "-c", DESTINATION, str(SIZE)], stdout=subprocess.PIPE, text=True
    )
    yield child
    if child.poll() is None:
        child.kill()
    child.wait(FINISH_TIMEOUT)
    assert child.stdout is not None
    child.stdout.close()


def test_destination_killed_before_shut(
    migration: Callable[..., Migration], destination_process: subprocess.Popen
) -> None:
    m = migration(
        sizes=(SIZE,),
        workload_rate=2_000,
        capabilities={"return-path": True},
        parameters={"x-io-timeout": 30},
    )
    assert destination_process.stdout is not None
    uri = destination_process.stdout.readline().strip()
    m.workload.start()
    m.source.migrate(uri)
    assert destination_process.stdout.readline().strip() == "resumed"
    # The source has sent everything and waits for the verdict, its workload
    # stopped; the status stays active (no `device` without pause-before-switchover).
    assert m.source.query()["status"] == "active" and m.source.stopped
    killed = time.monotonic()
    destination_process.kill()
    src = m.source.wait(FINISH_TIMEOUT)
    # Not the I/O timeout: the close is news at once. (A failed migration's
    # query-migrate has no total-time, as QEMU's.)
    assert time.monotonic() - killed < 10
    assert src["status"] == "failed", src
    assert src["error-desc"] in (
        "the destination closed the return path without reporting its result (no SHUT)",
        "the return path from the destination broke: main channel: read failed at stream "
        "offset 0x8: [Errno 104] Connection reset by peer",
    ), src
    assert m.stops == m.source_resumes == 1
    assert not m.workload.paused
    m.assert_completed()


def test_destination_silent_after_loading_is_bounded(migration: Callable[..., Migration]) -> None:
    """A destination that never answers: the source waits x-io-timeout, then fails."""
    m = migration(capabilities={"return-path": True}, parameters={"x-io-timeout": 1})
    m.destination._on_resume = lambda state: wait_until(
        lambda: m.source.query()["status"] == "failed", what="the source to give up"
    )
    src, dst = m.run()
    assert src["error-desc"] == (
        "the destination did not report its result (no SHUT on the return path) within 1 s"
    )
    # The destination did load everything: only the source could not know it.
    assert dst["status"] == "completed"
    assert m.stops == m.source_resumes == 1
    m.destination._on_resume = m._on_dst_resume
    m.assert_completed()


def test_memory_is_equal_after_a_verified_return_path_migration(
    migration: Callable[..., Migration],
) -> None:
    m = migration(sizes=(SIZE, MiB), capabilities={"x-verify": True, "return-path": True})
    src, _ = m.assert_completed()
    assert src["x-return-path"]["shut"] == 0
    for a, b in zip(m.src_blocks, m.dst_blocks, strict=True):
        assert np.array_equal(a.array, b.array)


def _peer(path: str, *, close_at_once: bool) -> tuple[socket.socket, threading.Thread]:
    """A unix listener that accepts one connection and either closes it after
    the file header (a destination refusing the configuration) or never reads
    it (one waiting for channels that never come)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    held: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        if close_at_once:
            conn.recv(8)  # as QEMU, which refuses what follows the file header
            conn.close()
        else:
            held.append(conn)
            listener.settimeout(10)
            with contextlib.suppress(OSError):  # closed by the test
                listener.recv(1)

    thread = threading.Thread(target=serve, name="test-peer")
    thread.start()
    return listener, thread


@pytest.mark.parametrize(
    ("close_at_once", "words"),
    [
        (True, "it had not answered our PING: it refused the stream's header or configuration"),
        (False, "has not answered our PING on the return path: it has not begun to read"),
    ],
)
def test_a_destination_that_never_answers_the_ping_is_named(
    tmp_path: Path, close_at_once: bool, words: str
) -> None:
    block = RAMBlock.anonymous("pc.ram", SIZE)
    fill(block.array)
    source = MigrationSource(
        [block],
        capabilities={"return-path": True},
        parameters={"x-io-timeout": 1, "max-bandwidth": 0},
    )
    path = str(tmp_path / "m.sock")
    listener, thread = _peer(path, close_at_once=close_at_once)
    try:
        source.migrate(f"unix:{path}")
        info = source.wait(FINISH_TIMEOUT)
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join()
        block.close()
    assert info["status"] == "failed", info
    assert words in info["error-desc"], info
