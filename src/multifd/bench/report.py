"""Presenting a benchmark result: the same tables drawn with rich for the
terminal, as Markdown for benchmarks/RESULTS.md, and a plot if matplotlib exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from ..progress import human
from .system import CPU_WINDOW_MIN, GB

ARROWS = {
    "qemu-qemu": "QEMU→QEMU",
    "qemu-python": "QEMU→Python",
    "python-qemu": "Python→QEMU",
    "python-python": "Python→Python",
}


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _f(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def _mib(n: int | None) -> str:
    return "–" if not n else f"{n / (1 << 20):,.0f} MiB"


def _spread(values: list[float | None] | None, digits: int = 2) -> str:
    """The fastest and slowest run: how much to trust a median on a shared host."""
    values = [v for v in values or [] if v is not None]
    if len(values) < 2:
        return "–"
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}"


def _ends(source: float | None, dest: float | None) -> str:
    if source is None and dest is None:
        return "–"
    return f"{_f(source, 3)} / {_f(dest, 3)}"


def _why(entry: dict[str, Any]) -> str:
    if entry.get("skipped"):
        return f"skipped: {entry['skipped']}"
    if entry.get("error"):
        return f"FAILED: {entry['error']}"
    return ""


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _bulk(result: dict[str, Any]) -> Section:
    section = Section(
        "Bulk: one block, 75 % random / 25 % zero pages, nobody writing",
        [
            "ch",
            "pairing",
            "seconds",
            "runs (s)",
            "GB/s",
            "wire GB/s",
            "÷ QEMU→QEMU",
            "runs (÷)",
            "CPU s",
            "CPU busy",
            "source / dest CPU s",
            "dest RSS",
            "note",
        ],
    )
    for e in result["bulk"]:
        section.rows.append(
            [
                str(e["channels"]),
                ARROWS[e["pairing"]],
                _f(e["seconds"], 3),
                _spread(e.get("runs_seconds")),
                _f(e["gbps"]),
                _f(e["wire_gbps"]),
                _f(e["ratio_to_qemu"]),
                _spread(e.get("ratio_runs")),
                _f(e.get("cpu_seconds"), 3),
                _percent(e.get("cpu_busy")),
                _ends(e.get("source_cpu_seconds"), e.get("dest_cpu_seconds")),
                _mib(e.get("dest_hwm_bytes")),
                _why(e),
            ]
        )
    if result["bulk"]:
        e = result["bulk"][0]
        section.notes.append(
            f"RAM {human(e['ram_bytes'])} over {e['transport']} sockets; {result['timing']}; "
            "GB/s = RAM size / seconds, wire GB/s = bytes sent / seconds (GB = 1e9 B); "
            "runs = fastest–slowest timed run; "
            "÷ QEMU→QEMU = seconds / QEMU→QEMU's seconds at the same channel count; "
            "runs (÷) = the lowest and highest of that ratio run by run (the pairings "
            "take turns, so run i of each met the machine alike); "
            "CPU s = the machine's busy CPU-seconds during the run (both ends and "
            "anything else running), CPU busy = CPU s / (seconds × CPUs): near 100 % the "
            "run was bound by CPU (medians of the runs of at least "
            f"{CPU_WINDOW_MIN:g} s: the kernel's tick counters cannot resolve shorter ones); "
            "source / dest CPU s = each end's own CPU time (all its threads) from the "
            "migrate command to its end of the migration, what one end takes from the "
            "other on a shared host (medians; QEMU's counted in 10 ms ticks); "
            "dest RSS = the destination's peak resident memory; "
            "medians of "
            f"{result['options']['runs']} runs after {result['options']['warmup']} warm-up "
            "run(s); every run's destination memory checked against the source (SHA-256)."
        )
    return section


def _live(result: dict[str, Any]) -> Section:
    section = Section(
        "Live: Python→Python while a workload rewrites pages",
        [
            "dirty rate",
            "ch",
            "seconds",
            "rounds",
            "downtime ms",
            "limit ms",
            "within",
            "throttle",
            "note",
        ],
    )
    for e in result["live"]:
        within = f"{e['runs_within_limit']}/{e['runs']}" if "runs" in e else "–"
        throttle = f"{e['max_throttle_percent']} %" if "max_throttle_percent" in e else "–"
        section.rows.append(
            [
                f"{human(e['dirty_rate'])}/s",
                str(e["channels"]),
                _f(e["seconds"], 3),
                _f(e["rounds"], 0),
                _f(e["downtime_ms"], 0),
                str(e["downtime_limit_ms"]),
                within,
                throttle,
                _why(e),
            ]
        )
    if result["live"]:
        section.notes.append(
            "Downtime as the destination saw it: the source stopping the workload to the "
            "destination resuming it (both clocks on this host); within = runs whose downtime "
            "met the limit; throttle = the highest auto-converge throttle reached."
        )
    return section


def _loopback(result: dict[str, Any]) -> Section:
    section = Section(
        "Raw loopback: N connections, sendall of 1 MiB chunks (the ceiling)",
        [
            "ch",
            "transport",
            "GB/s",
            "runs (GB/s)",
            "best GB/s",
            "Python→Python GB/s",
            "fraction",
            "wire fraction",
            "note",
        ],
    )
    for e in result["loopback"]:
        times = e.get("runs_seconds") or []
        spread = "–"
        if times:
            spread = f"{e['bytes'] / max(times) / GB:.2f}–{e['bytes'] / min(times) / GB:.2f}"
        section.rows.append(
            [
                str(e["channels"]),
                e["transport"],
                _f(e["gbps"]),
                spread,
                _f(e.get("best_gbps")),
                _f(e.get("python_python_gbps")),
                _f(e.get("python_python_fraction")),
                _f(e.get("python_python_wire_fraction")),
                _why(e),
            ]
        )
    if result["loopback"]:
        section.notes.append(
            "Loopback sends the whole RAM content, zero pages included; GB/s = median run, "
            "best = fastest run, the ceiling; fraction = Python→Python bulk GB/s (RAM size / "
            "seconds, median) ÷ best loopback GB/s, wire fraction = its bytes on the wire per "
            "second ÷ best loopback GB/s; same channel count and transport. One connection's "
            "loopback swings by where the scheduler puts its two threads, hence the best run."
        )
    return section


def _floor(result: dict[str, Any]) -> Section:
    section = Section(
        "Floor: the pages that are not zero, lent as the Python source lends them",
        [
            "ch",
            "transport",
            "seconds",
            "runs (s)",
            "GB/s",
            "best GB/s",
            "Python→Python GB/s",
            "fraction",
            "note",
        ],
    )
    floor = result.get("floor", [])  # absent from results older than the floor
    for e in floor:
        section.rows.append(
            [
                str(e["channels"]),
                e["transport"],
                _f(e.get("seconds"), 3),
                _spread(e.get("runs_seconds"), 3),
                _f(e["gbps"]),
                _f(e.get("best_gbps")),
                _f(e.get("python_python_gbps")),
                _f(e.get("python_python_fraction")),
                _why(e),
            ]
        )
    if any(e["gbps"] for e in floor):
        section.notes.append(
            "The same connections and receiver as the loopback runs, carrying only the pages "
            "that are not zero, lent with vmsplice from a mapping already faulted in "
            "(Channel.write_lent, as the Python source's channels lend them): no zero scan, no "
            "packets, no protocol. GB/s = RAM size / seconds, as a migration's; fraction = "
            "Python→Python bulk GB/s (median) ÷ best floor GB/s. What is left between the two "
            "is the source's zero scan, its page faults, and both ends' Python and protocol work."
        )
    return section


def _tracker(result: dict[str, Any]) -> Section:
    section = Section(
        "Dirty tracking: collect-and-reprotect, and the writer's extra cost",
        [
            "tracker",
            "written",
            "pages",
            "collect ms",
            "ms/GiB",
            "writer µs/page",
            "exact",
            "note",
        ],
    )
    for e in result["tracker"]:
        if e.get("skipped"):
            section.rows.append([e["tracker"], "", "", "", "", "", "", _why(e)])
            continue
        section.rows.append(
            [
                e["tracker"],
                f"{e['written_percent']:g} %",
                str(e["dirty_pages"]),
                _f(e["collect_ms"]),
                _f(e["collect_ms_per_gib"]),
                _f(e["write_extra_us_per_page"]),
                "yes" if e["exact"] else "NO",
                "",
            ]
        )
    if result["tracker"]:
        section.notes.append(
            f"Anonymous block of {human(result['tracker'][0]['block_bytes'])}, pages written at "
            "random (one word each); writer extra = first write after protection minus a "
            "second write, per page."
        )
    return section


def _memory(result: dict[str, Any]) -> Section:
    section = Section(
        "Memory: destination peak RSS against RAM size, source's own growth",
        ["scenario", "ch", "RAM", "dest peak RSS", "÷ RAM", "dest growth", "source growth"],
    )
    rows = [(ARROWS[e["pairing"]], e) for e in result["bulk"]]
    rows += [(f"live {human(e['dirty_rate'])}/s", e) for e in result["live"]]
    for name, e in rows:
        if not e.get("dest_hwm_bytes"):
            continue
        section.rows.append(
            [
                name,
                str(e["channels"]),
                human(e["ram_bytes"]),
                _mib(e["dest_hwm_bytes"]),
                _f(e["dest_hwm_bytes"] / e["ram_bytes"]),
                _mib(e["dest_hwm_bytes"] - e["dest_ready_rss_bytes"])
                if e.get("dest_ready_rss_bytes")
                else "–",
                human(e.get("source_overhead_bytes") or 0),
            ]
        )
    if section.rows:
        section.notes.append(
            "dest peak RSS: VmHWM of the destination process (its RAM, prefaulted, plus the "
            "interpreter or QEMU itself); dest growth: its peak minus its resident memory once "
            "listening with the blocks faulted in (Python destinations); source growth: peak "
            "rise of the source process's anonymous memory during the migration (sampled "
            "every 20 ms)."
        )
    return section


def sections(result: dict[str, Any]) -> list[Section]:
    chosen = [_bulk, _live, _loopback, _floor, _tracker, _memory]
    return [s for s in (make(result) for make in chosen) if s.rows]


def _load(values: list[float] | None) -> str:
    return "?" if not values else " ".join(f"{v:.2f}" for v in values)


def _code(m: dict[str, Any]) -> str:
    code = m.get("code", {})
    text = f"package sources {code.get('package_sha256', '?')}"
    if "git_commit" in code:
        text += f", git {code['git_commit']} + {code['git_changed_files']} changed files"
    return text


def _machine_line(result: dict[str, Any]) -> str:
    m = result["machine"]
    return (
        f"{m['date']} · {m['cpu_model']} × {m['nproc']} · {human(m['memory_bytes'])} · "
        f"Linux {m['kernel']} · Python {m['python']} · numpy {m['numpy']} · "
        f"{m['qemu'] or 'no QEMU'} · multifd {m['multifd']}"
    )


def _qemu_mode(o: dict[str, Any]) -> str:
    if not o["with_qemu"]:
        return "off"
    return "on (destinations with prealloc=on)" if o["qemu_prealloc"] else "on (no prealloc)"


def _options_line(result: dict[str, Any]) -> str:
    o = result["options"]
    rates = ", ".join(f"{human(r)}/s" for r in o["dirty_rates"])
    return (
        f"size {human(o['size'])}, channels {','.join(map(str, o['channels']))}, "
        f"{o['runs']} runs + {o['warmup']} warm-up, {o['transport']} sockets, "
        f"scenarios {','.join(o['scenarios'])}, "
        f"QEMU pairings {_qemu_mode(o)}, "
        f"live dirty rates {rates}, downtime-limit {o['downtime_limit_ms']} ms, "
        f"tracker block {human(o['tracker_size'])}"
    )


def render(result: dict[str, Any], console: Console) -> None:
    """The result as terminal tables."""
    console.print(f"[bold]multifd bench[/] {_machine_line(result)}")
    console.print(f"[dim]{_options_line(result)}[/]")
    for section in sections(result):
        table = Table(title=section.title, title_justify="left")
        for index, column in enumerate(section.columns):
            table.add_column(column, justify="left" if index < 2 else "right")
        for row in section.rows:
            table.add_row(*row)
        console.print(table)
        for note in section.notes:
            console.print(f"[dim]{note}[/]")


def markdown(result: dict[str, Any]) -> str:
    """The result as Markdown tables, for benchmarks/RESULTS.md."""
    m = result["machine"]
    lines = [
        f"- date: {m['date']}",
        f"- machine: {m['cpu_model']}, {m['nproc']} CPUs, {human(m['memory_bytes'])} RAM, "
        f"Linux {m['kernel']}",
        f"- versions: Python {m['python']}, numpy {m['numpy']}, zstandard {m['zstandard']}, "
        f"{m['qemu'] or 'QEMU not installed'}, multifd {m['multifd']} ({_code(m)})",
        f"- load average (1, 5, 15 min): {_load(m.get('loadavg_start'))} at the start, "
        f"{_load(m.get('loadavg_end'))} at the end",
        f"- options: {_options_line(result)}",
        "",
    ]
    for section in sections(result):
        lines += [f"### {section.title}", ""]
        lines.append("| " + " | ".join(section.columns) + " |")
        lines.append("|" + "|".join("---" for _ in section.columns) + "|")
        for row in section.rows:
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
        lines.append("")
        lines += [f"{note}" for note in section.notes]
        if section.notes:
            lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> str:
    """Bulk, loopback and floor GB/s by channel count as a PNG, if matplotlib is
    there; returns what happened, in a sentence."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written"
    figure, axes = plt.subplots(figsize=(7, 4))
    for pairing, label in ARROWS.items():
        points = [(e["channels"], e["gbps"]) for e in result["bulk"] if e["pairing"] == pairing]
        points = [p for p in points if p[1] is not None]
        if points:
            axes.plot(*zip(*points, strict=True), marker="o", label=f"{label} (RAM GB/s)")
    for key, label in (("loopback", "raw loopback"), ("floor", "floor (RAM GB/s)")):
        line = [(e["channels"], e["gbps"]) for e in result.get(key, []) if e["gbps"]]
        if line:
            axes.plot(*zip(*line, strict=True), marker="s", linestyle="--", label=label)
    axes.set_xlabel("multifd channels")
    axes.set_ylabel("GB/s")
    axes.set_title(f"multifd bench, {human(result['options']['size'])} RAM")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120, format="png")  # whatever the name ends with
    plt.close(figure)
    return f"plot written to {path}"
