"""Live progress and the final summary of a migration, drawn with rich."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from .channels import socket_address_uri


def human(n: float) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{int(n)} B"


def progress_table(info: dict[str, Any]) -> Table:
    """One line of figures, refreshed while the migration runs."""
    ram = info.get("ram", {})
    table = Table(box=None, show_edge=False)
    for column in (
        "status",
        "round",
        "sent",
        "remaining",
        "throughput",
        "dirty rate",
        "expected downtime",
    ):
        table.add_column(column, justify="right")
    table.add_row(
        info.get("status", "?"),
        str(info.get("x-rounds", 0)),
        human(ram.get("transferred", 0)),
        human(ram.get("remaining", 0)),
        f"{ram.get('mbps', 0) / 8000:.2f} GB/s",
        f"{human(ram.get('dirty-pages-rate', 0) * 4096)}/s",
        f"{info.get('expected-downtime', 0)} ms",
    )
    return table


def render_summary(result: dict[str, Any], downtime_limit: int, console: Console) -> None:
    """The final table: time, downtime against the limit, throughput, channels."""
    ram = result.get("ram", {})
    total_s = max(result.get("total-time", 0), 1) / 1000
    summary = Table(title="migration", title_justify="left", show_header=False)
    summary.add_column()
    summary.add_column(justify="right")
    summary.add_row("status", result["status"])
    if "error-desc" in result:
        summary.add_row("error", result["error-desc"])
    summary.add_row("total time", f"{result.get('total-time', 0)} ms")
    summary.add_row("setup time", f"{result.get('setup-time', 0)} ms")
    downtime = result.get("downtime")
    if downtime is not None:
        verdict = "within" if downtime <= downtime_limit else "OVER"
        summary.add_row(
            "downtime (source)", f"{downtime} ms ({verdict} the {downtime_limit} ms limit)"
        )
    dest = result.get("destination", {})
    if dest.get("downtime") is not None:
        summary.add_row("downtime (stop → resume)", f"{dest['downtime']} ms")
    summary.add_row("transferred", human(ram.get("transferred", 0)))
    summary.add_row("throughput", f"{ram.get('transferred', 0) / total_s / 1e9:.2f} GB/s")
    summary.add_row("rounds", str(result.get("x-rounds", 0)))
    summary.add_row("dirty syncs", str(ram.get("dirty-sync-count", 0)))
    summary.add_row("pages", f"{ram.get('normal', 0)} normal, {ram.get('duplicate', 0)} zero")
    trackers = result.get("x-dirty-tracker", {})
    if trackers:
        summary.add_row("dirty tracker", ", ".join(sorted(set(trackers.values()))))
    if result.get("cpu-throttle-percentage"):
        summary.add_row("auto-converge throttle", f"{result['cpu-throttle-percentage']} %")
    if "memory_identical" in result:
        summary.add_row(
            "memory identical",
            "[green]yes[/]" if result["memory_identical"] else "[bold red]NO[/]",
        )
    console.print(summary)
    channels = result.get("x-multifd-channels", [])
    if channels:
        table = Table(title="multifd channels", title_justify="left")
        for column in ("id", "packets", "SYNC", "pages", "bytes", "busy", "error"):
            table.add_column(column, justify="right")
        for c in channels:
            table.add_row(
                str(c["id"]),
                str(c["packets"]),
                str(c["sync-packets"]),
                str(c["pages"]),
                human(c["bytes"]),
                f"{c['busy-ms']} ms",
                c["error"] or "",
            )
        console.print(table)


def info_migrate_text(info: dict[str, Any], capabilities: dict[str, bool] | None = None) -> str:
    """A query-migrate answer as QEMU's HMP `info migrate` prints it, plus the
    figures of our own (rounds, dirty tracker, channels) after QEMU's."""
    lines = []
    if capabilities is not None:
        states = " ".join(f"{n}: {'on' if s else 'off'}" for n, s in capabilities.items())
        lines.append(f"capabilities: {states}")
    status = info.get("status", "none")
    error = f" ({info['error-desc']})" if status == "failed" and "error-desc" in info else ""
    lines.append(f"Migration status: {status}{error}")
    # An incoming side's times and counters are ours (x-): QEMU's shows none,
    # but they are the same figures, printed in the same words.
    for keys, label in (
        (("total-time", "x-total-time"), "total time"),
        (("expected-downtime",), "expected downtime"),
        (("downtime", "x-downtime"), "downtime"),
        (("setup-time",), "setup"),
    ):
        for key in keys:
            if key in info:
                lines.append(f"{label}: {info[key]} ms")
    ram = info.get("ram") or info.get("x-ram")
    if ram:
        lines += [
            f"transferred ram: {ram['transferred'] >> 10} kbytes",
            f"throughput: {ram['mbps']:0.2f} mbps",
            f"remaining ram: {ram['remaining'] >> 10} kbytes",
            f"total ram: {ram['total'] >> 10} kbytes",
            f"duplicate: {ram['duplicate']} pages",
            f"skipped: {ram['skipped']} pages",
            f"normal: {ram['normal']} pages",
            f"normal bytes: {ram['normal-bytes'] >> 10} kbytes",
            f"dirty sync count: {ram['dirty-sync-count']}",
            f"page size: {ram['page-size'] >> 10} kbytes",
            f"multifd bytes: {ram['multifd-bytes'] >> 10} kbytes",
            f"pages-per-second: {ram['pages-per-second']}",
        ]
        # QEMU prints these only when they are not zero.
        if ram.get("dirty-pages-rate"):
            lines.append(f"dirty pages rate: {ram['dirty-pages-rate']} pages")
        if ram.get("precopy-bytes"):
            lines.append(f"precopy ram: {ram['precopy-bytes'] >> 10} kbytes")
        if ram.get("downtime-bytes"):
            lines.append(f"downtime ram: {ram['downtime-bytes'] >> 10} kbytes")
    if info.get("cpu-throttle-percentage"):
        lines.append(f"cpu throttle percentage: {info['cpu-throttle-percentage']}")
    if "socket-address" in info:
        uris = [f"\t{socket_address_uri(a)}" for a in info["socket-address"]]
        lines += ["socket address: [", *uris, "]"]
    if "x-rounds" in info:
        lines.append(f"rounds: {info['x-rounds']}")
    trackers = info.get("x-dirty-tracker")
    if trackers:
        lines.append(f"dirty tracker: {', '.join(sorted(set(trackers.values())))}")
    for channel in info.get("x-multifd-channels", []):
        error = f", error: {channel['error']}" if channel.get("error") else ""
        lines.append(
            f"multifd channel {channel['id']}: {channel['packets']} packets, "
            f"{channel['pages']} pages, {channel['bytes'] >> 10} kbytes{error}"
        )
    return "\n".join(lines)


