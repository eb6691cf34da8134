"""Our own device sections: the application's state at switchover.

A QEMU device section's body has no length on the wire; ours start with one
(like a vmstate VBUFFER), so a Python destination reads them directly and a
vmdesc entry can describe them for any other reader.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from .errors import Where, WireError
from .reader import Reader
from .stream import MAX_DEVICE_STATE, SectionStart, VMDescription

APP_STATE_IDSTR = "multifd/app-state"
APP_STATE_VERSION = 1
_HEAD = struct.Struct(">QI")  # stop time (ns since the epoch), data length


@dataclass(frozen=True)
class AppState:
    """The workload's opaque state, and when the source stopped it.

    The stop time lets the destination measure downtime (stop → resume) on
    its own clock; both ends of a same-host migration share it.
    """

    data: bytes
    stop_time_ns: int = 0

    def body(self) -> bytes:
        return _HEAD.pack(self.stop_time_ns, len(self.data)) + self.data

    def header(self, section_id: int) -> SectionStart:
        return SectionStart(section_id, APP_STATE_IDSTR, 0, APP_STATE_VERSION, full=True)

    @classmethod
    def from_body(cls, body: bytes, where: Where | None = None) -> AppState:
        """Parse a section body, checking its length field: after an opaque QEMU
        device section, ours come split from the stream's tail, never read."""
        where = where or Where()
        if len(body) < _HEAD.size:
            raise WireError(
                f"truncated app-state header: needs {_HEAD.size} bytes, the section has "
                f"{len(body)}",
                where=where,
            )
        stop, length = _HEAD.unpack_from(body)
        if _HEAD.size + length != len(body):
            raise WireError.bad_field(
                "app-state length",
                length,
                f"{len(body) - _HEAD.size} (the bytes after its header)",
                where,
            )
        return cls(body[_HEAD.size :], stop)

    def vmdesc_entry(self) -> dict:
        return {
            "name": APP_STATE_IDSTR,
            "instance_id": 0,
            "vmsd_name": APP_STATE_IDSTR,
            "version": APP_STATE_VERSION,
            "fields": [
                {"name": "stop_time_ns", "type": "uint64", "size": 8},
                {"name": "size", "type": "uint32", "size": 4},
                {"name": "data", "type": "buffer", "size": len(self.data)},
            ],
        }


def read_app_state(reader: Reader) -> bytes:
    """A `DeviceReader` for the app-state section: returns its raw body."""
    head = reader.take(_HEAD.size, "app-state header")
    _, length = _HEAD.unpack(head)
    if length > MAX_DEVICE_STATE:
        raise WireError.bad_field(
            "app-state length", length, f"at most {MAX_DEVICE_STATE} bytes", reader.where
        )
    return head + reader.take(length, "app-state data")


def vmdescription(entries: list[dict]) -> VMDescription:
    """A vmdesc JSON as QEMU 7.2 writes it: page size and the devices sent."""
    return VMDescription(
        json.dumps({"page_size": 4096, "devices": entries}, separators=(",", ":")).encode()
    )
