"""`multifd demo`, the README's main job, end to end at a small size."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from multifd.cli import main
from multifd.demo.runner import DemoError, DemoOptions, run_demo
from multifd.migration.params import MigrationConfigError


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


# -- bad values, signals, a failing destination ------------------------------------


def _demo_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "multifd", "demo", *args]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--size", "0"],
            "argument --size: RAMBlock 'pc.ram': size 0 bytes is not a non-zero "
            "multiple of the page size 4096",
        ),
        (["--size", "1K"], "argument --size: RAMBlock 'pc.ram': size 1024 bytes"),
        (
            ["--size", "99999T"],
            "argument --size: 102398976.0 GiB is too large: the source and "
            "the destination each hold a copy, so at most",
        ),
        (
            ["--channels", "0"],
            "argument --channels: Parameter 'multifd-channels' expects an "
            "integer in the range of 1 to 255",
        ),
        (
            ["--channels", "256"],
            "argument --channels: Parameter 'multifd-channels' expects an "
            "integer in the range of 1 to 255",
        ),
        (
            ["--downtime-limit", "-1"],
            "argument --downtime-limit: Parameter 'downtime-limit' "
            "expects an integer in the range of 0 to 2000000 milliseconds",
        ),
        (["--dirty-rate", "-1"], "argument --dirty-rate: not a size: '-1'"),
    ],
)
def test_demo_bad_value_is_a_usage_error(args: list[str], message: str, tmp_path: Path) -> None:
    done = subprocess.run(
        _demo_command("--size", "4M", "--json", *args),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TMPDIR": str(tmp_path)},
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[0].startswith("usage: multifd demo ")
    assert done.stderr.splitlines()[-1].startswith(f"multifd demo: error: {message}")
    assert list(tmp_path.iterdir()) == []  # refused before anything started


def _session_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("phase", ["starting", "migrating"])
def test_demo_stops_cleanly_on_a_signal(signum: signal.Signals, phase: str, tmp_path: Path) -> None:
    """As the daemons: the migration is cancelled, the destination process ends,
    the temporary folder goes, one line says why, exit status 1. The signal goes
    to the whole process group, as a terminal's Ctrl-C does."""
    # zlib sends far slower than the workload writes, and a downtime limit of
    # 0 takes a round with nothing dirty: the migration runs for long.
    process = subprocess.Popen(
        _demo_command(
            *("--size", "64M", "--dirty-rate", "1G", "--downtime-limit", "0"),
            *("--compression", "zlib"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not list(tmp_path.glob("multifd-demo-*/migration.sock")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        if phase == "migrating":
            time.sleep(2.0)
        os.killpg(process.pid, signum)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 1
    assert out == ""
    assert err.strip().splitlines()[-1] == f"multifd demo: stopped by {signum.name}"
    assert "Traceback" not in err
    assert "error" not in err
    assert list(tmp_path.iterdir()) == []
    assert _session_gone(process.pid, 5.0), "a process of the demo is left"


def test_demo_destination_that_dies_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destination process killed mid-migration: the parent says so, and
    cleans up, instead of waiting on the pipe or ending in EOFError."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    killed: list[int] = []

    def kill_destination(_query: dict[str, object]) -> None:
        if not killed:
            (destination,) = mp.active_children()
            os.kill(destination.pid, signal.SIGKILL)
            killed.append(destination.pid)

    options = DemoOptions(size=16 << 20, channels=2, dirty_rate=256 << 20, downtime_limit=0)
    with pytest.raises(DemoError, match=r"destination process ended \(exit code -9\) without"):
        run_demo(options, progress=kill_destination)
    assert killed
    assert mp.active_children() == []
    assert list(tmp_path.iterdir()) == []


def test_demo_destination_error_reaches_the_parent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    options = DemoOptions(size=4 << 20, extra_parameters={"tls-creds": "nothing-by-that-id"})
    with pytest.raises(DemoError, match=r"^destination: \w+Error: "):
        run_demo(options)
    assert mp.active_children() == []
    assert list(tmp_path.iterdir()) == []


def test_run_demo_checks_options_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(MigrationConfigError, match="'multifd-channels' expects an integer"):
        run_demo(DemoOptions(size=4 << 20, channels=0))
    with pytest.raises(ValueError, match="size 1024 bytes is not"):
        run_demo(DemoOptions(size=1024))
    assert mp.active_children() == []
    assert list(tmp_path.iterdir()) == []
