"""Every dirty tracker in a whole migration, against a known write pattern made
between rounds: exactly those pages travel again, and memory ends identical."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from e2e_support import FINISH_TIMEOUT, MiB, Migration, write_pages

from multifd.demo.workload import fill
from multifd.memory import KernelTracker, RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.source import MigrationSource

# Two disjoint patterns: pass 1 (setup, before round 1) and pass 2 (after it).
# Whether the second is sent in a round of its own or at switchover, every
# page of it travels once more after round 1, and no other page does, but those
# of the first with a tracker set up at once (hash, explicit): the kernel
# tracker starts each range only when round 1 reaches it, so a page written
# before round 1 read it travels once.
FIRST = np.array([0, 3, 7, *range(100, 121), 2047])
SECOND = np.array([1, 500, *range(1000, 1010)])
# Data pages made zero at pass 2 travel again as ZERO records.
ZEROED_COUNT = 3


def _data_pages(m: Migration, count: int) -> np.ndarray:
    """The first data (non-zero) pages outside both patterns."""
    rows = m.src_blocks[0].page_rows(np.uint64)
    data = np.flatnonzero(np.any(rows != 0, axis=1))
    return np.setdiff1d(data, np.concatenate((FIRST, SECOND)))[:count]


def _write_pattern(m: Migration, mark: bool, zeroed: np.ndarray) -> Callable[[int], None]:
    block = m.src_blocks[0]
    rows = block.page_rows()

    def on_pass(n: int) -> None:
        if n == 1:
            write_pages(block, FIRST)
            if mark:
                for page in FIRST.tolist():
                    block.mark_dirty(page * 4096 + 8, 1)
        elif n == 2 and not m.stopped:
            write_pages(block, SECOND)
            rows[zeroed] = 0
            if mark:
                for page in [*SECOND.tolist(), *zeroed.tolist()]:
                    block.mark_dirty(page * 4096, 4096)

    return on_pass


@pytest.mark.parametrize("tracker", ["kernel", "hash", "explicit", "auto"])
def test_tracker_sees_the_write_pattern(migration: Callable[..., Migration], tracker: str) -> None:
    if tracker == "kernel" and (reason := KernelTracker.probe()) is not None:
        pytest.skip(f"kernel dirty tracking unavailable: {reason}")
    m = migration(parameters={"multifd-channels": 2, "x-dirty-tracker": tracker})
    zeroed = _data_pages(m, ZEROED_COUNT)
    m.on_pass = _write_pattern(m, mark=tracker == "explicit", zeroed=zeroed)
    src, dst = m.assert_completed()

    expected = (
        tracker if tracker != "auto" else "kernel" if KernelTracker.probe() is None else "hash"
    )
    assert src["x-dirty-tracker"] == {"pc.ram": expected}
    pages = m.src_blocks[0].pages
    again = len(SECOND) + ZEROED_COUNT + (len(FIRST) if expected != "kernel" else 0)
    ram = src["ram"]
    assert ram["normal"] + ram["duplicate"] == pages + again, ram
    assert (ram["normal"], ram["duplicate"]) == (dst["x-ram"]["normal"], dst["x-ram"]["duplicate"])


@pytest.mark.parametrize("kind", ["memfd", "file"])
def test_shared_memory_sources_arrive_whole(migration: Callable[..., Migration], kind: str) -> None:
    """A memfd or file block under the kernel tracker, its pages lent to unix
    sockets and hashed for x-verify: the writes between rounds travel again,
    and memory ends identical."""
    if (reason := KernelTracker.probe()) is not None:
        pytest.skip(f"kernel dirty tracking unavailable: {reason}")
    m = migration(
        transport="unix",
        source_kind=kind,
        capabilities={"x-verify": True},
        parameters={"multifd-channels": 2, "x-dirty-tracker": "kernel"},
    )
    zeroed = _data_pages(m, ZEROED_COUNT)
    m.on_pass = _write_pattern(m, mark=False, zeroed=zeroed)
    src, dst = m.assert_completed()
    assert src["x-dirty-tracker"] == {"pc.ram": "kernel"}
    ram = src["ram"]
    assert ram["normal"] + ram["duplicate"] == m.src_blocks[0].pages + len(SECOND) + ZEROED_COUNT
    assert dst["x-ram"]["normal"] == ram["normal"]


def test_explicit_tracker_sees_only_marked_writes(migration: Callable[..., Migration]) -> None:
    """With explicit marking, a write the application does not report stays
    behind: proof that the tracker asked for is the one at work."""
    m = migration(parameters={"multifd-channels": 2, "x-dirty-tracker": "explicit"})
    block = m.src_blocks[0]

    def on_pass(n: int) -> None:
        if n == 2 and not m.stopped:  # after round 1 sent every page
            write_pages(block, [10, 11])
            block.mark_dirty(10 * 4096, 1)  # page 11 is written but not marked

    m.on_pass = on_pass
    src, dst = m.run()
    assert src["status"] == dst["status"] == "completed"
    differ = np.flatnonzero(np.any(block.page_rows() != m.dst_blocks[0].page_rows(), axis=1))
    assert differ.tolist() == [11]


# A workload in another process: it writes a counter into random pages of the
# memfd it was given, and on "p" stops writing and answers "k".
_CHILD_WORKLOAD = """
import mmap, socket, sys, threading, time
import numpy as np
fd, sock_fd, size = (int(a) for a in sys.argv[1:4])
sock = socket.socket(fileno=sock_fd)
rows = np.frombuffer(mmap.mmap(fd, size, flags=mmap.MAP_SHARED), dtype=np.uint64).reshape(-1, 512)
writing, lock = threading.Event(), threading.Lock()
writing.set()
def work():
    n, rng = 0, np.random.default_rng(3)
    while True:
        writing.wait()
        with lock:
            if writing.is_set():
                n += 1
                rows[rng.integers(0, len(rows), 16), 0] = n
        time.sleep(0.0005)
