"""`multifd incoming` and `multifd migrate` as real processes: migrating between files,
driven by QMPClient and by qmp-shell as a person types, signals, and usage errors."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from control_support import (
    TIMEOUT,
    DaemonProcess,
    ask,
    configure,
    connect_when_up,
    hang_up,
    next_event,
    run,
    statuses_until,
)

from multifd.control.daemon import POLL_INTERVAL

DaemonFactory = Callable[..., DaemonProcess]
MULTIFD = ["--cap", "multifd=on", "--set", "multifd-channels=3"]


def make_source_files(directory: Path) -> list[str]:
    """Two blocks' worth of files with random pages (and runs of zeros)."""
    (directory / "ram.src").write_bytes(os.urandom(3 << 20) + bytes(1 << 20))
    (directory / "vga.src").write_bytes(os.urandom(256 << 10))
    return [
        "--block",
        f"pc.ram=4M@{directory / 'ram.src'}",
        "--block",
        f"vga=256K@{directory / 'vga.src'}",
    ]


def destination_blocks(directory: Path) -> list[str]:
    return [
        "--block",
        f"pc.ram=4M@{directory / 'ram.dst'}",
        "--block",
        f"vga=256K@{directory / 'vga.dst'}",
    ]


def assert_files_equal(directory: Path) -> None:
    for name in ("ram", "vga"):
        assert (directory / f"{name}.src").read_bytes() == (directory / f"{name}.dst").read_bytes()


def test_migrate_between_two_daemons(daemon: DaemonFactory, tmp_path: Path, sock_dir: Path) -> None:
    uri = f"unix:{sock_dir / 'migration.sock'}"
    incoming = daemon("incoming", uri, *destination_blocks(tmp_path), *MULTIFD, label="dst")
    incoming.wait_for_path(sock_dir / "migration.sock")
    source = daemon("migrate", uri, *make_source_files(tmp_path), *MULTIFD, label="src")
    assert source.wait() == 0, source.stderr
    assert incoming.wait() == 0, incoming.stderr
    assert_files_equal(tmp_path)
    for proc in (source, incoming):
        assert "Migration status: completed" in proc.stdout
        assert "multifd: on" in proc.stdout
        assert re.search(r"^total ram: 4352 kbytes$", proc.stdout, re.MULTILINE)
    assert re.search(r"^multifd channel 2: \d+ packets", source.stdout, re.MULTILINE)
    assert f"waiting for a migration on {uri}" in incoming.stderr


UUID = "6f1c52c8-f4a3-4d0c-9a3b-e7e1a0b2c3d4"


def test_daemons_take_a_uuid_as_qemus_uuid(
    daemon: DaemonFactory, tmp_path: Path, sock_dir: Path
) -> None:
    """A QEMU source started with -uuid names it in every multifd channel's
    handshake: a destination takes only channels naming its own UUID."""
    uri = f"unix:{sock_dir / 'migration.sock'}"
    both = [*MULTIFD, "--uuid", UUID]
    incoming = daemon("incoming", uri, *destination_blocks(tmp_path), *both, label="dst")
    incoming.wait_for_path(sock_dir / "migration.sock")
    files = make_source_files(tmp_path)
    source = daemon("migrate", uri, *files, *both, "--cap", "validate-uuid=on", label="src")
    assert source.wait() == 0, source.stderr
    assert incoming.wait() == 0, incoming.stderr
    assert_files_equal(tmp_path)


def test_daemons_with_other_uuids_refuse_the_migration(
    daemon: DaemonFactory, tmp_path: Path, sock_dir: Path
) -> None:
    uri = f"unix:{sock_dir / 'migration.sock'}"
    blocks = destination_blocks(tmp_path)
    incoming = daemon("incoming", uri, *blocks, "--uuid", UUID, label="dst")
    incoming.wait_for_path(sock_dir / "migration.sock")
    source = daemon(
        "migrate",
        uri,
        *make_source_files(tmp_path),
        *("--uuid", UUID.replace("6f", "00"), "--cap", "validate-uuid=on"),
        label="src",
    )
    assert incoming.wait() == 1
    assert (
        "UUID received is 001c52c8-f4a3-4d0c-9a3b-e7e1a0b2c3d4 and local is "
        f"{UUID}. Mismatch in UUIDs" in incoming.stdout + incoming.stderr
    )
    assert source.wait() == 1


