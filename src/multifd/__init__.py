"""multifd: QEMU-compatible live migration of memory over parallel channels."""

__version__ = "0.1.0"

from .memory import RAMBlock  # noqa: E402 - the version above is read by the layers below
from .migration.destination import MigrationDestination  # noqa: E402
from .migration.source import MigrationSource  # noqa: E402
from .wire import WireError  # noqa: E402

__all__ = ["MigrationDestination", "MigrationSource", "RAMBlock", "WireError", "__version__"]
