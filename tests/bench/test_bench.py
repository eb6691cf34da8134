"""The benchmark harness at a small size: the JSON shape, every figure measured
and positive, ratios taken against the baseline of the same run, and QEMU
pairings reported as skipped (never invented) when QEMU is not asked for."""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

import multifd.bench.bulk
import multifd.bench.command
from multifd.bench import (
    PAIRINGS,
    BenchOptions,
    add_arguments,
    failures,
    markdown,
    plot,
    render,
    run_bench,
)
from multifd.bench.command import run_command
from multifd.bench.content import make_content
from multifd.bench.endpoint import DestinationSpec, _destination_main
from multifd.bench.loopback import Loopback, _lend_share
from multifd.bench.report import sections
from multifd.bench.system import CpuSampler
from multifd.channels.iovec import buffer_address
from multifd.memory import PAGE_SIZE, zero_mask
from multifd.qemu.launch import qemu_binary

BULK_KEYS = {"pairing", "channels", "seconds", "gbps", "ratio_to_qemu"}
LIVE_KEYS = {"dirty_rate", "channels", "seconds", "rounds", "downtime_ms", "downtime_limit_ms"}
LOOPBACK_KEYS = {"channels", "gbps"}


def _positive(entry: dict[str, Any], *keys: str) -> None:
    for key in keys:
        assert isinstance(entry[key], int | float) and entry[key] > 0, (key, entry)


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    options = BenchOptions(
        size=32 << 20,
        channels=(1, 2),
        runs=1,
        warmup=0,
        dirty_rates=(128 << 20,),
        with_qemu=False,
    )
    return run_bench(options)


def test_shape_and_figures(result: dict[str, Any]) -> None:
    # One JSON object, as --json prints it.
    assert json.loads(json.dumps(result)) == result
    assert {"bulk", "live", "loopback", "tracker", "machine", "options"} <= set(result)
    assert failures(result) == []

    bulk = result["bulk"]
    assert {(e["pairing"], e["channels"]) for e in bulk} == {
        (p, c) for p in PAIRINGS for c in (1, 2)
    }
    for entry in bulk:
        assert set(entry) >= BULK_KEYS
        if entry["pairing"] == "python-python":
            _positive(entry, "seconds", "gbps", "wire_gbps", "dest_hwm_bytes")
            if entry["seconds"] >= CpuSampler().shortest:
                # Both ends ran on this machine: busy, but never more than every CPU.
                _positive(entry, "cpu_seconds")
                assert entry["cpu_busy"] <= 1.05
            else:
                # Tens of milliseconds are a few ticks: not measured, not guessed.
                assert "cpu_seconds" not in entry and "cpu_busy" not in entry
            assert entry["verified"] is True
            # Each end's own CPU time: some, and no more than every CPU for as long.
            _positive(entry, "source_cpu_seconds", "dest_cpu_seconds")
            for end in ("source_cpu_seconds", "dest_cpu_seconds"):
                assert entry[end] < entry["seconds"] * os.cpu_count() * 1.05 + 0.02
            assert entry["ratio_to_qemu"] is None  # no QEMU→QEMU baseline in this run
            assert entry["fraction_of_loopback"] > 0
        else:
            # Not asked for: reported as skipped, with no figure at all.
            assert "--with-qemu" in entry["skipped"]
            assert entry["seconds"] is None and entry["gbps"] is None

    assert {(e["dirty_rate"], e["channels"]) for e in result["live"]} == {
        (128 << 20, 1),
        (128 << 20, 2),
    }
    for entry in result["live"]:
        assert set(entry) >= LIVE_KEYS
        _positive(entry, "seconds", "rounds", "downtime_ms", "downtime_limit_ms")

    assert [e["channels"] for e in result["loopback"]] == [1, 2]
    for entry in result["loopback"]:
        assert set(entry) >= LOOPBACK_KEYS
        _positive(entry, "gbps", "python_python_fraction")

    # The floor moves the pages that are not zero: about 75 % of them, never all.
    size = result["options"]["size"]
    assert [e["channels"] for e in result["floor"]] == [1, 2]
    for entry in result["floor"]:
        assert entry["skipped"] is None
        _positive(entry, "seconds", "gbps", "wire_gbps", "best_gbps", "python_python_fraction")
        assert entry["bytes"] % PAGE_SIZE == 0
        assert 0.7 * size < entry["bytes"] < 0.8 * size
        assert entry["gbps"] == pytest.approx(size / entry["seconds"] / 1e9)
        assert entry["wire_gbps"] == pytest.approx(entry["bytes"] / entry["seconds"] / 1e9)

    kinds = {e["tracker"] for e in result["tracker"]}
    assert kinds == {"kernel", "hash"}
    for entry in result["tracker"]:
        if entry["skipped"]:
            continue
        assert entry["exact"] is True
        assert entry["written_percent"] in (1.0, 10.0, 100.0)
        _positive(entry, "collect_ms", "collect_ms_per_gib", "dirty_pages")
        if entry["tracker"] == "kernel":
            _positive(entry, "write_extra_us_per_page")


