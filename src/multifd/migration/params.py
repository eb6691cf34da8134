"""Migration capabilities and parameters by their QMP names, with QEMU's checks.

One table per kind says the type, default and accepted range of every name;
`MigrationSettings` keeps the current values and refuses bad ones with
messages in QEMU's words, before anything starts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..wire import PROFILES

# Every capability QEMU 7.2 knows, so QMP tooling can query and clear them.
QEMU_CAPABILITIES = (
    "xbzrle",
    "rdma-pin-all",
    "auto-converge",
    "zero-blocks",
    "compress",
    "events",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "block",
    "return-path",
    "pause-before-switchover",
    "multifd",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
)
# Ours, with QEMU's prefix for experimental names; query-migrate-capabilities
# lists them after QEMU's.
OWN_CAPABILITIES = ("x-verify",)
# The ones this implementation carries out; the rest may only be off.
SUPPORTED_CAPABILITIES = frozenset(
    {"multifd", "events", "auto-converge", "validate-uuid", "x-verify", "return-path"}
)

MAX_MIGRATE_DOWNTIME_MS = 2_000_000
SIZE_MAX = 2**64 - 1
MAX_THROTTLE = 128 << 20  # QEMU's default max-bandwidth, bytes per second
COMPRESSION_METHODS = ("none", "zlib", "zstd")
DIRTY_TRACKERS = ("auto", "kernel", "hash", "explicit")


class MigrationConfigError(ValueError):
    """A capability or parameter QEMU would refuse; `str()` is QEMU-like."""

    qmp_class = "GenericError"


@dataclass(frozen=True)
class ParameterSpec:
    kind: type
    default: Any
    low: int | None = None
    high: int | None = None
    unit: str = ""
    choices: tuple[str, ...] | None = None
    doc: str = ""


PARAMETERS: dict[str, ParameterSpec] = {
    "multifd-channels": ParameterSpec(int, 2, 1, 255, doc="multifd channels besides main"),
    "multifd-compression": ParameterSpec(str, "none", choices=COMPRESSION_METHODS),
    "multifd-zlib-level": ParameterSpec(int, 1, 0, 9),
    "multifd-zstd-level": ParameterSpec(int, 1, 0, 20),
    "max-bandwidth": ParameterSpec(int, MAX_THROTTLE, 0, SIZE_MAX, " bytes/second"),
    "downtime-limit": ParameterSpec(int, 300, 0, MAX_MIGRATE_DOWNTIME_MS, " milliseconds"),
    "cpu-throttle-initial": ParameterSpec(int, 20, 1, 99),
    "cpu-throttle-increment": ParameterSpec(int, 10, 1, 99),
    "max-cpu-throttle": ParameterSpec(int, 99, 1, 99),
    "throttle-trigger-threshold": ParameterSpec(int, 50, 1, 100),
    "tls-creds": ParameterSpec(str, ""),
    "tls-hostname": ParameterSpec(str, ""),
    "tls-authz": ParameterSpec(str, ""),
    # Ours, with QEMU's prefix for experimental names.
    "x-dirty-tracker": ParameterSpec(str, "auto", choices=DIRTY_TRACKERS),
    "x-stream-profile": ParameterSpec(str, "7.2", choices=tuple(PROFILES)),
    "x-io-timeout": ParameterSpec(int, 30, 0, 86_400, " seconds"),
}


def _check_value(name: str, value: Any) -> Any:
    spec = PARAMETERS[name]
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MigrationConfigError(f"Invalid parameter type for '{name}', expected: integer")
        if (spec.low is not None and value < spec.low) or (
            spec.high is not None and value > spec.high
        ):
            raise MigrationConfigError(
                f"Parameter '{name}' expects an integer in the range of {spec.low} to "
                f"{spec.high}{spec.unit}"
            )
        return value
    if not isinstance(value, str):
        raise MigrationConfigError(f"Invalid parameter type for '{name}', expected: string")
    if spec.choices is not None and value not in spec.choices:
        raise MigrationConfigError(
            f"Parameter '{name}' does not accept value '{value}' "
            f"(expected one of: {', '.join(spec.choices)})"
        )
    return value


def parse_parameter_text(name: str, text: str) -> Any:
    """A parameter value given on a command line (`--set downtime-limit=300`)."""
    if name not in PARAMETERS:
        raise MigrationConfigError(f"Parameter '{name}' is unexpected")
    if PARAMETERS[name].kind is int:
        try:
            return int(_scaled(text))
        except ValueError:
            raise MigrationConfigError(
                f"Parameter '{name}' expects an integer, got '{text}'"
            ) from None
    return text


def _scaled(text: str) -> int:
    """Integers with an optional size suffix (K, M, G, T: powers of 1024)."""
    suffixes = {"k": 10, "m": 20, "g": 30, "t": 40}
    text = text.strip()
    if text and text[-1].lower() in suffixes:
        return int(float(text[:-1]) * (1 << suffixes[text[-1].lower()]))
    return int(text, 0)


class MigrationSettings:
    """The current capabilities and parameters of one endpoint."""

    def __init__(
        self,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        self.capabilities: dict[str, bool] = dict.fromkeys(
            QEMU_CAPABILITIES + OWN_CAPABILITIES, False
        )
        self.parameters: dict[str, Any] = {n: s.default for n, s in PARAMETERS.items()}
        if capabilities:
            self.set_capabilities(capabilities)
        if parameters:
            self.set_parameters(parameters)

    def copy(self) -> MigrationSettings:
        return MigrationSettings(self.capabilities, self.parameters)

    def set_capabilities(self, states: Mapping[str, bool] | Iterable[Mapping[str, Any]]) -> None:
        """A mapping name → bool, or QMP's list of {"capability", "state"}."""
        if isinstance(states, Mapping):
            items = list(states.items())
        else:
            items = [(entry.get("capability"), entry.get("state")) for entry in states]
        for name, state in items:
            if name not in self.capabilities:
                raise MigrationConfigError(f"Parameter 'capability' does not accept value '{name}'")
            if not isinstance(state, bool):
                raise MigrationConfigError(
                    f"Invalid parameter type for 'state' of '{name}', expected: boolean"
                )
            if state and name not in SUPPORTED_CAPABILITIES:
                raise MigrationConfigError(
                    f"Capability '{name}' is not supported by this implementation "
                    f"(supported: {', '.join(sorted(SUPPORTED_CAPABILITIES))})"
                )
        for name, state in items:
            self.capabilities[name] = state

    def set_parameters(self, values: Mapping[str, Any]) -> None:
        checked = {}
        for name, value in values.items():
            if name not in PARAMETERS:
                raise MigrationConfigError(f"Parameter '{name}' is unexpected")
            checked[name] = _check_value(name, value)
        self.parameters.update(checked)

    def capability(self, name: str) -> bool:
        return self.capabilities[name]

    def parameter(self, name: str) -> Any:
        return self.parameters[name]

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": n, "state": s} for n, s in self.capabilities.items()]

    def query_parameters(self) -> dict[str, Any]:
        return dict(self.parameters)
