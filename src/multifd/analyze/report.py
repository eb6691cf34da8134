"""The human-readable `multifd analyze` report, drawn with rich."""

from __future__ import annotations

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .replay import Analysis


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def render(analysis: Analysis, console: Console) -> None:
    a = analysis
    mode = {
        "section": "sync at every EOS (7.2 section mode)",
        "round": "sync at MULTIFD_FLUSH (8.1+ round mode)",
        None: "plain precopy (no multifd channel)",
    }[a.sync_mode]
    summary = Table.grid(padding=(0, 2))
    summary.add_row("machine type", a.machine_type or "?")
    summary.add_row("multifd channels", str(len(a.channels)))
    summary.add_row("sync", mode)
    summary.add_row("rounds (EOS)", str(len(a.rounds)))
    summary.add_row(
        "pages",
        f"{a.normal} normal ({_size(a.normal * 4096)}), {a.duplicate} zero, "
        f"of {a.total // 4096} ({_size(a.total)})",
    )
    if a.repeated:
        summary.add_row(
            "repeated", f"{a.repeated} page(s) sent twice in a row by the source (counted once)"
        )
    if a.capabilities:
        summary.add_row("capabilities", ", ".join(a.capabilities))
    if a.uuid:
        summary.add_row("uuid", a.uuid)
    if a.commands:
        summary.add_row("commands", ", ".join(a.commands))
    summary.add_row("main channel", _size(a.main_bytes))
    console.print(Panel(summary, title=f"migration recording {a.path}", expand=False))

    blocks = Table(title="RAM blocks", title_justify="left")
    blocks.add_column("block")
    blocks.add_column("used_length", justify="right")
    blocks.add_column("size", justify="right")
    for name, length in a.blocks:
        blocks.add_row(name, f"{length:#x}", _size(length))

    rounds = Table(title="rounds", title_justify="left")
    for column in ("round", "zero pages", "normal pages", "multifd packets"):
        rounds.add_column(column, justify="right")
    for r in a.rounds:
        normal = str(r.normal_pages) + (
            f" (+{r.repeated_pages} repeated)" if r.repeated_pages else ""
        )
        rounds.add_row(str(r.index), str(r.zero_pages), normal, str(r.multifd_packets))
    console.print(Group(blocks, rounds))

    if a.channels:
        channels = Table(title="multifd channels (by id)", title_justify="left")
        for column in ("id", "accepted", "packets", "SYNC", "pages", "bytes", "compression"):
            channels.add_column(column, justify="right")
        for c in a.channels:
            channels.add_row(
                "?" if c.id is None else str(c.id),
                f"#{c.accept_order}",
                str(c.packets),
                str(c.sync_packets),
                str(c.pages) + (f" +{c.zero_pages} zero" if c.zero_pages else ""),
                _size(c.bytes),
                c.compression or "-",
            )
        console.print(channels)

    if a.device_sections:
        console.print(
            Text(f"device sections ({len(a.device_sections)}): ", style="bold")
            + Text(", ".join(a.device_sections))
        )
    checks = Table(title="checks", title_justify="left", show_header=False)
    checks.add_column()
    checks.add_column()
    checks.add_column()
    for check in a.checks:
        mark = Text("ok", style="green") if check.ok else Text("FAIL", style="bold red")
        checks.add_row(mark, check.name, check.detail)
    console.print(checks)
    if a.extracted is not None and not a.extracted["complete"]:
        console.print(
            Text("incomplete: ", style="bold red")
            + Text(
                f"the RAM blocks written to {a.extracted['folder']} hold only what the "
                "recording carried up to its errors",
            ),
            soft_wrap=True,
        )
    # One line each, however narrow the terminal: scripts grep them.
    for error in a.errors:
        console.print(Text("error: ", style="bold red") + Text(error), soft_wrap=True)