def test_cpu_sampler_sees_a_busy_thread_and_not_a_sleeping_one() -> None:
    with CpuSampler(every=0.005) as cpu:
        time.sleep(0.05)
        spin_from = time.time()
        while time.time() < spin_from + 0.5:
            pass
        spin_to = time.time()
        time.sleep(0.5)
        sleep_to = time.time()
    assert cpu.busy_between(spin_from, spin_to) >= 0.35  # one CPU, at least most of it
    # Sleeping, this process adds nothing (other tenants may add a little).
    assert cpu.busy_between(spin_to, sleep_to) < cpu.busy_between(spin_from, spin_to)
    assert cpu.busy_between(spin_from - 60, spin_to) is None
    # Too few ticks to tell 5 % of the machine: no figure rather than a wrong one.
    assert cpu.shortest == pytest.approx(40 / os.sysconf("SC_CLK_TCK"))
    assert cpu.busy_between(spin_from, spin_from + cpu.shortest * 0.9) is None


def test_the_fraction_is_against_the_same_runs_loopback(result: dict[str, Any]) -> None:
    # The ceiling is the fastest run: at least the median, at most every run.
    for entry in result["loopback"]:
        fastest = entry["bytes"] / min(entry["runs_seconds"]) / 1e9
        assert entry["best_gbps"] == pytest.approx(fastest)
        assert entry["best_gbps"] >= entry["gbps"]
    loopback = {e["channels"]: e["best_gbps"] for e in result["loopback"]}
    for entry in result["bulk"]:
        if entry["pairing"] == "python-python":
            ceiling = loopback[entry["channels"]]
            assert entry["fraction_of_loopback"] == pytest.approx(entry["gbps"] / ceiling)
            assert entry["wire_fraction_of_loopback"] == pytest.approx(entry["wire_gbps"] / ceiling)


def test_the_floor_fraction_is_against_the_same_runs_fastest_floor(
    result: dict[str, Any],
) -> None:
    size = result["options"]["size"]
    floor = {e["channels"]: e for e in result["floor"]}
    for entry in floor.values():
        assert entry["best_gbps"] == pytest.approx(size / min(entry["runs_seconds"]) / 1e9)
    for entry in result["bulk"]:
        if entry["pairing"] == "python-python":
            lent = floor[entry["channels"]]
            assert entry["fraction_of_floor"] == pytest.approx(entry["gbps"] / lent["best_gbps"])
            assert lent["python_python_fraction"] == entry["fraction_of_floor"]


def test_loopback_runs_between_the_bulk_runs_it_is_compared_with() -> None:
    said: list[str] = []
    options = BenchOptions(
        size=8 << 20,
        channels=(1, 2),
        runs=2,
        warmup=0,
        scenarios=("bulk", "loopback"),
        pairings=("python-python",),
        progress=said.append,
    )
    result = run_bench(options)
    timed = [line.partition(":")[0] for line in said if " run " in line]
    assert timed == [
        step
        for channels in (1, 2)
        for index in (1, 2)
        for step in (
            f"bulk python-python x{channels} run {index}/2",
            f"loopback x{channels} run {index}/2",
            f"floor x{channels} run {index}/2",
        )
    ], said
    assert [e["channels"] for e in result["loopback"]] == [1, 2]
    best = {}
    for entry in result["loopback"]:
        assert len(entry["runs_seconds"]) == 2 and entry["gbps"] > 0
        best[entry["channels"]] = entry["bytes"] / min(entry["runs_seconds"]) / 1e9
        assert entry["best_gbps"] == pytest.approx(best[entry["channels"]])
    # Python→Python's median against the fastest loopback run, not the median one.
    for entry in result["bulk"]:
        assert entry["fraction_of_loopback"] == pytest.approx(
            entry["gbps"] / best[entry["channels"]]
        )
    # The receiver process went with the session.
    assert mp.active_children() == []