def test_daemons_driven_by_qmp(daemon: DaemonFactory, tmp_path: Path, sock_dir: Path) -> None:
    source_qmp, destination_qmp = sock_dir / "src.qmp", sock_dir / "dst.qmp"
    incoming = daemon(
        "incoming",
        "defer",
        *destination_blocks(tmp_path),
        "--qmp",
        str(destination_qmp),
        label="dst",
    )
    source = daemon(
        "migrate", *make_source_files(tmp_path), "--qmp", f"unix:{source_qmp}", label="src"
    )
    uri = f"unix:{sock_dir / 'migration.sock'}"

    async def scenario() -> None:
        src = await connect_when_up(source_qmp, source, name="src")
        dst = await connect_when_up(destination_qmp, incoming, name="dst")
        try:
            for qmp in (src, dst):
                await configure(qmp, multifd_channels=4, multifd_compression="zlib")
            await dst.execute("migrate-incoming", {"uri": uri})
            assert (await next_event(dst, "MIGRATION"))["data"] == {"status": "setup"}
            await src.execute("migrate", {"uri": uri})
            assert await statuses_until(src, ("completed", "failed")) == [
                "setup",
                "active",
                "completed",
            ]
            assert await statuses_until(dst, ("completed", "failed")) == ["active", "completed"]
            info = await ask(src, "query-migrate")
            assert info["status"] == "completed"
            assert len(info["x-multifd-channels"]) == 4
            # Both stay, like QEMU's, until told to quit: the source in
            # postmigrate, the destination running what it received.
            assert (await ask(src, "query-status"))["status"] == "postmigrate"
            assert (await ask(dst, "query-status"))["status"] == "running"
            assert (await ask(dst, "query-migrate"))["status"] == "completed"
            # Longer than the daemon takes to notice an ended migration.
            await asyncio.sleep(3 * POLL_INTERVAL)
            assert incoming.process.poll() is None
            for qmp in (src, dst):
                assert await qmp.execute("quit") == {}
                await next_event(qmp, "SHUTDOWN")
        finally:
            await hang_up(src)
            await hang_up(dst)

    run(scenario())
    assert incoming.wait() == 0, incoming.stderr
    assert source.wait() == 0, source.stderr
    assert_files_equal(tmp_path)
    assert "Migration status: completed" in source.stdout
    assert not source_qmp.exists() and not destination_qmp.exists()


