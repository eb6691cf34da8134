"""Shared helpers for the end-to-end tests: a source and a destination in this
process, with the callbacks an application gives them recorded, hooks to act at
a given moment of the migration, and the checks every test repeats."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

import leakcheck
from multifd.channels import Channel
from multifd.demo.workload import Workload, fill
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.source import MigrationSource

MiB = 1 << 20
PAGE = 4096
# Bounds every wait: a migration of a few MiB ends in well under a second, so
# reaching this means a hang, reported as a failure rather than a stuck suite.
FINISH_TIMEOUT = 30.0
TRANSPORTS = ("tcp", "unix")
SOURCE_THREADS = ("migration", "multifdsend_", "multifd-connect-")


def write_pages(block: RAMBlock, pages: npt.ArrayLike, value: int | None = None) -> None:
    """Change the first 8 bytes of each page: incremented (always a real change,
    even in a zero page), or set to `value`."""
    rows = block.page_rows(np.uint64)
    index = np.asarray(pages, dtype=np.int64)
    if value is None:
        rows[index, 0] += np.uint64(1)
    else:
        rows[index, 0] = np.uint64(value)


def sever(channel: Channel) -> None:
    """Cut a channel's connection the way a failing network or peer would: the
    socket is shut down under the engine, which did not ask for it (unlike
    `Channel.shutdown`, which marks the channel as shut on purpose)."""
    sock = channel._sock
    assert sock is not None, f"{channel.name} is not a socket"
    socket.socket.shutdown(sock, socket.SHUT_RDWR)


def destination_channel(m: Migration, channel_id: int) -> Channel:
    """A multifd channel of the destination's receiver, once it exists (the
    source may be ahead of the destination by whatever the sockets hold)."""
    wait_until(lambda: m.destination._receiver is not None, what="the destination's receiver")
    return m.destination._receiver.channels[channel_id].channel


def source_threads() -> list[str]:
    """Names of the source engine's threads still alive in this process."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name == "migration" or t.name.startswith(SOURCE_THREADS[1:])
    ]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll for a state the test cannot be told about by a callback (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.002)


