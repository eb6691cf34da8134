"""A peer process killed with SIGKILL: the surviving end fails naming the channel,
releases everything (threads, sockets, port), and then migrates again."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from e2e_support import FINISH_TIMEOUT, Migration, wait_until

from multifd.channels import Listener, parse_uri

MiB = 1 << 20
SIZE = 8 * MiB

DESTINATION = """
import sys
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination

block = RAMBlock.anonymous("pc.ram", int(sys.argv[1]))
destination = MigrationDestination([block], capabilities={"multifd": True})
print(destination.incoming("tcp:127.0.0.1:0"), flush=True)
destination.wait()
"""

SOURCE = """
import sys
from multifd.demo.workload import fill
from multifd.memory import RAMBlock
from multifd.migration.source import MigrationSource

block = RAMBlock.anonymous("pc.ram", int(sys.argv[2]))
fill(block.array, seed=1)
# Slow enough that the kill lands mid-migration.
source = MigrationSource([block], capabilities={"multifd": True},
                         parameters={"max-bandwidth": 4 << 20})
source.migrate(sys.argv[1])
source.wait()
"""


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start Python child processes; any still alive at teardown is killed."""
    children: list[subprocess.Popen] = []

    def start(code: str, *args: str) -> subprocess.Popen:
        child = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True
        )
        children.append(child)
        return child

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(FINISH_TIMEOUT)
        if child.stdout is not None:
            child.stdout.close()


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(FINISH_TIMEOUT)


@pytest.mark.parametrize("when", ["mid-round", "at switchover"])
def test_destination_process_killed(
    migration: Callable[..., Migration], spawn: Callable[..., subprocess.Popen], when: str
) -> None:
    mid_round = when == "mid-round"
    m = migration(
        sizes=(SIZE,),
        workload_rate=2_000,
        parameters={"max-bandwidth": 16 * MiB if mid_round else 0, "x-io-timeout": 5},
    )
    child = spawn(DESTINATION, str(SIZE))
    uri = child.stdout.readline().strip()
    assert uri.startswith("tcp:"), uri
    if not mid_round:
        m.stop_hook = lambda: _kill(child)
    m.workload.start()
    m.source.migrate(uri)
    if mid_round:
        wait_until(
            lambda: m.source.query().get("ram", {}).get("transferred", 0) > SIZE // 4,
            what="a quarter of the first round",
        )
        _kill(child)
    src = m.source.wait(FINISH_TIMEOUT)
    assert src["status"] == "failed", src
    assert "channel" in src["error-desc"], src
    # The workload runs on: resumed when it had been stopped.
    assert m.source_resumes == (0 if mid_round else 1)
    assert not m.stopped and not m.workload.paused
    m.clear_hooks()
    m.assert_completed()


def test_source_process_killed(
    migration: Callable[..., Migration], spawn: Callable[..., subprocess.Popen]
) -> None:
    m = migration(sizes=(SIZE,), parameters={"x-io-timeout": 5})
    m.uri = m.destination.incoming(m.listen_uri)
    child = spawn(SOURCE, m.uri, str(SIZE))
    wait_until(lambda: m.destination.query().get("x-rounds", 0) >= 1, what="round 1 to begin")
    _kill(child)
    dst = m.destination.wait(FINISH_TIMEOUT)
    assert dst["status"] == "failed", dst
    assert "channel" in dst["error-desc"], dst
    assert m.resumed == []
    Listener(parse_uri(m.uri)).close()  # the port is free at once
    m.assert_completed()
