"""The QMP protocol of one client, without I/O: greeting, capabilities negotiation,
request checks in QEMU's words, and the shapes of answers and events."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from .framing import Frame, FramingError

log = logging.getLogger(__name__)


class QMPError(Exception):
    """A command refused: `error_class` is QMP's (GenericError, CommandNotFound…)."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_json(self) -> dict[str, Any]:
        return {"error": {"class": self.error_class, "desc": self.desc}}


class RequestError(QMPError):
    """A malformed request; the answer still carries its `id` when it had one."""

    def __init__(self, desc: str, request: dict[str, Any] | None = None) -> None:
        super().__init__(desc)
        self.has_id = request is not None and "id" in request
        self.id = request.get("id") if request is not None else None


class CommandHandler(Protocol):
    """What a session runs commands on (see `control.commands.MigrationCommands`)."""

    def execute(self, command: str, arguments: dict[str, Any]) -> Any: ...

    def version(self) -> dict[str, Any]: ...

    def attach(
        self, emit: Callable[[str, dict[str, Any] | None], None], on_quit: Callable[[], None]
    ) -> None: ...

    def detach(self) -> None: ...


class Mode(Enum):
    NEGOTIATION = "negotiation"  # only qmp_capabilities is accepted
    COMMAND = "command"


@dataclass(frozen=True)
class Request:
    command: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


def encode(message: dict[str, Any]) -> bytes:
    """One message on the wire: compact JSON and CRLF, as QEMU's monitor writes it."""
    return json.dumps(message).encode() + b"\r\n"


def greeting(version: dict[str, Any]) -> dict[str, Any]:
    """The first message: `version` as query-version answers it; no out-of-band
    capability is offered, so every command runs in order."""
    return {"QMP": {"version": version, "capabilities": []}}


def event(
    name: str, data: dict[str, Any] | None = None, now: float | None = None
) -> dict[str, Any]:
    """An event with QMP's timestamp (seconds and microseconds of the wall clock)."""
    stamp = time.time() if now is None else now
    seconds = int(stamp)
    message: dict[str, Any] = {
        "timestamp": {"seconds": seconds, "microseconds": int((stamp - seconds) * 1_000_000)},
        "event": name,
    }
    if data is not None:
        message["data"] = data
    return message


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def parse_request(frame: bytes) -> Request:
    """A request as QEMU's dispatcher checks it; the QMPError says what is wrong.
    `frame` is a JsonSplitter's: NaN and Infinity never get here, their capitals are
    stray bytes to QEMU's lexer as to ours."""
    try:
        obj = json.loads(frame, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise RequestError("JSON parse error, nesting too deep") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise RequestError(f"JSON parse error, {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError("QMP input must be a JSON object")
    for member, value in obj.items():
        if member == "execute":
            if not isinstance(value, str):
                raise RequestError("QMP input member 'execute' must be a string", obj)
        elif member == "arguments":
            if not isinstance(value, dict):
                raise RequestError("QMP input member 'arguments' must be an object", obj)
        elif member != "id":
            # `exec-oob` too: out-of-band execution was not offered.
            raise RequestError(f"QMP input member '{member}' is unexpected", obj)
    if "execute" not in obj:
        raise RequestError("QMP input lacks member 'execute'", obj)
    return Request(obj["execute"], obj.get("arguments", {}), obj.get("id"), "id" in obj)


class Session:
    """One client's QMP conversation; `handle` turns a frame into its answer."""

    def __init__(self) -> None:
        self.mode = Mode.NEGOTIATION

    @property
    def negotiated(self) -> bool:
        return self.mode is Mode.COMMAND

    def handle(self, frame: Frame, commands: CommandHandler) -> dict[str, Any]:
        if isinstance(frame, FramingError):
            return QMPError(frame.desc).to_json()
        try:
            request = parse_request(frame)
        except RequestError as exc:
            answer = exc.to_json()
            if exc.has_id:
                answer["id"] = exc.id
            return answer
        try:
            answer = {"return": self._run(request, commands)}
        except QMPError as exc:
            answer = exc.to_json()
        except Exception as exc:
            # A bug in a command must cost this answer, never the connection.
            log.exception("QMP command %s failed", request.command)
            answer = QMPError(f"internal error: {type(exc).__name__}: {exc}").to_json()
        if request.has_id:
            answer["id"] = request.id
        return answer

    def _run(self, request: Request, commands: CommandHandler) -> Any:
        if request.command == "qmp_capabilities":
            if self.mode is Mode.COMMAND:
                raise QMPError(
                    "Capabilities negotiation is already complete, command ignored",
                    "CommandNotFound",
                )
            _check_negotiation(request.arguments)
            self.mode = Mode.COMMAND
            return {}
        if self.mode is Mode.NEGOTIATION:
            raise QMPError(
                "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound"
            )
        return commands.execute(request.command, request.arguments)


def _check_negotiation(arguments: dict[str, Any]) -> None:
    for name, value in arguments.items():
        if name != "enable":
            raise QMPError(f"Parameter '{name}' is unexpected")
        if not isinstance(value, list):
            raise QMPError("Invalid parameter type for 'enable', expected: array")
        for capability in value:
            if capability == "oob":
                raise QMPError("Capability 'oob' not available")
            raise QMPError(f"Parameter 'enable' does not accept value '{capability}'")
