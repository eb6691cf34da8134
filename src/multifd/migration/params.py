"""Migration capabilities and parameters by their QMP names, with QEMU's checks.

One table per kind says the type, default and accepted range of every name
(every one QEMU 7.2 has, plus ours); `MigrationSettings` keeps the current
values and refuses bad ones with messages in QEMU's words. Which parameters a
running migration reads as it goes, and which only at its start, is said here
too: the first may change during a migration, the second may not.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..wire import PROFILES, TARGET_PAGE_SIZE
from .bitmap_mapping import bitmap_mapping_problem

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
UINT32_MAX = 2**32 - 1
MAX_THROTTLE = 128 << 20  # QEMU's default max-bandwidth, bytes per second
COMPRESSION_METHODS = ("none", "zlib", "zstd")
# How a command line says a capability's or a boolean parameter's state.
SWITCH_WORDS = {"on": True, "off": False, "true": True, "false": False, "yes": True, "no": False}
DIRTY_TRACKERS = ("auto", "kernel", "hash", "explicit")


class MigrationConfigError(ValueError):
    """A capability or parameter QEMU would refuse; `str()` is QEMU-like."""

    qmp_class = "GenericError"


@dataclass(frozen=True)
class ParameterSpec:
    kind: type  # int, str, bool, or list (block-bitmap-mapping)
    default: Any
    low: int | None = None
    high: int | None = None
    unit: str = ""
    choices: tuple[str, ...] | None = None
    doc: str = ""
    # QEMU's StrOrNull: JSON null stands for "".
    nullable: bool = False
    power_of_two: bool = False


# In the order of QEMU 7.2's MigrationParameters, which query-migrate-parameters
# keeps; ours after them.
PARAMETERS: dict[str, ParameterSpec] = {
    "announce-initial": ParameterSpec(int, 50, 0, 100_000, " milliseconds"),
    "announce-max": ParameterSpec(int, 550, 0, 100_000, " milliseconds"),
    "announce-rounds": ParameterSpec(int, 5, 0, 1000),
    "announce-step": ParameterSpec(int, 100, 1, 10_000, " milliseconds"),
    "compress-level": ParameterSpec(int, 1, 0, 9),
    "compress-threads": ParameterSpec(int, 8, 1, 255),
    "compress-wait-thread": ParameterSpec(bool, True),
    "decompress-threads": ParameterSpec(int, 2, 1, 255),
    "throttle-trigger-threshold": ParameterSpec(int, 50, 1, 100),
    "cpu-throttle-initial": ParameterSpec(int, 20, 1, 99),
    "cpu-throttle-increment": ParameterSpec(int, 10, 1, 99),
    "cpu-throttle-tailslow": ParameterSpec(bool, False),
    "tls-creds": ParameterSpec(str, "", nullable=True),
    "tls-hostname": ParameterSpec(str, "", nullable=True),
    "tls-authz": ParameterSpec(str, "", nullable=True),
    "max-bandwidth": ParameterSpec(int, MAX_THROTTLE, 0, SIZE_MAX, " bytes/second"),
    "downtime-limit": ParameterSpec(int, 300, 0, MAX_MIGRATE_DOWNTIME_MS, " milliseconds"),
    "x-checkpoint-delay": ParameterSpec(int, 20_000, 0, UINT32_MAX, " milliseconds"),
    "block-incremental": ParameterSpec(bool, False),
    "multifd-channels": ParameterSpec(int, 2, 1, 255, doc="multifd channels besides main"),
    "xbzrle-cache-size": ParameterSpec(
        int, 64 << 20, TARGET_PAGE_SIZE, SIZE_MAX, " bytes", power_of_two=True
    ),
    "max-postcopy-bandwidth": ParameterSpec(int, 0, 0, SIZE_MAX, " bytes/second"),
    "max-cpu-throttle": ParameterSpec(int, 99, 1, 99),
    "multifd-compression": ParameterSpec(str, "none", choices=COMPRESSION_METHODS),
    "multifd-zlib-level": ParameterSpec(int, 1, 0, 9),
    "multifd-zstd-level": ParameterSpec(int, 1, 0, 20),
    # None until set: QEMU lists it only then.
    "block-bitmap-mapping": ParameterSpec(list, None),
    # Ours, with QEMU's prefix for experimental names.
    "x-dirty-tracker": ParameterSpec(str, "auto", choices=DIRTY_TRACKERS),
    "x-stream-profile": ParameterSpec(str, "7.2", choices=tuple(PROFILES)),
    "x-io-timeout": ParameterSpec(int, 30, 0, 86_400, " seconds"),
}

# Stored and reported as QEMU does with their feature off, and read by nothing:
# they tune features this implementation does not have (announcing the moved
# VM, compress threads, xbzrle, postcopy, block migration, COLO).
INERT_PARAMETERS = frozenset(
    {
        "announce-initial",
        "announce-max",
        "announce-rounds",
        "announce-step",
        "compress-level",
        "compress-threads",
        "compress-wait-thread",
        "decompress-threads",
        "xbzrle-cache-size",
        "max-postcopy-bandwidth",
        "block-incremental",
        "block-bitmap-mapping",
        "x-checkpoint-delay",
    }
)

# What each side reads once, when a migration starts. A running migration
# could not follow a change (QEMU 7.2 takes a new multifd-channels and then
# aborts), so while one runs they may only be set to their current value; the
# others are read as the migration goes (max-bandwidth, downtime-limit, the
# auto-converge ones) or not at all.
SOURCE_SETUP_PARAMETERS = frozenset(
    {
        "multifd-channels",
        "multifd-compression",
        "multifd-zlib-level",
        "multifd-zstd-level",
        "tls-creds",
        "tls-hostname",
        "tls-authz",
        "x-dirty-tracker",
        "x-stream-profile",
        "x-io-timeout",
    }
)
DESTINATION_SETUP_PARAMETERS = frozenset(
    {
        "multifd-channels",
        "multifd-compression",
        "tls-creds",
        "tls-hostname",
        "tls-authz",
        "x-stream-profile",
        "x-io-timeout",
    }
)


def check_parameter(name: str, value: Any) -> Any:
    """`value` if migrate-set-parameters would take it for `name` (a known
    parameter), else MigrationConfigError with QEMU's words."""
    spec = PARAMETERS[name]
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MigrationConfigError(f"Invalid parameter type for '{name}', expected: integer")
        if spec.power_of_two and (value < spec.low or value & (value - 1)):
            raise MigrationConfigError(
                f"Parameter '{name}' expects a power of two no less than the target page size"
            )
        if (spec.low is not None and value < spec.low) or (
            spec.high is not None and value > spec.high
        ):
            raise MigrationConfigError(
                f"Parameter '{name}' expects an integer in the range of {spec.low} to "
                f"{spec.high}{spec.unit}"
            )
        return value
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise MigrationConfigError(f"Invalid parameter type for '{name}', expected: boolean")
        return value
    if spec.kind is list:
        problem = bitmap_mapping_problem(name, value)
        if problem is not None:
            raise MigrationConfigError(problem)
        return value
    if value is None and spec.nullable:
        return ""
    if not isinstance(value, str):
        expected = "StrOrNull" if spec.nullable else "string"
        raise MigrationConfigError(f"Invalid parameter type for '{name}', expected: {expected}")
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
    kind = PARAMETERS[name].kind
    if kind is int:
        try:
            return int(_scaled(text))
        except ValueError:
            raise MigrationConfigError(
                f"Parameter '{name}' expects an integer, got '{text}'"
            ) from None
    if kind is bool:
        if text.lower() not in SWITCH_WORDS:
            raise MigrationConfigError(f"Parameter '{name}' expects on or off, got '{text}'")
        return SWITCH_WORDS[text.lower()]
    if kind is list:
        try:
            return json.loads(text)
        except ValueError:
            raise MigrationConfigError(f"Parameter '{name}' expects JSON, got '{text}'") from None
    return text