threading.Thread(target=work, daemon=True).start()
sock.sendall(b"r")
while (c := sock.recv(1)):
    writing.clear()
    with lock:
        pass
    sock.sendall(b"k")
"""


def test_a_workload_in_another_process_is_tracked(tmp_path: Path) -> None:
    """A memfd block whose descriptor a workload process maps and writes: "auto"
    hashes it (the kernel tracker of this process would not see those writes),
    and the destination ends with the memory the source had when it stopped."""
    size = 16 * MiB
    source_block, destination_block = (
        RAMBlock.memfd("pc.ram", size),
        RAMBlock.anonymous("pc.ram", size),
    )
    fill(source_block.array, seed=1)
    ours, theirs = socket.socketpair()
    workload = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _CHILD_WORKLOAD,
            str(source_block.fd),
            str(theirs.fileno()),
            str(size),
        ],
        pass_fds=(source_block.fd, theirs.fileno()),
    )
    theirs.close()
    at_stop: list[bytes] = []

    def on_stop() -> None:
        ours.sendall(b"p")
        assert ours.recv(1) == b"k"
        at_stop.append(bytes(source_block.buffer))

    destination = MigrationDestination(
        [destination_block], capabilities={"multifd": True}, parameters={"multifd-channels": 2}
    )
    source = MigrationSource(
        [source_block],
        capabilities={"multifd": True},
        parameters={"multifd-channels": 2, "max-bandwidth": 0},
        on_stop=on_stop,
    )
    try:
        assert ours.recv(1) == b"r"
        source.migrate(destination.incoming(f"unix:{tmp_path / 'm.sock'}"))
        src, dst = source.wait(FINISH_TIMEOUT), destination.wait(FINISH_TIMEOUT)
        assert src["status"] == dst["status"] == "completed", (src, dst)
        assert src["x-dirty-tracker"] == {"pc.ram": "hash"}
        assert destination_block.sha256() == hashlib.sha256(at_stop[0]).hexdigest()
    finally:
        source.cancel()
        destination.cancel()
        ours.close()
        workload.wait(10)
        source_block.close()
        destination_block.close()
