"""A finished migration is freed by reference counting alone: no cycle keeps a
source or a destination (and their views of RAM) alive until the garbage
collector runs, so `RAMBlock.close()` can unmap at once."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from e2e_support import FINISH_TIMEOUT, MiB, wait_until

from multifd.demo.workload import fill
from multifd.memory import RAMBlock
from multifd.migration.destination import MigrationDestination
from multifd.migration.source import MigrationSource

SIZE = 4 * MiB


@pytest.fixture
def no_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _endpoints(
    capabilities: dict[str, bool], source_parameters: dict | None = None
) -> tuple[MigrationSource, MigrationDestination, list[RAMBlock]]:
    blocks = [RAMBlock.anonymous("pc.ram", SIZE), RAMBlock.anonymous("pc.ram", SIZE)]
    fill(blocks[0].array)
    source = MigrationSource(
        [blocks[0]],
        capabilities={"multifd": True, **capabilities},
        parameters={"max-bandwidth": 0, **(source_parameters or {})},
        # Callbacks as an application gives them, none referring to the source.
        on_stop=lambda: None,
        on_resume=lambda: None,
        save_state=lambda: b"state",
        on_event=lambda name, data: None,
    )
    destination = MigrationDestination(
        [blocks[1]],
        capabilities={"multifd": True, "return-path": capabilities.get("return-path", False)},
        on_resume=lambda state: None,
        on_event=lambda name, data: None,
    )
    return source, destination, blocks


def _assert_freed(refs: list[weakref.ref], blocks: list[RAMBlock]) -> None:
    """Called once the test dropped its own references to the endpoints."""
    source, destination = (ref() for ref in refs)
    assert source is None, "the source is kept alive by a reference cycle"
    assert destination is None, "the destination is kept alive by a reference cycle"
    for block in blocks:
        block.close()


@pytest.mark.parametrize("return_path", [False, True])
def test_completed(no_gc: None, return_path: bool) -> None:
    source, destination, blocks = _endpoints({"return-path": return_path})
    destination_uri = destination.incoming("tcp:127.0.0.1:0")
    source.migrate(destination_uri)
    assert source.wait(FINISH_TIMEOUT)["status"] == "completed"
    assert destination.wait(FINISH_TIMEOUT)["status"] == "completed"
    refs = [weakref.ref(source), weakref.ref(destination)]
    del source, destination
    _assert_freed(refs, blocks)


def test_failed(no_gc: None) -> None:
    # The destination wants page hashes the source does not send: both fail.
    source, destination, blocks = _endpoints({"return-path": True})
    destination.set_capabilities({"x-verify": True})
    source.migrate(destination.incoming("tcp:127.0.0.1:0"))
    assert source.wait(FINISH_TIMEOUT)["status"] == "failed"
    assert destination.wait(FINISH_TIMEOUT)["status"] == "failed"
    refs = [weakref.ref(source), weakref.ref(destination)]
    del source, destination
    _assert_freed(refs, blocks)


def test_cancelled(no_gc: None) -> None:
    source, destination, blocks = _endpoints(
        {"return-path": True}, {"max-bandwidth": 4 * MiB, "downtime-limit": 0}
    )
    source.migrate(destination.incoming("tcp:127.0.0.1:0"))
    state = source.state  # not a closure over `source`, which the test deletes
    wait_until(lambda: state.status.value == "active", what="the source to be active")
    source.cancel()
    assert source.wait(FINISH_TIMEOUT)["status"] == "cancelled"
    # The destination sees the stream break before anyone could cancel it.
    assert destination.wait(FINISH_TIMEOUT)["status"] == "failed"
    refs = [weakref.ref(source), weakref.ref(destination)]
    del source, destination
    _assert_freed(refs, blocks)
