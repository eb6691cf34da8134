"""The `multifd` command: argument handling and presentation only."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.live import Live

from . import __version__
from .analyze import analyze, load_recording
from .analyze.report import render
from .demo.runner import DemoOptions, run_demo
from .migration.params import MigrationConfigError, parse_parameter_text
from .progress import human as _human
from .progress import progress_table, render_summary


def _analyze(args: argparse.Namespace) -> int:
    console = Console(stderr=args.json)
    try:
        recording = load_recording(args.path)
    except (OSError, ValueError) as exc:
        print(f"multifd analyze: error: {exc}", file=sys.stderr)
        return 2
    result = analyze(recording, extract=args.extract)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
    else:
        render(result, console)
        if args.extract:
            console.print(f"RAM blocks written to {args.extract} (see blocks.json there)")
    ok = not result.errors and all(c.ok for c in result.checks)
    return 0 if ok else 1


def _size_arg(text: str) -> int:
    try:
        return parse_parameter_text("max-bandwidth", text)
    except MigrationConfigError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 512M)") from None


def _demo(args: argparse.Namespace) -> int:
    options = DemoOptions(
        size=args.size,
        channels=args.channels,
        dirty_rate=args.dirty_rate,
        compression=args.compression,
        multifd=not args.no_multifd,
        transport=args.transport,
        downtime_limit=args.downtime_limit,
    )
    console = Console(stderr=True)
    if args.json:
        result = run_demo(options)
        print(json.dumps(result, indent=1))
    else:
        console.print(
            f"[bold]multifd demo[/]: {_human(options.size)} RAM block, "
            + (f"{options.channels} multifd channels" if options.multifd else "plain pre-copy")
            + f", {options.compression} compression, {options.transport} transport, "
            f"workload writing {_human(options.dirty_rate)}/s"
        )
        with Live(console=console, refresh_per_second=8, transient=True) as live:
            result = run_demo(options, progress=lambda q: live.update(progress_table(q)))
        render_summary(result, options.downtime_limit, Console())
    ok = result["status"] == "completed" and result["memory_identical"]
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multifd",
        description="QEMU-compatible multifd live migration of memory, in Python.",
    )
    parser.add_argument("--version", action="version", version=f"multifd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "analyze",
        help="decode a recorded migration (main stream and every multifd channel)",
        description="Decode a recorded migration: PATH is a folder of conn0.bin[.xz] (main) "
        "and conn1.bin[.xz]... (multifd channels in any order), or one main-stream file.",
    )
    p.add_argument("path", type=Path)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--extract",
        metavar="DIR",
        type=Path,
        help="write each RAM block into DIR as a file of its used length",
    )
    p.set_defaults(func=_analyze)

    p = sub.add_parser(
        "demo",
        help="the main job: live-migrate a busy RAM block to another process",
        description="Runs a destination process and a source on this machine; the "
        "source's workload keeps writing while its RAM block migrates over multifd "
        "channels. Exits 0 only if the migration completed and both memories are equal.",
    )
    p.add_argument("--size", type=_size_arg, default=1 << 30, help="RAM block size (1G)")
    p.add_argument("--channels", type=int, default=4, help="multifd channels (4)")
    p.add_argument(
        "--dirty-rate", type=_size_arg, default=128 << 20, help="bytes/s the workload writes"
    )
    p.add_argument("--compression", choices=("none", "zlib", "zstd"), default="none")
    p.add_argument("--no-multifd", action="store_true", help="plain pre-copy on one channel")
    p.add_argument("--transport", choices=("tcp", "unix"), default="unix")
    p.add_argument("--downtime-limit", type=int, default=300, help="milliseconds (300)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
