"""`migrate` then `migrate_cancel` over QMP, 100 times in a row, at random moments
of setup, the active rounds and the switchover: each cycle ends cancelled (or
completed, when it won the race), the workload runs on, the source's memory is
never touched, nothing leaks, and a last migration completes."""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from control_support import ask, configure, connect, events_until, random_fill, run
from qemu.qmp import QMPClient

from leakcheck import leaks, open_fds
from multifd.control import MigrationCommands, QMPServer
from multifd.demo.workload import Workload
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.source import MigrationSource

MiB = 1 << 20
CYCLES = 100
FINAL = ("completed", "failed", "cancelled")
# An application whose state takes a while to snapshot: the switchover lasts
# long enough for a cancel sent on the STOP event to land inside it.
SAVE_STATE_SECONDS = 0.03
# Bounds on the process's memory growth. Over all the cycles it includes the
# allocator's warm-up (per-thread arenas: about 15 MiB here, measured); over
# the second half only what keeps growing, about 2 MiB here (mostly qemu.qmp's
# client, which keeps every event it receives): a leak of 240 KiB a cycle or
# more fails it.
RSS_GROWTH_LIMIT = 48 * MiB
RSS_SECOND_HALF_LIMIT = 12 * MiB


@dataclass
class Endpoints:
    """A source with a running workload and a destination, each behind a QMP server."""

    static: RAMBlock  # never written by anyone: migration must leave it alone
    app: RAMBlock  # the workload writes here all along
    dst_blocks: list[RAMBlock]
    workload: Workload
    source: MigrationSource
    destination: MigrationDestination
    src_server: QMPServer
    dst_server: QMPServer

    def digests(self) -> tuple[list[str], list[str]]:
        return (
            [b.sha256() for b in (self.static, self.app)],
            [b.sha256() for b in self.dst_blocks],
        )


def _save_state() -> bytes:
    time.sleep(SAVE_STATE_SECONDS)
    return b"application state"


@pytest.fixture
def endpoints(sock_dir: Path) -> Iterator[Endpoints]:
    static = RAMBlock.anonymous("pc.ram", 4 * MiB)
    app = RAMBlock.anonymous("app", 1 * MiB)
    random_fill(static, 7)
    dst_blocks = [RAMBlock.anonymous("pc.ram", 4 * MiB), RAMBlock.anonymous("app", 1 * MiB)]
    workload = Workload(app.array, rate=4 * MiB)
    source = MigrationSource(
        [static, app], on_stop=workload.pause, on_resume=workload.resume, save_state=_save_state
    )
    destination = MigrationDestination(dst_blocks)
    src_server = QMPServer(str(sock_dir / "src.qmp"), MigrationCommands(source))
    dst_server = QMPServer(str(sock_dir / "dst.qmp"), MigrationCommands(destination))
    src_server.start()
    dst_server.start()
    workload.start()
    yield Endpoints(static, app, dst_blocks, workload, source, destination, src_server, dst_server)
    for server in (src_server, dst_server):
        server.close()
    for endpoint in (source, destination):
        endpoint.cancel()
        endpoint.wait()
    workload.stop()
    for block in (static, app, *dst_blocks):
        block.close()