class Shell:
    """qmp-shell in a subprocess, typed into line by line; its output is read by a
    thread of the test's own, so every wait is bounded."""

    def __init__(self, address: Path, home: Path) -> None:
        executable = shutil.which("qmp-shell", path=os.path.dirname(sys.executable))
        assert executable, "qmp-shell is installed with qemu.qmp"
        self.process = subprocess.Popen(
            [executable, str(address)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(home)},  # its history file goes there
        )
        self._chunks: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="qmp-shell-output")
        self._reader.start()
        self.output = ""

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := os.read(self.process.stdout.fileno(), 4096):
            self._chunks.put(chunk)
        self._chunks.put(b"")

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """Wait for `pattern` in what the shell printed since the last match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match:
                self.output = self.output[match.end() :]
                return match
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"qmp-shell never printed {pattern!r}; got {self.output!r}"
            try:
                chunk = self._chunks.get(timeout=remaining)
            except queue.Empty:
                continue
            assert chunk, f"qmp-shell ended before {pattern!r}; got {self.output!r}"
            self.output += chunk.decode()

    def type(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def close(self) -> int:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            code = self.process.wait(TIMEOUT)
        finally:
            self.process.kill()
            self._reader.join(TIMEOUT)
            assert self.process.stdout is not None
            self.process.stdout.close()
            self.process.wait()
        return code


def test_qmp_shell_drives_a_source(daemon: DaemonFactory, tmp_path: Path, sock_dir: Path) -> None:
    uri = f"unix:{sock_dir / 'migration.sock'}"
    incoming = daemon("incoming", uri, *destination_blocks(tmp_path), *MULTIFD, label="dst")
    source_qmp = sock_dir / "src.qmp"
    source = daemon("migrate", *make_source_files(tmp_path), "--qmp", str(source_qmp), label="src")
    incoming.wait_for_path(sock_dir / "migration.sock")
    source.wait_for_path(source_qmp)
    shell = Shell(source_qmp, tmp_path)
    try:
        # The QEMU version whose protocol we speak, as the greeting reports it.
        shell.expect(r"Welcome to the QMP low-level shell!\nConnected to QEMU 7\.2\.0")
        shell.expect(r"\(QEMU\) ")
        shell.type(
            'migrate-set-capabilities capabilities=[{"capability":"multifd","state":true},'
            '{"capability":"events","state":true}]'
        )
        shell.expect(r'\{"return": \{\}\}')
        shell.type("migrate-set-parameters multifd-channels=3 downtime-limit=1000")
        shell.expect(r'\{"return": \{\}\}')
        shell.type("query-migrate-parameters")
        shell.expect(r'"multifd-channels": 3')
        shell.type("migrate-set-parameters multifd-channels=0")
        shell.expect(
            r'\{"error": \{"class": "GenericError", "desc": "Parameter \'multifd-channels\' '
            r'expects an integer in the range of 1 to 255"\}\}'
        )
        shell.type("warp-drive")
        shell.expect(
            r'"class": "CommandNotFound", "desc": "The command warp-drive has not been found"'
        )
        shell.type(f"migrate uri={uri}")
        shell.expect(r'\{"return": \{\}\}')
        # As a person would: ask again until it is over.
        deadline = time.monotonic() + TIMEOUT
        while True:
            shell.type("query-migrate")
            status = shell.expect(r'"status": "([a-z-]+)"')[1]
            if status in ("completed", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, f"migration still {status}"
            time.sleep(0.1)
        assert status == "completed"
        # An empty line shows the events that came meanwhile.
        shell.expect(r"\(QEMU\) ")
        shell.type("")
        shell.expect(r"'event': 'MIGRATION', 'data': \{'status': 'completed'\}")
        shell.type("query-status")
        shell.expect(r'\{"return": \{"status": "postmigrate", "running": false')
        shell.type("quit")
        shell.expect(r'\{"return": \{\}\}')
    finally:
        shell.close()
    assert source.wait() == 0, source.stderr
    assert incoming.wait() == 0, incoming.stderr
    assert_files_equal(tmp_path)


def test_sigterm_cancels_cleanly(daemon: DaemonFactory, tmp_path: Path, sock_dir: Path) -> None:
    uri = f"unix:{sock_dir / 'migration.sock'}"
    incoming = daemon("incoming", uri, *destination_blocks(tmp_path), *MULTIFD, label="dst")
    incoming.wait_for_path(sock_dir / "migration.sock")
    source_qmp = sock_dir / "src.qmp"
    # About 4 s at this bandwidth: still running when the signal comes.
    source = daemon(
        "migrate",
        uri,
        *make_source_files(tmp_path),
        *MULTIFD,
        "--set",
        "max-bandwidth=1M",
        "--cap",
        "events=on",
        "--qmp",
        str(source_qmp),
        label="src",
    )

    async def watch() -> None:
        src = await connect_when_up(source_qmp, source)
        try:
            while (await ask(src, "query-migrate"))["status"] != "active":
                pass
            source.process.send_signal(signal.SIGTERM)
            seen = await statuses_until(src, ("cancelled", "failed"))
            assert seen[-2:] == ["cancelling", "cancelled"]
        finally:
            await hang_up(src)

    run(watch())
    assert source.wait() == 1
    assert "Migration status: cancelled" in source.stdout
    assert "stopped by SIGTERM" in source.stderr
    # The destination saw the streams break: failed, and without QMP it exits.
    assert incoming.wait() == 1
    assert "Migration status: failed" in incoming.stdout
    assert not (sock_dir / "migration.sock").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["migrate", "--block", "pc.ram=4M"], "without a migration URI the daemon waits for QMP"),
        (["incoming", "defer", "--block", "pc.ram=4M"], "give --qmp SOCKET"),
        (["incoming", "unix:/x", "--block", "pc.ram"], "not a block: 'pc.ram' (NAME=SIZE"),
        (["incoming", "unix:/x", "--block", "a=4M", "--cap", "warp=on"], "unknown capability"),
        (["incoming", "unix:/x", "--block", "a=4M", "--set", "speed=1"], "'speed' is unexpected"),
        (["incoming", "unix:/x", "--block", "a=4K@/nonexistent/dir/f"], "No such file"),
        (["migrate", "bogus:uri", "--block", "a=4M"], "unknown migration protocol"),
        (
            ["incoming", "unix:/x", "--block", "a=4M", "--qmp", "exec:cat"],
            "invalid QMP address 'exec:cat': a QMP socket is not served on exec: "
            "(accepted forms: unix:PATH, tcp:HOST:PORT, or a path meaning unix:PATH)",
        ),
        (
            ["incoming", "defer", "--block", "a=4K", "--qmp", "tcp:127.0.0.1:99999"],
            "invalid QMP address 'tcp:127.0.0.1:99999': port '99999' is not a number",
        ),
        (
            [
                "incoming",
                "unix:/nonexistent/../nonexistent/x.sock",
                "--block",
                "a=4K",
                "--qmp",
                "/nonexistent/x.sock",
            ],
            "--qmp unix:/nonexistent/x.sock and the migration URI "
            "unix:/nonexistent/../nonexistent/x.sock are the same socket",
        ),
        (
            [
                "migrate",
                "unix:/nonexistent/x.sock",
                "--block",
                "a=4K",
                "--qmp",
                "unix:/nonexistent/x.sock",
            ],
            "are the same socket: give each its own",
        ),
        (
            ["incoming", "unix:/x", "--block", "a=4K", "--uuid", UUID.replace("-", "")],
            "argument --uuid: not a UUID: '6f1c52c8f4a34d0c9a3be7e1a0b2c3d4' (8-4-4-4-12 hex "
            "digits, as QEMU's -uuid)",
        ),
        (
            ["incoming", "unix:/x", "--block", "pc.ram=99999T"],
            "RAMBlock 'pc.ram': map 109950063265972224 bytes of anonymous memory: ",
        ),
    ],
)
def test_usage_errors(daemon: DaemonFactory, args: list[str], message: str) -> None:
    proc = daemon(*args)
    assert proc.wait() == 2
    assert message in proc.stderr
    if "--qmp" in args:  # its errors are its own, not the migration URI's
        assert "migration URI" not in proc.stderr.replace("and the migration URI", "")


def test_incoming_help_says_when_it_exits(daemon: DaemonFactory) -> None:
    """With --qmp a destination stays after completion (see test_daemons_driven_by_qmp)."""
    proc = daemon("incoming", "--help")
    assert proc.wait() == 0
    text = " ".join(proc.stdout.split())
    assert "Without --qmp it exits when the migration ends." in text
    assert "With --qmp it serves QMP and stays after the migration" in text
    assert "until QMP quit or SIGINT/SIGTERM" in text
    assert "exit status 0 only if the migration completed" in text


def test_a_short_source_file_gets_advice_for_the_command_line(
    daemon: DaemonFactory, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.write_bytes(b"\1" * 8192)
    proc = daemon("migrate", "unix:/x", "--block", f"a=4M@{small}")
    assert proc.wait() == 2
    assert proc.stderr == (
        f"multifd migrate: error: block 'a': {small} has 8192 bytes, fewer than the 4M given; "
        f"give the file's size (--block a=8K@{small}) or a file of at least 4194304 bytes\n"
    )


def block_files(directory: Path) -> tuple[list[str], Callable[[], dict[str, tuple[int, bytes]]]]:
    """--block options for a missing file, a short one and one of the right size,
    and a look at what the directory holds (each file's mtime and content)."""
    (directory / "short").write_bytes(os.urandom(8192))
    (directory / "fits").write_bytes(os.urandom(4 << 20))
    os.utime(directory / "fits", ns=(10**18, 10**18))
    args = ["--block", f"a=4M@{directory / 'new'}", "--block", f"b=8M@{directory / 'short'}"]
    args += ["--block", f"c=4M@{directory / 'fits'}"]

    def look() -> dict[str, tuple[int, bytes]]:
        return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in directory.iterdir()}

    return args, look


