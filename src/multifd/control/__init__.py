"""The control plane: a QMP-compatible socket serving one migration endpoint, and the
`multifd incoming` / `multifd migrate` daemons built on it."""

from .commands import MigrationCommands, check_arguments
from .daemon import DEFER, Daemon, DaemonOptions, Role, stop_on_signals
from .framing import DEFAULT_MAX_MESSAGE, FramingError, JsonSplitter
from .options import (
    BlockSpec,
    OptionError,
    open_blocks,
    parse_capability,
    parse_parameter,
    parse_size,
)
from .protocol import QMPError, Session
from .server import QMPAddressError, QMPServer, parse_qmp_address

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "DEFER",
    "BlockSpec",
    "Daemon",
    "DaemonOptions",
    "FramingError",
    "JsonSplitter",
    "MigrationCommands",
    "OptionError",
    "QMPAddressError",
    "QMPError",
    "QMPServer",
    "Role",
    "Session",
    "check_arguments",
    "open_blocks",
    "parse_capability",
    "parse_parameter",
    "parse_qmp_address",
    "parse_size",
    "stop_on_signals",
]
