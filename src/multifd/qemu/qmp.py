"""A small synchronous QMP client, to drive a real QEMU from the commands.

Tests use `qemu.qmp`'s asyncio client; the `save` and `restore` commands only
need request/answer on one socket, which the standard library does well.
"""

from __future__ import annotations

import json
import socket
from types import TracebackType
from typing import Any

MAX_MESSAGE = 16 << 20


class QMPError(RuntimeError):
    """QEMU answered a command with an error: `error_class` and its description."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc} ({error_class})")
        self.error_class = error_class
        self.desc = desc


def _address(spec: str) -> tuple[int, Any]:
    """unix:PATH, tcp:HOST:PORT or a path; a ConnectionError names a bad one."""
    if spec.startswith("tcp:"):
        host, _, port = spec[4:].rpartition(":")
        if not (port.isdecimal() and int(port) <= 65535):
            raise ConnectionError(
                f"QMP {spec}: the port {port!r} is not a number from 0 to 65535 "
                "(give tcp:HOST:PORT, unix:PATH or a path)"
            )
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return family, (host, int(port))
    return socket.AF_UNIX, spec[5:] if spec.startswith("unix:") else spec


class QMPConnection:
    """One QMP session: greeting and capabilities negotiated on connect."""

    def __init__(self, address: str, timeout: float = 30.0) -> None:
        family, target = _address(address)
        self.address = address
        self._timeout = timeout
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(target)
        except OSError as exc:
            self._sock.close()
            raise ConnectionError(f"QMP {address}: cannot connect: {exc}") from None
        self._file = self._sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        try:
            greeting = self._read()
        except OSError:
            self.close()
            raise
        if "QMP" not in greeting:
            self.close()
            raise ConnectionError(f"QMP {address}: not a QMP greeting: {greeting!r}")
        self.greeting = greeting["QMP"]
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline(MAX_MESSAGE)
        except TimeoutError:
            raise TimeoutError(f"QMP {self.address}: no answer in {self._timeout:g} s") from None
        if not line:
            raise ConnectionError(f"QMP {self.address}: QEMU closed the connection")
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            # Something else listens there (or the line was longer than any QMP message).
            raise ConnectionError(
                f"QMP {self.address}: not a QMP peer: it sent {line[:80]!r}"
                + ("…" if len(line) > 80 else "")
            )
        return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        # A bare "[Errno 32] Broken pipe" does not say whose socket broke: a QEMU
        # that was killed or exited mid-command shows up here.
        try:
            self._sock.sendall(json.dumps(request).encode() + b"\n")
            while True:
                message = self._read()
                if "event" in message:
                    self.events.append(message)
                    continue
                if "error" in message:
                    error = message["error"]
                    raise QMPError(command, error.get("class", "?"), error.get("desc", "?"))
                return message.get("return")
        except TimeoutError as exc:
            raise TimeoutError(
                f"QEMU's QMP at {self.address} did not answer {command} within {self._timeout:g} s"
            ) from exc
        except OSError as exc:
            raise ConnectionError(
                f"QEMU's QMP connection at {self.address} closed during {command} "
                f"({exc.strerror or exc})"
            ) from exc

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> QMPConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
