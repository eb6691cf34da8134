"""Starting a real qemu-system-x86_64 for tests and benchmarks, and stopping it.

TCG only (KVM does not work on these machines); QMP on a unix socket; the
process is always reaped, killed if it does not quit.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .guest import TEST_END, disk_image
from .qmp import QMPConnection

QEMU = "qemu-system-x86_64"
START_TIMEOUT = 30.0


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


class QemuVM:
    """One QEMU process in `folder`: `qmp` is its QMP socket path."""

    def __init__(
        self,
        folder: Path,
        name: str,
        *,
        memory: str = "150M",
        machine: str = "pc",
        incoming: bool = False,
        guest: bool = True,
        guest_end: int = TEST_END,
        extra: tuple[str, ...] = (),
    ) -> None:
        binary = qemu_binary()
        if binary is None:
            raise FileNotFoundError(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
        self.folder = folder
        self.qmp = str(folder / f"{name}.qmp")
        self.serial = folder / f"{name}.serial"
        args = [
            binary,
            "-accel", "tcg",
            "-machine", machine,
            "-m", memory,
            "-nodefaults",
            "-display", "none",
            "-vga", "none",
            "-no-user-config",
            # Named threads (live_migration, multifdsend_0, ...): see `threads`.
            "-name", f"{name},debug-threads=on",
            "-serial", f"file:{self.serial}",
            "-qmp", f"unix:{self.qmp},server=on,wait=off",
        ]  # fmt: skip
        if guest:
            image = folder / f"guest-{guest_end:#x}.img"
            if not image.exists():
                image.write_bytes(disk_image(guest_end))
            args += ["-drive", f"file={image},format=raw,if=ide,snapshot=on"]
        if incoming:
            args += ["-incoming", "defer"]
        args += list(extra)
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self._wait_for_qmp()

    def _wait_for_qmp(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stdout = self.process.stdout
                output = stdout.read().decode(errors="replace") if stdout else ""
                raise RuntimeError(f"QEMU exited with {self.process.returncode}: {output.strip()}")
            if Path(self.qmp).exists():
                try:
                    QMPConnection(self.qmp, timeout=5).close()
                    return
                except (ConnectionError, OSError):
                    pass
            time.sleep(0.02)
        self.close()
        raise RuntimeError(f"QEMU did not open its QMP socket within {START_TIMEOUT:g} s")

    def connect(self) -> QMPConnection:
        return QMPConnection(self.qmp)

    def threads(self) -> list[str]:
        """Each QEMU thread as "name state: where", where it waits being the top
        of its kernel stack (root can read it): for a QEMU that stopped
        answering, whether a multifd thread is stuck in a socket write or on
        a futex tells whose side to look at."""
        found = []
        for task in sorted(Path(f"/proc/{self.process.pid}/task").glob("*")):
            try:
                name = (task / "comm").read_text().strip()
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:  # the thread ended meanwhile
                continue
            try:
                frames = [
                    line.split("] ", 1)[-1].split("+", 1)[0]
                    for line in (task / "stack").read_text().splitlines()[:3]
                ]
            except OSError:
                frames = []
            found.append(f"{name} {state}: {' < '.join(frames) or '?'}")
        return found

    def wait_for_serial(self, text: bytes, timeout: float = 30.0) -> None:
        """Wait until the guest has written `text` to its serial port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.serial.exists() and text in self.serial.read_bytes():
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.process.returncode}")
            time.sleep(0.05)
        raise TimeoutError(f"the guest wrote no {text!r} within {timeout:g} s")

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                with self.connect() as qmp:
                    qmp.execute("quit")
                self.process.wait(10)
            except (ConnectionError, OSError, subprocess.TimeoutExpired, RuntimeError):
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> QemuVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