def test_a_loopback_session_leaves_its_socket_behind_for_no_one(tmp_path: Path) -> None:
    options = BenchOptions(size=1 << 20, channels=(1,), runs=1, warmup=0)
    content = make_content(tmp_path, options.size)
    for _ in range(2):  # a second session in the same folder finds it free
        with Loopback(options, content, tmp_path) as loopback:
            loopback.run(1, 0)
        assert not (tmp_path / "loopback.sock").exists()
        assert mp.active_children() == []
    assert loopback.entries()[0]["gbps"] > 0


def test_the_floor_lends_exactly_the_pages_it_is_given(tmp_path: Path) -> None:
    content = make_content(tmp_path, 1 << 20)
    with content.block() as block:
        pages = np.flatnonzero(~zero_mask(block))
        expected = b"".join(
            bytes(block.buffer[p * PAGE_SIZE : (p + 1) * PAGE_SIZE]) for p in pages.tolist()
        )
        sender, receiver = socket.socketpair()
        got = bytearray()

        def receive() -> None:
            with receiver:
                header = receiver.recv(16, socket.MSG_WAITALL)
                length = int.from_bytes(header[8:], "little")
                while len(got) < length and (data := receiver.recv(1 << 20)):
                    got.extend(data)
                receiver.sendall(b"k")

        thread = threading.Thread(target=receive)
        thread.start()
        errors: list[str] = []
        base = buffer_address(block.buffer)
        _lend_share(sender, base, pages, 4096, errors)
        thread.join()
    assert errors == []
    assert 0 < len(pages) < block.pages
    assert bytes(got) == expected


def test_the_floor_over_tcp_is_skipped_with_its_reason(tmp_path: Path) -> None:
    options = BenchOptions(size=1 << 20, channels=(1,), runs=1, warmup=0, transport="tcp")
    content = make_content(tmp_path, options.size)
    said: list[str] = []
    options.progress = said.append
    with Loopback(options, content, tmp_path) as loopback:
        loopback.run(1, 0)
    assert not any(line.startswith("floor") for line in said), said
    (entry,) = loopback.floor_entries()
    assert entry["skipped"] == "the source lends pages over unix sockets only (TCP copies them)"
    assert entry["gbps"] is None and entry["bytes"] is None
    assert loopback.entries()[0]["gbps"] > 0
    only_floor = {"bulk": [], "live": [], "loopback": [], "tracker": []}
    (section,) = sections({**only_floor, "floor": loopback.floor_entries()})
    assert section.rows[0][-1] == f"skipped: {entry['skipped']}"


def test_a_loopback_receiver_that_cannot_listen_is_named(tmp_path: Path) -> None:
    options = BenchOptions(size=1 << 20, channels=(1,), runs=1, warmup=0)
    content = make_content(tmp_path, options.size)
    (tmp_path / "loopback.sock").write_text("in the way")
    with pytest.raises(RuntimeError, match=r"loopback receiver exited \(code 1\) before listening"):
        Loopback(options, content, tmp_path).__enter__()
    assert mp.active_children() == []
    assert (tmp_path / "loopback.sock").read_text() == "in the way"  # not ours to remove


def test_tables_render(result: dict[str, Any]) -> None:
    out = io.StringIO()
    render(result, Console(file=out, width=160))
    text = out.getvalue()
    assert "Python→Python" in text and "skipped" in text
    table = markdown(result)
    assert "| ch | pairing |" in table
    assert "Floor: the pages that are not zero" in table
    assert result["machine"]["kernel"] in table
    # Results measured before the floor existed still render.
    older = {k: v for k, v in result.items() if k != "floor"}
    assert "Floor:" not in markdown(older) and "| ch | pairing |" in markdown(older)