def _scaled(text: str) -> int:
    """Integers with an optional size suffix (K, M, G, T: powers of 1024)."""
    suffixes = {"k": 10, "m": 20, "g": 30, "t": 40}
    text = text.strip()
    if text and text[-1].lower() in suffixes:
        return int(float(text[:-1]) * (1 << suffixes[text[-1].lower()]))
    return int(text, 0)


class MigrationSettings:
    """The current capabilities and parameters of one endpoint.

    A running migration reads some parameters as it goes while QMP's thread
    sets them: a lock makes each request all-or-nothing to every reader."""

    def __init__(
        self,
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, Any] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self.capabilities: dict[str, bool] = dict.fromkeys(
            QEMU_CAPABILITIES + OWN_CAPABILITIES, False
        )
        self._parameters: dict[str, Any] = {n: s.default for n, s in PARAMETERS.items()}
        if capabilities:
            self.set_capabilities(capabilities)
        if parameters:
            self.set_parameters(parameters)

    def copy(self) -> MigrationSettings:
        with self._lock:
            parameters = dict(self._parameters)
        copied = MigrationSettings(self.capabilities)
        copied._parameters = parameters
        return copied

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

    def set_parameters(self, values: Mapping[str, Any], fixed: Collection[str] = ()) -> None:
        """Check every value, then set them all; `fixed` names the parameters a
        running migration has already read, which may only keep their value."""
        checked = {}
        for name, value in values.items():
            if name not in PARAMETERS:
                raise MigrationConfigError(f"Parameter '{name}' is unexpected")
            checked[name] = check_parameter(name, value)
        with self._lock:
            merged = {**self._parameters, **checked}
            # QEMU checks the merged parameters, every one of them, at every
            # set: a floor raised above the ceiling is refused as the ceiling
            # set below the floor is (in the ceiling's words either way).
            if merged["max-cpu-throttle"] < merged["cpu-throttle-initial"]:
                raise MigrationConfigError(
                    "Parameter 'max-cpu-throttle' expects an integer in the range of "
                    "cpu-throttle-initial to 99"
                )
            for name in checked:
                if name in fixed and checked[name] != self._parameters[name]:
                    raise MigrationConfigError(
                        f"Parameter '{name}' cannot be changed while a migration is in "
                        "progress: it takes effect only between migrations"
                    )
            self._parameters = merged

    def capability(self, name: str) -> bool:
        return self.capabilities[name]

    def parameter(self, name: str) -> Any:
        with self._lock:
            return self._parameters[name]

    def query_capabilities(self) -> list[dict[str, Any]]:
        return [{"capability": n, "state": s} for n, s in self.capabilities.items()]

    def query_parameters(self) -> dict[str, Any]:
        with self._lock:
            return {n: v for n, v in self._parameters.items() if v is not None}
