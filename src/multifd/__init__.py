"""multifd: QEMU-compatible live migration of memory over parallel channels."""

__version__ = "0.1.0"

from .memory import RAMBlock
from .migration.destination import MigrationDestination
from .migration.source import MigrationSource
from .wire import WireError

__all__ = ["MigrationDestination", "MigrationSource", "RAMBlock", "WireError", "__version__"]