def rss() -> int:
    """Resident bytes, once cyclic garbage (exception tracebacks) is collected."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


async def until_final(client: QMPClient, timeout: float = 10.0) -> dict:
    """Poll `query-migrate` until the migration has ended (bounded)."""
    deadline = time.monotonic() + timeout
    while (info := await ask(client, "query-migrate")).get("status") not in FINAL:
        assert time.monotonic() < deadline, f"still {info.get('status')} after {timeout} s"
        await asyncio.sleep(0.005)
    return info


async def one_cycle(
    e: Endpoints, src: QMPClient, dst: QMPClient, uri: str, rng: random.Random
) -> tuple[str, str]:
    """migrate, then migrate_cancel at a random moment of the state drawn.
    Returns that state and how the source's migration ended."""
    target = rng.choices(["setup", "active", "switchover"], weights=[2, 5, 3])[0]
    await dst.execute("migrate-incoming", {"uri": uri})
    await src.execute("migrate", {"uri": uri})
    seen: list[str] = []
    if target == "setup":
        await asyncio.sleep(rng.choice((0.0, 0.0005, 0.002)))
    else:
        # The switchover has no status of its own: it begins with STOP.
        seen = await events_until(src, ("STOP" if target == "switchover" else target, *FINAL))
        if target == "active" and seen[-1] == "active":
            await asyncio.sleep(rng.uniform(0.0, 0.06))
    await src.execute("migrate_cancel")
    if not seen or seen[-1] not in FINAL:
        seen += await events_until(src, FINAL)
    seen = [e for e in seen if not e.startswith("pass ")]
    # What the cancel met: the last event before "cancelling".
    cancelled_in = seen[seen.index("cancelling") - 1] if "cancelling" in seen else "none"
    cancelled_in = {"STOP": "switchover"}.get(cancelled_in, cancelled_in)
    if "STOP" in seen and seen[-1] == "cancelled":
        # The workload was restarted, and announced as QEMU's vm_start does.
        assert seen[-2:] == ["RESUME", "cancelled"], seen
    # The source was cancelled before its channels were all in: the destination
    # rightly waits for a source (no status yet, as QEMU's); its owner cancels it.
    if "status" not in await ask(dst, "query-migrate"):
        # The source was cancelled before its channels were all in: the
        # destination rightly waits for a source; its owner cancels it.
        await dst.execute("migrate_cancel")
    dst_end = await until_final(dst)
    dst.events.clear()  # its events are not looked at: the queue must not grow
    src_end = seen[-1]
    if src_end == "completed":
        assert dst_end["status"] == "completed", dst_end
        src_digests, dst_digests = e.digests()
        assert src_digests == dst_digests
        e.workload.resume()  # a migrated VM stays stopped; this application runs on
    else:
        assert src_end == "cancelled", seen
        assert dst_end["status"] in ("failed", "cancelled"), dst_end
    return cancelled_in, src_end


def test_cancel_over_qmp_in_random_states_many_times(endpoints: Endpoints, sock_dir: Path) -> None:
    e = endpoints
    uri = f"unix:{sock_dir / 'migration.sock'}"
    static_digest = e.static.sha256()
    rng = random.Random(2026)

    async def scenario() -> tuple[Counter[str], Counter[str]]:
        src = await connect(e.src_server.address.removeprefix("unix:"), name="src")
        dst = await connect(e.dst_server.address.removeprefix("unix:"), name="dst")
        try:
            # Slow enough (about 0.1 s a migration) that a cancel finds it running.
            await configure(src, multifd_channels=2, max_bandwidth=48 * MiB, x_io_timeout=5)
            await configure(dst, multifd_channels=2, x_io_timeout=5)
            # A first cycle creates what lives on (asyncio's and numpy's own).
            await one_cycle(e, src, dst, uri, rng)
            threads_before = set(threading.enumerate())
            fds_before = open_fds()
            rss_before = rss()
            rss_half = 0
            states: Counter[str] = Counter()
            ends: Counter[str] = Counter()
            for cycle in range(CYCLES):
                written = e.workload.pages_written
                cancelled_in, end = await one_cycle(e, src, dst, uri, rng)
                states[cancelled_in] += 1
                ends[end] += 1
                assert not e.workload.paused, f"cycle {cycle}: the workload was left paused"
                await asyncio.sleep(0.01)
                assert e.workload.pages_written > written, f"cycle {cycle}: workload stalled"
                assert e.static.sha256() == static_digest, f"cycle {cycle}: memory touched"
                if cycle == CYCLES // 2:
                    rss_half = rss()
            threads, fds = leaks(threads_before, fds_before)
            assert not threads, f"threads left after {CYCLES} cancels: {threads}"
            assert not fds, f"descriptors left after {CYCLES} cancels: {fds}"
            rss_after = rss()
            growth, late = rss_after - rss_before, rss_after - rss_half
            assert growth < RSS_GROWTH_LIMIT, f"RSS grew {growth / MiB:.1f} MiB"
            assert late < RSS_SECOND_HALF_LIMIT, f"RSS grew {late / MiB:.1f} MiB in the 2nd half"

            # And a last migration completes, with identical memory.
            await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
            await dst.execute("migrate-incoming", {"uri": uri})
            await src.execute("migrate", {"uri": uri})
            assert (await events_until(src, FINAL))[-1] == "completed"
            assert (await until_final(dst))["status"] == "completed"
            return states, ends
        finally:
            await src.disconnect()
            await dst.disconnect()

    states, ends = run(scenario(), timeout=120)
    src_digests, dst_digests = e.digests()
    assert src_digests == dst_digests
    assert e.static.sha256() == static_digest
    assert ends["cancelled"] >= CYCLES // 2, ends
    assert states["active"] >= CYCLES // 4, states
    assert states["setup"] > 0, states
    assert states["switchover"] > 0, states
