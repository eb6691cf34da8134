"""Working with a real QEMU: snapshots of a running VM's migration, and helpers."""