def qemu_progress_table(qemu: dict[str, Any], ours: dict[str, Any]) -> Table:
    """Progress of a migration between a real QEMU and us, as both report it."""
    table = Table(box=None, show_edge=False)
    for column in ("QEMU", "sent", "remaining", "throughput", "multifd", "ours", "received"):
        table.add_column(column, justify="right")
    ram = qemu.get("ram", {})
    our_ram = ours.get("x-ram", {})
    table.add_row(
        qemu.get("status", "?"),
        human(ram.get("transferred", 0)),
        human(ram.get("remaining", 0)),
        f"{ram.get('mbps', 0) / 8000:.2f} GB/s",
        f"{len(ours.get('x-multifd-channels', []))} channels",
        ours.get("status", "?"),
        human(our_ram.get("transferred", 0)),
    )
    return table


def render_snapshot(manifest: dict[str, Any], console: Console) -> None:
    """What `multifd save` wrote, with QEMU's figures beside ours."""
    qemu = manifest["query-migrate"]
    ours = manifest["destination"]
    table = Table(title="snapshot", title_justify="left", show_header=False)
    table.add_column()
    table.add_column()
    table.add_row("machine type", manifest["machine-type"])
    table.add_row("QEMU", manifest["qemu-version"].get("package", "") or "")
    table.add_row("QEMU status", qemu.get("status", "?"))
    table.add_row("channels", f"{manifest['channels']} ({manifest['compression']})")
    table.add_row("total time (QEMU)", f"{qemu.get('total-time', 0)} ms")
    table.add_row("downtime (QEMU)", f"{qemu.get('downtime', 0)} ms")
    table.add_row(
        "pages (QEMU)",
        f"{qemu['ram']['normal']} normal, {qemu['ram']['duplicate']} zero",
    )
    table.add_row(
        "pages (received)",
        f"{ours['x-ram']['normal']} normal, {ours['x-ram']['duplicate']} zero",
    )
    table.add_row("device sections", str(len(manifest["device-sections"])))
    console.print(table)
    blocks = Table(title="RAM blocks", title_justify="left")
    for column in ("block", "size", "file", "sha256"):
        blocks.add_column(column)
    for block in manifest["blocks"]:
        blocks.add_row(
            block["name"], human(block["used_length"]), block["file"], block["sha256"][:16]
        )
    console.print(blocks)