def test_a_failed_start_leaves_the_block_files_as_they_were(
    daemon: DaemonFactory, tmp_path: Path, sock_dir: Path
) -> None:
    files = tmp_path / "blocks"
    files.mkdir()
    blocks, look = block_files(files)
    before = look()
    # A URI refused before any file is touched, a socket that cannot be bound
    # after the blocks are open, and a QMP address in use.
    (sock_dir / "busy.qmp").touch()
    for args in (
        ["bogus:uri"],
        [f"unix:{sock_dir / 'no' / 'such' / 'dir.sock'}"],
        [f"unix:{sock_dir / 'm.sock'}", "--qmp", str(sock_dir / "busy.qmp")],
    ):
        proc = daemon("incoming", *args, *blocks)
        assert proc.wait() == 2, proc.stderr
        assert "error:" in proc.stderr
        assert look() == before, args
    assert not (sock_dir / "m.sock").exists()


def test_a_second_daemon_leaves_a_running_ones_sockets_alone(
    daemon: DaemonFactory, tmp_path: Path, sock_dir: Path
) -> None:
    qmp, migration = sock_dir / "q.sock", sock_dir / "m.sock"
    args = ["incoming", f"unix:{migration}", "--block", "a=4K", "--qmp", str(qmp)]
    first = daemon(*args, label="first")
    first.wait_for_path(qmp)
    first.wait_for_path(migration)
    identities = {p: p.stat().st_ino for p in (qmp, migration)}
    second = daemon(*args, label="second")
    assert second.wait() == 2
    assert second.stderr == (
        f"multifd incoming: error: listener: cannot listen on unix:{qmp}: "
        f"[Errno 98] address in use: another process listens on {qmp}\n"
    )
    third = daemon("incoming", f"unix:{migration}", "--block", "a=4K", label="third")
    assert third.wait() == 2
    assert f"address in use: another process listens on {migration}" in third.stderr
    assert {p: p.stat().st_ino for p in (qmp, migration)} == identities

    async def still_served() -> None:
        client = await connect_when_up(qmp, first)
        try:
            assert (await ask(client, "query-status"))["status"] == "inmigrate"
        finally:
            await hang_up(client)

    run(still_served())
    # Killed, it leaves both socket files behind: the next daemon takes them over.
    first.kill()
    assert qmp.exists() and migration.exists()
    fourth = daemon(*args, label="fourth")

    async def taken_over() -> None:
        client = await connect_when_up(qmp, fourth)
        try:
            assert await client.execute("quit") == {}
        finally:
            await hang_up(client)

    run(taken_over())
    assert fourth.wait() == 1  # quit before any source came
    assert f"waiting for a migration on unix:{migration}" in fourth.stderr


def test_the_daemon_shows_a_refused_connection(daemon: DaemonFactory, sock_dir: Path) -> None:
    """The library logs a refusal as a warning and has no handler of its own:
    the command shows it on stderr, as its own messages read."""
    path = sock_dir / "migration.sock"
    incoming = daemon("incoming", f"unix:{path}", "--block", "pc.ram=4M", label="dst")
    incoming.wait_for_path(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as junk:
        junk.settimeout(TIMEOUT)
        junk.connect(str(path))
        junk.sendall(b"junk")
        assert junk.recv(1) == b""  # refused: the warning is written before the close
    expected = (
        f"multifd incoming: warning: incoming connection #1 on unix:{path}: "
        "unknown channel magic 0x6a756e6b"
    )
    deadline = time.monotonic() + TIMEOUT
    while expected not in incoming.stderr:
        assert time.monotonic() < deadline, incoming.stderr
        time.sleep(0.02)
    assert incoming.stderr.count("warning:") == 1, incoming.stderr
    incoming.kill()
