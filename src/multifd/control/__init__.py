"""The control plane: a QMP-compatible socket serving one migration endpoint, and the
`multifd incoming` / `multifd migrate` daemons built on it."""

from .commands import MigrationCommands, check_arguments
from .daemon import (
    DEFER,
    STOP_SIGNALS,
    Daemon,
    DaemonOptions,
    Role,
    Stoppable,
    StopRequest,
    stop_on_signals,
)
from .framing import DEFAULT_MAX_MESSAGE, FramingError, JsonSplitter
from .options import (
    BlockSpec,
    OptionError,
    open_blocks,
    parse_capability,
    parse_parameter,
    parse_size,
    parse_uuid,
)
from .protocol import QMPError, Session
from .server import QMPAddressError, QMPServer, parse_qmp_address

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "DEFER",
    "STOP_SIGNALS",
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
    "StopRequest",
    "Stoppable",
    "check_arguments",
    "open_blocks",
    "parse_capability",
    "parse_parameter",
    "parse_qmp_address",
    "parse_size",
    "parse_uuid",
    "stop_on_signals",
]
