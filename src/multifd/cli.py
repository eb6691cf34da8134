"""The `multifd` command: argument handling and presentation only."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from . import __version__
from .analyze import Analysis, RecordingError, analyze, check_extract_folder, load_recording
from .analyze.report import render
from .bench import command as bench_command
from .channels import ChannelError, URIError
from .control import (
    BlockSpec,
    Daemon,
    DaemonOptions,
    OptionError,
    Role,
    StopRequest,
    parse_capability,
    parse_parameter,
    parse_size,
    parse_uuid,
    stop_on_signals,
)
from .demo.runner import DemoError, DemoOptions, DemoStopped, check_size, run_demo
from .migration.params import (
    COMPRESSION_METHODS,
    PARAMETERS,
    MigrationConfigError,
    MigrationSettings,
    parse_parameter_text,
)
from .progress import human as _human
from .progress import (
    info_migrate_text,
    progress_table,
    qemu_progress_table,
    render_snapshot,
    render_summary,
)
from .qemu.qmp import QMPError
from .qemu.snapshot import SnapshotError, SnapshotStopped, restore, save


def _analyze(args: argparse.Namespace) -> int:
    """Exit status 0: a sound recording; 1: the recording is broken or could
    not be read (said on stderr, one line each); 2: a usage error. With --json,
    stdout holds one JSON object whenever the status is 0 or 1."""
    console = Console(stderr=args.json)
    if args.extract is not None:
        # Before the recording is read: decompressing and decoding it can be long.
        try:
            check_extract_folder(args.extract)
        except ValueError as exc:
            print(f"multifd analyze: error: --extract {exc}", file=sys.stderr)
            return 2
    try:
        recording = load_recording(args.path)
    except RecordingError as exc:
        result = Analysis(str(args.path), errors=[str(exc)])
    else:
        result = analyze(recording, extract=args.extract)
    if args.json:
        print(json.dumps(result.to_json(), indent=1))
        for error in result.errors:
            print(f"multifd analyze: error: {error}", file=sys.stderr)
        for check in result.checks:
            if not check.ok and not result.errors:
                print(
                    f"multifd analyze: check failed: {check.name}: {check.detail}", file=sys.stderr
                )
    elif not result.checks:
        print(f"multifd analyze: error: {result.errors[0]}", file=sys.stderr)
    else:
        render(result, console)
        if result.extracted is not None and result.extracted["complete"]:
            console.print(f"RAM blocks written to {args.extract} (see blocks.json there)")
    ok = not result.errors and all(c.ok for c in result.checks)
    return 0 if ok else 1


def _demo_size(text: str) -> int:
    try:
        return check_size(parse_size(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _demo_parameter(name: str) -> Callable[[str], Any]:
    """An argparse type for the migration parameter `name`, checked as a
    migration checks it, so a bad value is a usage error before anything runs."""

    def convert(text: str) -> Any:
        try:
            value = parse_parameter_text(name, text)
            MigrationSettings(parameters={name: value})
        except MigrationConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    convert.__name__ = name
    return convert


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
    stop = StopRequest()
    try:
        with stop_on_signals(stop):
            if args.json:
                result = run_demo(options, stop=stop)
            else:
                console.print(
                    f"[bold]multifd demo[/]: {_human(options.size)} RAM block, "
                    + (
                        f"{options.channels} multifd channels"
                        if options.multifd
                        else "plain pre-copy"
                    )
                    + f", {options.compression} compression, {options.transport} transport, "
                    f"workload writing {_human(options.dirty_rate)}/s"
                )
                with Live(console=console, refresh_per_second=8, transient=True) as live:
                    result = run_demo(
                        options, progress=lambda q: live.update(progress_table(q)), stop=stop
                    )
    except DemoStopped:
        assert stop.signal is not None
        print(f"multifd demo: stopped by {signal.Signals(stop.signal).name}", file=sys.stderr)
        return 1
    except (DemoError, OSError) as exc:
        print(f"multifd demo: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        render_summary(result, options.downtime_limit, Console())
    ok = result["status"] == "completed" and result["memory_identical"]
    return 0 if ok else 1


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that shows the parser's own message on a bad value."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


def _daemon(role: Role, args: argparse.Namespace) -> int:
    name = f"multifd {role.value}"
    options = DaemonOptions(
        blocks=args.block,
        capabilities=dict(args.cap),
        parameters=dict(args.set),
        uri=args.uri,
        qmp=args.qmp,
        uuid=args.uuid,
    )
    try:
        daemon = Daemon(role, options)
    except (OptionError, MigrationConfigError, OSError, ValueError) as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    with daemon, stop_on_signals(daemon):
        try:
            daemon.start()
        except (MigrationConfigError, URIError, ChannelError, OSError, ValueError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 2
        if daemon.server is not None:
            print(f"{name}: QMP on {daemon.server.address}", file=sys.stderr)
        if daemon.listening is not None:
            print(f"{name}: waiting for a migration on {daemon.listening}", file=sys.stderr)
        elif daemon.uri is not None:
            print(f"{name}: migrating to {daemon.uri}", file=sys.stderr)
        else:
            command = "migrate-incoming" if role is Role.INCOMING else "migrate"
            print(f"{name}: waiting for the QMP command {command}", file=sys.stderr)
        if role is Role.MIGRATE:
            console = Console(stderr=True)
            with Live(console=console, refresh_per_second=8, transient=True) as live:
                info = daemon.run(progress=lambda q: live.update(progress_table(q)))
        else:
            info = daemon.run()
        if daemon.stop_signal is not None:
            print(
                f"{name}: stopped by {signal.Signals(daemon.stop_signal).name}",
                file=sys.stderr,
            )
        print(info_migrate_text(info, daemon.endpoint.settings.capabilities))
    # No status: an incoming side stopped before any source came.
    return 0 if info.get("status") == "completed" else 1


def _add_daemon_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--block",
        metavar="NAME=SIZE[@PATH]",
        type=_checked(BlockSpec.parse),
        action="append",
        required=True,
        help="a RAM block (repeat for more): anonymous memory, or the file or shared "
        "memory at PATH (sizes take K, M, G)",
    )
    p.add_argument(
        "--cap",
        metavar="NAME=on|off",
        type=_checked(parse_capability),
        action="append",
        default=[],
        help="a migration capability, e.g. multifd=on (repeat for more)",
    )
    p.add_argument(
        "--set",
        metavar="NAME=VALUE",
        type=_checked(parse_parameter),
        action="append",
        default=[],
        help="a migration parameter, e.g. multifd-channels=4 (repeat for more)",
    )
    p.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="serve QMP on unix:PATH, tcp:HOST:PORT, or a path",
    )
    p.add_argument(
        "--uuid",
        type=_checked(parse_uuid),
        default=bytes(16),
        help="this end's UUID, as QEMU's -uuid (default: unset, all zeros): a source "
        "names it in each multifd channel's handshake, and with validate-uuid in its "
        "stream; a destination takes only channels naming its own",
    )


def _snapshot_command(command: str, action: Callable[..., Any], completed: str) -> Any:
    """Run save or restore (`action(stop=..., progress=...)`) with live
    progress, stopped cleanly by SIGINT/SIGTERM: its result, or None once
    stderr says why it did not complete. `completed`: what a signal that came
    as QEMU completed leaves."""
    console = Console(stderr=True)
    stop = StopRequest()
    try:
        with (
            stop_on_signals(stop),
            Live(console=console, refresh_per_second=8, transient=True) as live,
        ):
            result = action(
                stop=stop,
                progress=lambda qemu, ours: live.update(qemu_progress_table(qemu, ours)),
            )
    except SnapshotStopped as exc:
        assert stop.signal is not None
        name = signal.Signals(stop.signal).name
        print(f"multifd {command}: stopped by {name}: {exc}", file=sys.stderr)
        return None
    except (SnapshotError, QMPError, ConnectionError, OSError, MigrationConfigError) as exc:
        print(f"multifd {command}: error: {exc}", file=sys.stderr)
        return None
    if stop.signal is not None:
        name = signal.Signals(stop.signal).name
        print(f"multifd {command}: {name} came as QEMU completed: {completed}", file=sys.stderr)
    return result


def _save(args: argparse.Namespace) -> int:
    manifest = _snapshot_command(
        "save",
        lambda **run: save(
            args.qmp, args.dir, channels=args.channels, compression=args.compression, **run
        ),
        "the snapshot is whole",
    )
    if manifest is None:
        return 1
    render_snapshot(manifest, Console())
    return 0


def _restore(args: argparse.Namespace) -> int:
    result = _snapshot_command(
        "restore",
        lambda **run: restore(
            args.dir, args.qmp, channels=args.channels, compression=args.compression, **run
        ),
        "it was restored",
    )
    if result is None:
        return 1
    # Plain print: a console would wrap the long capabilities line.
    print(info_migrate_text(result["source"], result["capabilities"]))
    print(
        f"QEMU: migration {result['query-migrate']['status']}, "
        f"VM {result['query-status']['status']}"
    )
    return 0


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
        help="write each RAM block into DIR as a file of its used length, and "
        "blocks.json listing them; DIR must be new (it is created) or empty: "
        "nothing is overwritten",
    )
    p.set_defaults(func=_analyze)

    p = sub.add_parser(
        "demo",
        help="the main job: live-migrate a busy RAM block to another process",
        description="Runs a destination process and a source on this machine; the "
        "source's workload keeps writing while its RAM block migrates over multifd "
        "channels. Exits 0 only if the migration completed and both memories are equal.",
    )
    p.add_argument(
        "--size",
        type=_demo_size,
        default=1 << 30,
        help="RAM block size, a multiple of the page size that fits twice in this host's "
        "memory (1G)",
    )
    p.add_argument(
        "--channels",
        type=_demo_parameter("multifd-channels"),
        default=4,
        help="multifd channels, {0.low} to {0.high} (4)".format(PARAMETERS["multifd-channels"]),
    )
    p.add_argument(
        "--dirty-rate",
        type=_checked(parse_size),
        default=128 << 20,
        help="bytes/s the workload writes (128M)",
    )
    p.add_argument("--compression", choices=COMPRESSION_METHODS, default="none")
    p.add_argument("--no-multifd", action="store_true", help="plain pre-copy on one channel")
    p.add_argument("--transport", choices=("tcp", "unix"), default="unix")
    p.add_argument(
        "--downtime-limit",
        type=_demo_parameter("downtime-limit"),
        default=300,
        help="milliseconds, {0.low} to {0.high} (300)".format(PARAMETERS["downtime-limit"]),
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_demo)

    p = sub.add_parser(
        "incoming",
        help="receive a migration: a destination daemon, QMP-drivable",
        description="Listen on URI and receive a migration into the blocks (files at PATH "
        "are created or extended, and put back if the daemon fails to start). URI 'defer' "
        "waits for QMP's migrate-incoming. Without --qmp it exits when the migration ends. "
        "With --qmp it serves QMP and stays after the migration, like QEMU's destination "
        "running the VM, until QMP quit or SIGINT/SIGTERM. Prints a summary like QEMU's "
        "HMP 'info migrate'; exit status 0 only if the migration completed.",
    )
    p.add_argument("uri", help="tcp:HOST:PORT, unix:PATH, fd:N, exec:CMD, file:PATH or defer")
    _add_daemon_options(p)
    p.set_defaults(func=lambda args: _daemon(Role.INCOMING, args))

    p = sub.add_parser(
        "migrate",
        help="send a migration: a source daemon, QMP-drivable",
        description="Migrate the blocks to URI at once, with live progress, and exit when "
        "it ends. With --qmp it serves QMP (without URI it waits for a migrate command) and "
        "stays after the migration, like QEMU's postmigrate, until QMP quit or SIGINT/SIGTERM. "
        "Prints a summary like QEMU's HMP 'info migrate'; exit status 0 only if the last "
        "migration completed.",
    )
    p.add_argument("uri", nargs="?", help="tcp:HOST:PORT, unix:PATH, fd:N, exec:CMD, file:PATH")
    _add_daemon_options(p)
    p.set_defaults(func=lambda args: _daemon(Role.MIGRATE, args))

    p = sub.add_parser(
        "save",
        help="save a running QEMU VM into a snapshot folder, over multifd",
        description="Connects to a running QEMU's QMP socket, turns multifd on there, and "
        "receives its live migration into DIR: each RAM block as a sparse file, the device "
        "state and configuration byte for byte, and manifest.json. On failure, or when "
        "stopped by SIGINT/SIGTERM (QEMU's migration is then cancelled and its VM goes on), "
        "nothing is left in DIR.",
    )
    p.add_argument(
        "--qmp", required=True, help="the QEMU's QMP socket (unix:PATH, tcp:HOST:PORT or a path)"
    )
    p.add_argument("dir", type=Path, help="the snapshot folder (new or empty)")
    p.add_argument("--channels", type=int, default=2, help="multifd channels (2)")
    p.add_argument("--compression", choices=("none", "zlib", "zstd"), default="none")
    p.set_defaults(func=_save)

    p = sub.add_parser(
        "restore",
        help="restore a snapshot folder into a QEMU started with -incoming defer",
        description="Feeds DIR into the QEMU at --qmp (started with -incoming defer and the "
        "same machine type and -m): sets multifd there, then sends every block over the "
        "multifd channels and the device state; the VM runs on afterwards. The folder is "
        "checked whole before QEMU is told to listen: a QEMU destination takes one "
        "incoming migration only, so one stopped or failed midway must be started again.",
    )
    p.add_argument("dir", type=Path, help="a folder written by multifd save")
    p.add_argument(
        "--qmp", required=True, help="the QEMU's QMP socket (unix:PATH, tcp:HOST:PORT or a path)"
    )
    p.add_argument("--channels", type=int, help="multifd channels (default: as saved)")
    p.add_argument("--compression", choices=("none", "zlib", "zstd"), default="none")
    p.set_defaults(func=_restore)

    p = sub.add_parser(
        "bench",
        help="measure migration speed against QEMU itself and raw loopback",
        description="Runs the benchmark scenarios (bulk pairings with QEMU, live, raw "
        "loopback, dirty-tracker cost); every figure is also a ratio to a baseline "
        "measured in the same run.",
    )
    bench_command.add_arguments(p)
    p.set_defaults(func=bench_command.run_command)
    return parser


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to `sys.stderr` as it is at each record: rich's live progress
    replaces it while it runs, and shows what is written there above its table."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr


class _CommandFormatter(logging.Formatter):
    """ "multifd incoming: warning: …", as the command's own messages read."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self._command = command

    def format(self, record: logging.LogRecord) -> str:
        return f"{self._command}: {record.levelname.lower()}: {super().format(record)}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The library only has a NullHandler: the command shows its warnings (a
    # refused incoming connection, a listener failure) on stderr itself. Removed
    # on return, so that calling main() in a process leaves its logging as it was.
    handler = _StderrHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_CommandFormatter(f"multifd {args.command}"))
    logger = logging.getLogger("multifd")
    logger.addHandler(handler)
    try:
        return args.func(args)
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
