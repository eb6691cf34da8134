"""A destination trusts fresh memory to be zero, as QEMU does: a zero page of a
block nothing has written is neither checked nor written (see
migration/received.py). A block handed out for writing before the migration,
and every page this migration wrote, is checked and cleared as before."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from e2e_support import MiB, Migration

from multifd.memory import PAGE_SIZE, RAMBlock
from multifd.migration.received import ReceivedPages


def _count_zero_checks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Zero pages the destination reads to check (and clears if not zero)."""
    checked: list[int] = []
    many, one = ReceivedPages.may_be_written, ReceivedPages.page_may_be_written

    def count_many(self: ReceivedPages, name: str, pages: np.ndarray) -> np.ndarray:
        result = many(self, name, pages)
        checked.append(len(result))
        return result

    def count_one(self: ReceivedPages, name: str, offset: int) -> bool:
        result = one(self, name, offset)
        checked.append(int(result))
        return result

    monkeypatch.setattr(ReceivedPages, "may_be_written", count_many)
    monkeypatch.setattr(ReceivedPages, "page_may_be_written", count_one)
    return checked


@pytest.mark.parametrize("channels", [0, 2], ids=["precopy", "multifd"])
def test_an_untouched_destination_reads_none_of_its_zero_pages(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch, channels: int
) -> None:
    capabilities = {"multifd": bool(channels)}
    parameters = {"multifd-channels": channels} if channels else {}
    m = migration(sizes=(4 * MiB, 2 * MiB), capabilities=capabilities, parameters=parameters)
    checked = _count_zero_checks(monkeypatch)
    m.assert_completed()
    assert m.source.query().get("ram", {}).get("duplicate", 0) > 0  # zero pages were sent
    assert sum(checked) == 0


def test_a_destination_written_before_the_migration_is_cleared(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Garbage written through a view handed out before the migration: every
    zero page is checked, and the ones holding garbage are cleared."""
    m = migration(sizes=(4 * MiB,))
    m.dst_blocks[0].array[:] = 0xEE
    checked = _count_zero_checks(monkeypatch)
    m.assert_completed()
    zero_pages = int(np.count_nonzero(~m.src_blocks[0].page_rows().any(axis=1)))
    assert zero_pages > 0 and sum(checked) == zero_pages


def test_a_second_migration_into_the_same_blocks_checks_every_zero_page(
    migration: Callable[..., Migration], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once a migration has written a block it is no longer fresh, even to the
    next migration (after a failure, or run again): nothing is trusted."""
    m = migration(sizes=(4 * MiB,))
    m.assert_completed()
    rows = m.src_blocks[0].page_rows()
    data = np.flatnonzero(rows.any(axis=1))[:50]
    rows[data] = 0  # zero now where the destination holds data
    checked = _count_zero_checks(monkeypatch)
    m.assert_completed()
    assert sum(checked) == int(np.count_nonzero(~rows.any(axis=1)))


def test_untouched_blocks_as_the_constructors_make_them(tmp_path: Path) -> None:
    fresh = RAMBlock.anonymous("a", 4 * PAGE_SIZE)
    fresh.prefault()  # faulting in keeps the zeros
    assert fresh.sha256()  # reading does too
    assert fresh.take_untouched() is True
    assert fresh.take_untouched() is False  # taken over by the first caller
    for hand_out in ("array", "buffer", "page_rows", "page", "fd"):
        block = RAMBlock.memfd("m", 4 * PAGE_SIZE)
        value = getattr(block, hand_out)
        if callable(value):
            value(0) if hand_out == "page" else value()
        assert block.take_untouched() is False, hand_out
        block.close()
    created = RAMBlock.from_file("f", tmp_path / "new.ram", 4 * PAGE_SIZE, create=True)
    assert created.take_untouched() is True
    (tmp_path / "old.ram").write_bytes(b"\x01" * PAGE_SIZE)
    existing = RAMBlock.from_file("f", tmp_path / "old.ram", 4 * PAGE_SIZE, create=True)
    assert existing.take_untouched() is False
    assert RAMBlock.from_buffer("b", bytearray(PAGE_SIZE)).take_untouched() is False
    for block in (fresh, created, existing):
        block.close()