def test_ratios_pair_each_run_with_the_baseline_run_of_its_turn(
    result: dict[str, Any],
) -> None:
    def entry(pairing: str, channels: int, runs: list[float]) -> dict[str, Any]:
        return {
            "pairing": pairing,
            "channels": channels,
            "transport": "unix",
            "ram_bytes": 1 << 30,
            "seconds": sorted(runs)[len(runs) // 2],
            "gbps": 1.0,
            "wire_gbps": 1.0,
            "ratio_to_qemu": None,
            "skipped": None,
            "error": None,
            "runs_seconds": runs,
        }

    qemu = entry("qemu-qemu", 2, [1.0, 2.0, 1.5])
    ours = entry("python-python", 2, [1.1, 1.8, 1.2])
    alone = entry("python-python", 4, [1.0, 1.0, 1.0])  # no QEMU→QEMU at 4 channels
    entries = [qemu, ours, alone]
    multifd.bench.bulk._add_ratios(entries)
    assert ours["ratio_to_qemu"] == pytest.approx(1.2 / 1.5)  # of the medians
    assert ours["ratio_runs"] == pytest.approx([1.1, 0.9, 0.8])  # turn by turn
    assert qemu["ratio_runs"] == pytest.approx([1.0, 1.0, 1.0])
    assert alone["ratio_to_qemu"] is None and "ratio_runs" not in alone
    table = markdown(dict(result, bulk=entries))
    row = next(line for line in table.splitlines() if line.startswith("| 2 | Python→Python"))
    assert "| 0.80 | 0.80–1.10 |" in row, row
    assert "runs (÷) = the lowest and highest of that ratio run by run" in table
    # Each end's CPU: both, one, or neither known.
    ours.update(source_cpu_seconds=0.25, dest_cpu_seconds=0.125)
    qemu.update(source_cpu_seconds=0.5)
    rows = {
        line.split(" | ")[1]: line
        for line in markdown(dict(result, bulk=entries)).splitlines()
        if line.startswith("| 2 |")
    }
    assert "| 0.250 / 0.125 |" in rows["Python→Python"]
    assert "| 0.500 / – |" in rows["QEMU→QEMU"]


def test_plot_only_with_matplotlib(
    result: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    target = tmp_path / "bench.png"
    assert "matplotlib is not installed" in plot(result, target)
    assert not target.exists()


def test_qemu_pairings_are_skipped_without_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(multifd.bench.bulk, "qemu_binary", lambda: None)
    options = BenchOptions(
        size=8 << 20, channels=(1,), runs=1, warmup=0, scenarios=("bulk",), with_qemu=True
    )
    result = run_bench(options)
    bulk = {e["pairing"]: e for e in result["bulk"]}
    for pairing in ("qemu-qemu", "qemu-python", "python-qemu"):
        assert bulk[pairing]["skipped"] == "qemu-system-x86_64 is not installed"
        assert bulk[pairing]["seconds"] is None and bulk[pairing]["ratio_to_qemu"] is None
    assert bulk["python-python"]["seconds"] > 0
    assert bulk["python-python"]["ratio_to_qemu"] is None
    assert failures(result) == []


def test_destination_process_exits_when_the_benchmark_is_gone(tmp_path: Path) -> None:
    # The benchmark died before reading the hello: the destination must stop
    # listening and exit, not wait for a migration forever.
    spec = DestinationSpec(
        blocks=(("mem", 1 << 20),), uri=f"unix:{tmp_path}/in.sock", channels=1, timeout=300
    )
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_destination_main, args=(spec, child))
    parent.close()
    process.start()
    child.close()
    process.join(30)
    assert process.exitcode is not None, "the orphaned destination is still running"


def test_arguments() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--size", "4G", "--channels", "1,2,4", "--scenarios", "bulk,live", "--with-qemu"]
    )
    assert args.size == 4 << 30 and args.channels == (1, 2, 4)
    assert args.scenarios == ("bulk", "live") and args.with_qemu and args.runs == 3
    assert args.dirty_rates == (128 << 20, 512 << 20)
    with pytest.raises(SystemExit):
        parser.parse_args(["--scenarios", "bulk,nope"])


@pytest.mark.skipif(qemu_binary() is None, reason="qemu-system-x86_64 is not installed")
def test_qemu_pairings_against_the_same_runs_baseline() -> None:
    options = BenchOptions(
        size=64 << 20, channels=(2,), runs=1, warmup=0, scenarios=("bulk",), with_qemu=True
    )
    result = run_bench(options)
    assert failures(result) == []
    bulk = {e["pairing"]: e for e in result["bulk"]}
    assert set(bulk) == set(PAIRINGS)
    baseline = bulk["qemu-qemu"]["seconds"]
    for pairing, entry in bulk.items():
        _positive(entry, "seconds", "gbps", "wire_gbps", "ratio_to_qemu", "dest_hwm_bytes")
        assert entry["verified"] is True
        assert entry["ratio_to_qemu"] == pytest.approx(entry["seconds"] / baseline)
        assert entry["ratio_runs"] == pytest.approx([entry["seconds"] / baseline])
        # QEMU's CPU time comes in 10 ms ticks (this run is short): there, not guessed.
        assert entry["source_cpu_seconds"] >= 0 and entry["dest_cpu_seconds"] >= 0
        for end, python in (("source", "python-"), ("dest", "-python")):
            if python in pairing:  # our own ends, timed to the nanosecond
                _positive(entry, f"{end}_cpu_seconds")
        assert entry["gbps"] == pytest.approx(options.size / entry["seconds"] / 1e9)
        if pairing.startswith("qemu"):
            _positive(entry, "source_total_ms")
    assert bulk["qemu-qemu"]["ratio_to_qemu"] == pytest.approx(1.0)


