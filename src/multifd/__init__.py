"""multifd: QEMU-compatible live migration of memory over parallel channels."""

import logging

__version__ = "0.1.0"

from .memory import RAMBlock
from .migration.destination import MigrationDestination
from .migration.source import MigrationSource
from .wire import WireError

# A library logs; the application decides where that goes. Without a handler of
# ours, Python's last-resort handler would print our warnings (a refused
# incoming connection) on the stderr of every program that imports us.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["MigrationDestination", "MigrationSource", "RAMBlock", "WireError", "__version__"]