class Migration:
    """Both ends of a migration of `blocks` RAM blocks, plus an optional workload.

    The source's memory is filled (random and zero pages); the destination's
    starts empty. Every callback is recorded; `on_pass(n)`, `on_status(status)`,
    `stop_hook()`, `state_hook()` and `dst_on_status(status)` run the test's code
    at that moment (all in the migration threads, except the 'setup' status,
    which arrives in the caller of `migrate`). The same objects, port and
    blocks serve every migration of a test (`start` again after a failure).
    """

    def __init__(
        self,
        scratch: Path,
        *,
        transport: str = "tcp",
        sizes: tuple[int, ...] = (8 * MiB,),
        source_kind: str = "anonymous",
        capabilities: dict[str, bool] | None = None,
        parameters: dict[str, Any] | None = None,
        dst_parameters: dict[str, Any] | None = None,
        workload_rate: int = 0,
        app_state: bytes = b"application state \x00\xff",
    ) -> None:
        self.src_blocks = [
            _source_block(source_kind, scratch, _name(i), size) for i, size in enumerate(sizes)
        ]
        self.dst_blocks = [RAMBlock.anonymous(_name(i), size) for i, size in enumerate(sizes)]
        for seed, block in enumerate(self.src_blocks, start=1):
            fill(block.array, seed=seed)
        caps = {"events": True, "multifd": True, **(capabilities or {})}
        # An I/O timeout longer than FINISH_TIMEOUT: a hang shows as one.
        params = {"max-bandwidth": 0, "x-io-timeout": 60, **(parameters or {})}
        self.workload = Workload(self.src_blocks[0].array, workload_rate) if workload_rate else None
        self.app_state = app_state
        self.listen_uri = (
            f"unix:{scratch / 'migrate.sock'}" if transport == "unix" else "tcp:127.0.0.1:0"
        )
        self.uri: str | None = None  # the address bound by the first incoming()

        # What the application saw.
        # STOP and RESUME carry no data: None.
        self.source_events: list[tuple[str, dict[str, Any] | None]] = []
        self.dst_events: list[tuple[str, dict[str, Any] | None]] = []
        self.stops = 0
        self.source_resumes = 0
        self.throttles: list[int] = []
        self.resumed: list[bytes | None] = []  # states the destination resumed with
        self.digests_at_resume: list[list[str]] = []
        self.stopped = False  # between on_stop and a source resume

        # The test's hooks.
        self.on_pass: Callable[[int], None] | None = None
        self.on_status: Callable[[str], None] | None = None
        self.stop_hook: Callable[[], None] | None = None
        self.state_hook: Callable[[], None] | None = None
        self.dst_on_status: Callable[[str], None] | None = None

        self.source = MigrationSource(
            self.src_blocks,
            capabilities=caps,
            parameters=params,
            on_stop=self._on_stop,
            on_resume=self._on_source_resume,
            save_state=self._save_state,
            throttle=self._throttle,
            on_event=self._on_source_event,
        )
        dst_caps = {k: v for k, v in caps.items() if k != "auto-converge"}
        self.destination = MigrationDestination(
            self.dst_blocks,
            capabilities=dst_caps,
            parameters={**params, **(dst_parameters or {})},
            on_resume=self._on_dst_resume,
            on_event=self._on_dst_event,
        )

    # -- running ----------------------------------------------------------------

    def start(self, listen: bool = True) -> None:
        """Listen (on the same address as before, after the first time) unless
        the destination still does, start the workload if there is one, and
        start migrating."""
        if listen:
            self.uri = self.destination.incoming(self.uri or self.listen_uri)
        if self.workload is not None and self.workload._thread is None:
            self.workload.start()
        self.source.migrate(self.uri)

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Wait for both ends (bounded) and return their final query()."""
        src = self.source.wait(FINISH_TIMEOUT)
        if src["status"] in ("completed", "failed", "cancelled"):
            dst = self.destination.wait(FINISH_TIMEOUT)
        else:
            dst = self.destination.query()
        hung = [
            side
            for side, info in (("source", src), ("destination", dst))
            if info["status"] not in ("completed", "failed", "cancelled")
        ]
        if hung:
            self.close()
            raise AssertionError(f"{hung} still running after {FINISH_TIMEOUT} s: {src} {dst}")
        return src, dst

    def run(self, listen: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        self.start(listen)
        return self.finish()

    def clear_hooks(self) -> None:
        self.on_pass = self.on_status = self.stop_hook = self.state_hook = None
        self.dst_on_status = None

    def close(self) -> None:
        """Cancel whatever still runs, stop the workload, release the blocks."""
        # A hook may hold a view of a block, which would keep its mapping (and
        # a memfd's or file's descriptor) alive past close().
        self.clear_hooks()
        self.source.cancel()
        self.destination.cancel()
        self.source.wait(FINISH_TIMEOUT)
        self.destination.wait(FINISH_TIMEOUT)
        if self.workload is not None:
            self.workload.stop()
        for block in (*self.src_blocks, *self.dst_blocks):
            block.close()

    # -- checks -----------------------------------------------------------------

    def assert_identical(self) -> None:
        for src, dst in zip(self.src_blocks, self.dst_blocks, strict=True):
            if not np.array_equal(src.array, dst.array):
                differ = np.flatnonzero(np.any(src.page_rows() != dst.page_rows(), axis=1)).tolist()
                raise AssertionError(f"block {src.name}: pages differ: {differ[:20]}")

    def assert_completed(self, listen: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run a migration that must succeed, and check what the application sees."""
        resumed_before = len(self.resumed)
        src, dst = self.run(listen)
        assert src["status"] == "completed", src
        assert dst["status"] == "completed", dst
        self.assert_identical()
        assert self.resumed[resumed_before:] == [self.app_state]
        # The destination resumed with every page in place: the source's memory
        # has not changed since it stopped.
        assert self.digests_at_resume[-1] == [b.sha256() for b in self.src_blocks]
        assert self.workload is None or self.workload.paused
        return src, dst

    def statuses(self, side: str = "source") -> list[str]:
        events = self.source_events if side == "source" else self.dst_events
        return [data["status"] for name, data in events if name == "MIGRATION" and data]

    # -- callbacks ----------------------------------------------------------------

    def _on_stop(self) -> None:
        self.stops += 1
        if self.workload is not None:
            self.workload.pause()
        self.stopped = True
        if self.stop_hook is not None:
            self.stop_hook()

    def _on_source_resume(self) -> None:
        self.source_resumes += 1
        self.stopped = False
        if self.workload is not None:
            self.workload.resume()

    def _save_state(self) -> bytes:
        if self.state_hook is not None:
            self.state_hook()
        return self.app_state

    def _throttle(self, percent: int) -> None:
        self.throttles.append(percent)
        if self.workload is not None:
            self.workload.throttle(percent)

    def _on_source_event(self, name: str, data: dict[str, Any] | None) -> None:
        self.source_events.append((name, None if data is None else dict(data)))
        if name == "MIGRATION_PASS" and self.on_pass is not None:
            self.on_pass(data["pass"])
        elif name == "MIGRATION" and self.on_status is not None:
            self.on_status(data["status"])

    def _on_dst_event(self, name: str, data: dict[str, Any] | None) -> None:
        self.dst_events.append((name, None if data is None else dict(data)))
        if name == "MIGRATION" and self.dst_on_status is not None:
            self.dst_on_status(data["status"])

    def _on_dst_resume(self, state: bytes | None) -> None:
        self.digests_at_resume.append([b.sha256() for b in self.dst_blocks])
        self.resumed.append(state)


def _source_block(kind: str, scratch: Path, name: str, size: int) -> RAMBlock:
    """A source block of `kind`: "anonymous", "memfd" or "file" (in `scratch`)."""
    if kind == "memfd":
        return RAMBlock.memfd(name, size)
    if kind == "file":
        return RAMBlock.from_file(name, scratch / f"{name}.ram", size, create=True)
    return RAMBlock.anonymous(name, size)


def _name(index: int) -> str:
    return "pc.ram" if index == 0 else f"block{index}"


# The fixtures of tests/e2e and tests/faults, re-exported by both conftest.py.


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """After every test: no thread and no file descriptor it started is left."""
    with leakcheck.no_leaks():
        yield


@pytest.fixture
def migration(tmp_path: Path) -> Iterator[Callable[..., Migration]]:
    """Make `Migration`s; each is cancelled and closed at teardown."""
    made: list[Migration] = []

    def make(**options: Any) -> Migration:
        m = Migration(tmp_path, **options)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()