def test_tables_piped_to_a_file_keep_every_header(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a terminal (pytest captures stdout): rich alone would assume 80
    # columns and cut the loopback table's headers to "Python…".
    monkeypatch.delenv("COLUMNS", raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--size", "8M", "--channels", "1", "--scenarios", "loopback", "--runs", "1", "--quiet"]
    )
    assert run_command(args) == 0
    out = capsys.readouterr().out
    for header in ("runs (GB/s)", "best GB/s", "Python→Python GB/s", "wire fraction"):
        assert header in out, out


def _bench_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(
        ["--size", "8M", "--channels", "1", "--runs", "1", "--warmup", "0", "--quiet", *argv]
    )


def _no_run(options: BenchOptions) -> dict[str, Any]:
    raise AssertionError("the benchmark ran")


@pytest.mark.parametrize(
    ("option", "target", "problem"),
    [
        ("--markdown", "missing/r.md", "{tmp}/missing does not exist"),
        ("--markdown", "afile/r.md", "{tmp}/afile is not a folder"),
        ("--markdown", "adir", "{tmp}/adir is a folder"),
        ("--plot", "missing/r.png", "{tmp}/missing does not exist"),
    ],
)
def test_output_paths_are_refused_before_the_run(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    option: str,
    target: str,
    problem: str,
) -> None:
    monkeypatch.setattr(multifd.bench.command, "run_bench", _no_run)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    path = f"{tmp_path}/{target}"
    assert run_command(_bench_args(option, path)) == 2
    assert capsys.readouterr().err == (
        f"multifd bench: error: {option} {path}: {problem.format(tmp=tmp_path)}\n"
    )


def test_an_output_that_fails_at_the_end_keeps_the_results(
    result: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    out.mkdir()

    def run_and_lose_the_folder(options: BenchOptions) -> dict[str, Any]:
        out.rmdir()  # gone while the benchmark ran
        return result

    monkeypatch.setattr(multifd.bench.command, "run_bench", run_and_lose_the_folder)
    assert run_command(_bench_args("--json", "--markdown", str(out / "r.md"))) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result  # the figures are not lost
    assert captured.err.startswith(
        f"multifd bench: error: --markdown {out / 'r.md'}: [Errno 2] No such file or directory"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--downtime-limit", "-1"],
            "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 "
            "milliseconds",
        ),
        (
            ["--downtime-limit", "2000001"],
            "Parameter 'downtime-limit' expects an integer in the range of 0 to 2000000 "
            "milliseconds",
        ),
        (["--tracker-size", "0"], "tracker size must be a positive multiple of 4096, got 0"),
        (["--tracker-size", "5000"], "tracker size must be a positive multiple of 4096, got 5000"),
        (["--dirty-rates", "1M,0"], "dirty rates must be positive bytes/s, got (1048576, 0)"),
        (["--workdir", "/nonexistent"], "workdir /nonexistent is not a writable folder"),
    ],
)
def test_bad_options_are_refused_before_any_scenario_runs(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.setattr(multifd.bench.command, "run_bench", _no_run)
    assert run_command(_bench_args(*argv)) == 2
    assert capsys.readouterr().err == f"multifd bench: error: {message}\n"


def test_tracker_size_and_timeout_are_used_as_given() -> None:
    options = BenchOptions(size=8 << 20, tracker_size=4096, timeout=0.5)
    assert options.tracked_size == 4096 and options.to_json()["tracker_size"] == 4096
    assert options.migration_timeout == 0.5
    assert BenchOptions(size=8 << 20).tracked_size == 8 << 20
    with pytest.raises(ValueError, match="timeout must be positive seconds, got 0"):
        BenchOptions(timeout=0)
