"""The `multifd` command: argument handling and presentation only."""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path

from rich.console import Console

from . import __version__
from .analyze import analyze, load_recording
from .analyze.report import render

BUNDLED_RECORDING = "qemu-7.2-mf4-mb"


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


def _demo(args: argparse.Namespace) -> int:
    # Until the engine lands, the demo decodes a real QEMU 7.2 multifd migration
    # shipped with the package: every channel, every round, RAM rebuilt.
    folder = resources.files("multifd") / "data" / BUNDLED_RECORDING
    with resources.as_file(folder) as path:
        Console(stderr=True).print(
            f"[bold]multifd demo[/]: decoding a real QEMU 7.2 migration with 4 multifd "
            f"channels ({BUNDLED_RECORDING})"
        )
        return _analyze(argparse.Namespace(path=Path(path), json=args.json, extract=args.extract))


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

    p = sub.add_parser("demo", help="the main job: show a real multifd migration decoded")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--extract", metavar="DIR", type=Path, help="also write the RAM blocks")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
