"""multifd: QEMU-compatible live migration of memory over parallel channels."""

__version__ = "0.1.0"
