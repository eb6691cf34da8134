"""The `bench` command's arguments and its run: shared by `multifd bench` and
benchmarks/run.py, so both accept exactly the same options."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from ..migration.params import MigrationConfigError, parse_parameter_text
from .options import PAIRINGS, SCENARIOS, TRANSPORTS, BenchOptions
from .report import markdown, plot, render
from .run import failures, run_bench


def _size(text: str) -> int:
    try:
        return parse_parameter_text("max-bandwidth", text)
    except MigrationConfigError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 1G, 512M)") from None


def _list(
    convert: Callable[[str], Any], known: tuple[str, ...] | None = None
) -> Callable[[str], tuple[Any, ...]]:
    """An argparse type for comma-separated lists, checked against `known`."""

    def parse(text: str) -> tuple[Any, ...]:
        items = tuple(convert(part) for part in text.split(",") if part.strip())
        unknown = [i for i in items if known is not None and i not in known]
        if not items or unknown:
            choices = f" (choose from {','.join(known)})" if known else ""
            raise argparse.ArgumentTypeError(f"bad list {text!r}{choices}")
        return items

    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=_size, default=4 << 30, help="RAM size (4G)")
    p.add_argument(
        "--channels", type=_list(_int), default=(1, 2, 4, 8), help="channel counts (1,2,4,8)"
    )
    p.add_argument(
        "--with-qemu",
        action="store_true",
        help="also the bulk pairings with a real qemu-system-x86_64",
    )
    p.add_argument(
        "--no-qemu-prealloc",
        action="store_true",
        help="QEMU destinations without prealloc=on (Python destinations still prefault)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--scenarios",
        type=_list(str, SCENARIOS),
        default=SCENARIOS,
        help=f"which to run ({','.join(SCENARIOS)})",
    )
    p.add_argument(
        "--pairings",
        type=_list(str, PAIRINGS),
        default=PAIRINGS,
        help="bulk pairings to run (all four; QEMU ones need --with-qemu)",
    )
    p.add_argument("--runs", type=_int, default=3, help="timed runs per figure (3)")
    p.add_argument("--warmup", type=_int, default=1, help="discarded runs first (1)")
    p.add_argument("--transport", choices=TRANSPORTS, default="unix")
    p.add_argument(
        "--dirty-rates",
        type=_list(_size),
        default=(128 << 20, 512 << 20),
        help="live workload rates in bytes/s (128M,512M)",
    )
    p.add_argument("--downtime-limit", type=_int, default=300, help="live, in ms (300)")
    p.add_argument("--tracker-size", type=_size, help="tracker block (min(size, 1G))")
    p.add_argument("--workdir", default="/dev/shm", help="where RAM files go, in memory (/dev/shm)")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG (needs matplotlib)")
    p.add_argument(
        "--markdown", type=Path, metavar="FILE", help="also write the tables as Markdown"
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


# Columns for tables written to a file or a pipe: rich would assume 80 and
# cut the bulk and loopback tables' headers short.
_PIPE_WIDTH = 200


def _table_console() -> Console:
    """The console for the tables: the terminal's width, or wide enough for
    every column when the output is not a terminal (COLUMNS still wins)."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=_PIPE_WIDTH)


def _unwritable(path: Path) -> str | None:
    """Why `path` could not be written as a file, or None. Checked before the
    run: a bad path found only at the end would cost a long run its figures."""
    if path.is_dir():
        return f"{path} is a folder"
    folder = path.absolute().parent
    if not folder.is_dir():
        return f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable"
    if path.exists() and not os.access(path, os.W_OK):
        return f"{path} is not writable"
    return None


def _write_outputs(args: argparse.Namespace, result: dict[str, Any], err: Console) -> bool:
    """The --markdown and --plot files; False if one could not be written (said
    on stderr: the tables or JSON are already on stdout)."""
    failed: list[tuple[str, Path, OSError]] = []
    if args.markdown is not None:
        try:
            args.markdown.write_text(markdown(result))
        except OSError as exc:
            failed.append(("--markdown", args.markdown, exc))
    if args.plot is not None:
        try:
            err.print(plot(result, args.plot))
        except OSError as exc:
            failed.append(("--plot", args.plot, exc))
    for option, path, exc in failed:
        print(f"multifd bench: error: {option} {path}: {exc}", file=sys.stderr)
    return not failed


def run_command(args: argparse.Namespace) -> int:
    """Run the benchmark the arguments describe; 0 if every figure was measured
    and every file asked for written, 2 if it could not run (bad options and
    output paths are refused before anything is measured)."""
    err = Console(stderr=True)
    for option, path in (("--markdown", args.markdown), ("--plot", args.plot)):
        problem = None if path is None else _unwritable(path)
        if problem is not None:
            print(f"multifd bench: error: {option} {path}: {problem}", file=sys.stderr)
            return 2
    try:
        options = BenchOptions(
            size=args.size,
            channels=args.channels,
            scenarios=args.scenarios,
            pairings=args.pairings,
            runs=args.runs,
            warmup=args.warmup,
            with_qemu=args.with_qemu,
            qemu_prealloc=not args.no_qemu_prealloc,
            transport=args.transport,
            dirty_rates=args.dirty_rates,
            downtime_limit=args.downtime_limit,
            tracker_size=args.tracker_size,
            workdir=args.workdir,
            progress=None if args.quiet else lambda line: err.print(f"[dim]{line}[/]"),
        )
        result = run_bench(options)
    except (ValueError, OSError) as exc:
        print(f"multifd bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        render(result, _table_console())
    written = _write_outputs(args, result, err)
    problems = failures(result)
    for problem in problems:
        err.print(f"[red]{problem}[/]")
    return 0 if written and not problems else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="multifd bench", description="Measure multifd migration (issue 7 scenarios)."
    )
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
