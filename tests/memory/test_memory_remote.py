"""A workload in another process hands its tracking to the source over a unix
socket; the source scans /proc/<child>/pagemap and sees the child's writes."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pytest
from memory_support import PATTERN, BlockMaker, MiB, open_fds, write_pages

from multifd.memory import PAGE_SIZE, KernelTracker, RAMBlock, TrackerUnavailable, share_tracking

pytestmark = pytest.mark.usefixtures("kernel_tracking")

# The workload: maps the shared memory, hands over tracking, then writes on command.
WORKLOAD = textwrap.dedent(
    """
    import socket, sys, threading
    import numpy as np
    from multifd.memory import RAMBlock, share_tracking

    sock = socket.socket(fileno=int(sys.argv[1]))
    block = RAMBlock.from_file("workload", sys.argv[2])
    share_tracking(sock, block)
    rows = block.page_rows()
    stream = sock.makefile("rwb")
    stop = threading.Event()
    churner = None

    def churn():
        rng = np.random.default_rng(5)
        while not stop.is_set():
            first = int(rng.integers(0, block.pages - 4))
            rows[first : first + int(rng.integers(1, 4)), int(rng.integers(0, 4096))] += 1

    for line in stream:
        command, *pages = line.split()
        if command == b"write":
            rows[np.array(pages, dtype=np.int64), 0] += 1
        elif command == b"churn":
            churner = threading.Thread(target=churn)
            churner.start()
        elif command == b"stop":
            stop.set()
            churner.join()
        stream.write(b"ok\\n")
        stream.flush()
    """
)


class Workload:
    """The child process and the source's end of its socket."""

    def __init__(self, block: RAMBlock, path: str, pass_fds: tuple[int, ...] = ()) -> None:
        self.sock, child = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKLOAD, str(child.fileno()), path],
            pass_fds=(child.fileno(), *pass_fds),
        )
        child.close()
        self.stream = self.sock.makefile("rwb")
        self.block = block

    def command(self, *words: object) -> None:
        self.stream.write(" ".join(map(str, words)).encode() + b"\n")
        self.stream.flush()
        assert self.stream.readline() == b"ok\n"

    def close(self) -> None:
        self.stream.close()
        self.sock.close()
        self.process.wait(timeout=10)


@pytest.fixture(params=["memfd", "shm-file"])
def workload(request: pytest.FixtureRequest, make_block: BlockMaker) -> Iterator[Workload]:
    block = make_block(request.param, 2 * MiB)
    if block.fd is not None:
        child = Workload(block, f"/proc/self/fd/{block.fd}", pass_fds=(block.fd,))
    else:
        assert block.path is not None
        child = Workload(block, block.path)
    yield child
    child.close()


def test_the_workloads_writes_are_seen(workload: Workload) -> None:
    block = workload.block
    with KernelTracker.from_remote(block, workload.sock) as tracker:
        tracker.start()
        workload.command("write", *PATTERN)
        assert tracker.collect().indices().tolist() == PATTERN.tolist()
        assert tracker.collect().count() == 0
        assert block.page_rows()[PATTERN, 0].tolist() == [1] * PATTERN.size  # shared memory
        # The source's own writes go through its own page tables: not seen unless marked.
        write_pages(block, [50, 60])
        block.mark_dirty(60 * PAGE_SIZE, 1)
        workload.command("write", 3, 500)
        assert tracker.collect().indices().tolist() == [3, 60, 500]


def test_shadow_copy_of_a_churning_workload_matches(workload: Workload) -> None:
    block = workload.block
    rows = block.page_rows()
    with KernelTracker.from_remote(block, workload.sock) as tracker:
        tracker.start()
        shadow = rows.copy()
        workload.command("churn")
        for _ in range(300):
            pages = tracker.collect().indices()
            shadow[pages] = rows[pages]
        workload.command("stop")
        pages = tracker.collect().indices()
        shadow[pages] = rows[pages]
        assert np.array_equal(shadow, rows)
        assert rows.any()


def test_a_workload_that_exits_is_reported(workload: Workload) -> None:
    with KernelTracker.from_remote(workload.block, workload.sock) as tracker:
        tracker.start()
        workload.close()
        with pytest.raises(OSError, match=r"workload process \d+ has exited") as failure:
            tracker.collect()
        assert failure.value.errno == errno.ESRCH


def test_no_fd_left_after_a_handoff(make_block: BlockMaker) -> None:
    block = make_block("memfd", MiB)
    before = open_fds()
    child = Workload(block, f"/proc/self/fd/{block.fd}", pass_fds=(block.fd,))
    with KernelTracker.from_remote(block, child.sock) as tracker:
        tracker.start()
        child.command("write", 1)
        assert tracker.collect().indices().tolist() == [1]
    child.close()
    assert open_fds() == before


def test_bad_handoffs_are_refused_and_leak_nothing(make_block: BlockMaker) -> None:
    block = make_block("memfd", MiB, name="pc.ram")
    before = open_fds()
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"MFDUFFD1" + bytes(282))
        with pytest.raises(TrackerUnavailable, match="expected one userfaultfd, got 0"):
            KernelTracker.from_remote(block, right)

        read_end, write_end = os.pipe()
        message = b"MFDUFFD1" + bytes(8) * 2 + MiB.to_bytes(8, "little") + bytes(258)
        socket.send_fds(left, [message], [read_end])
        os.close(read_end)
        os.close(write_end)
        with pytest.raises(TrackerUnavailable, match=r"is pipe:\[\d+\], not a userfaultfd"):
            KernelTracker.from_remote(block, right)

        with RAMBlock.anonymous("other", 2 * MiB) as other:
            share_tracking(left, other)  # a real handoff, of a block of another size
        with pytest.raises(
            TrackerUnavailable,
            match=r"'pc.ram': tracking handoff: the workload's block 'other' has 0x200000 bytes",
        ):
            KernelTracker.from_remote(block, right)

        left.sendall(b"short")
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(TrackerUnavailable, match="sent 5 of 290 bytes, then EOF"):
            KernelTracker.from_remote(block, right)
    assert open_fds() == before
