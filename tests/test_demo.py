"""`multifd demo`, the README's main job, end to end at a small size."""

from __future__ import annotations

import json

import pytest

from multifd.cli import main


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_demo_migrates_a_busy_block_and_proves_memory_equal(
    transport: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["demo", "--size", "16M", "--channels", "2", "--transport", transport, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["status"] == "completed"
    assert out["memory_identical"] is True
    assert out["destination"]["status"] == "completed"
    assert out["destination"]["state"].startswith("pages written: ")
    assert [c["id"] for c in out["x-multifd-channels"]] == [0, 1]
    assert out["ram"]["total"] == 16 << 20
    assert out["ram"]["normal"] + out["ram"]["duplicate"] >= (16 << 20) // 4096


def test_demo_report_shows_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "8M", "--no-multifd", "--dirty-rate", "4M"]) == 0
    out = capsys.readouterr().out
    assert "memory identical" in out and "yes" in out
    assert "completed" in out
