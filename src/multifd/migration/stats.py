"""Counters behind `query-migrate`: per channel and for the whole RAM transfer."""

from __future__ import annotations

from dataclasses import dataclass

from ..wire import PACKET_HEADER_SIZE, TARGET_PAGE_SIZE


class MigrationAborted(Exception):
    """The migration stopped (a channel failed, or cancel): stop what you do now."""


@dataclass
class ChannelStats:
    """What one multifd channel did; kept after a failure, with its error."""

    id: int
    bytes: int = 0  # on the wire: compressed payloads as they went
    packets: int = 0
    sync_packets: int = 0
    pages: int = 0
    busy_ns: int = 0  # time in compression and socket calls
    error: str | None = None

    @property
    def counted_bytes(self) -> int:
        """This channel's share of multifd-bytes as QEMU 7.2 counts it: every
        packet's header and its pages before compression (multifd_send_pages
        adds pages * page size + packet_len). With compression that is more
        than `bytes`; the switchover's bandwidth is measured in the same unit as
        the remaining bytes it is divided into, as QEMU's is."""
        return self.packets * PACKET_HEADER_SIZE + self.pages * TARGET_PAGE_SIZE

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "bytes": self.bytes,
            "packets": self.packets,
            "sync-packets": self.sync_packets,
            "pages": self.pages,
            "busy-ms": self.busy_ns // 1_000_000,
            "error": self.error,
        }


@dataclass
class RamStats:
    """The `ram` member of query-migrate (QEMU's MigrationStats), counted as
    QEMU 7.2 counts it: `transferred` is RAM only (the records of the `ram`
    section on the main channel, and the multifd packets), not the stream
    header, the block list, device state or section headers."""

    total: int = 0  # bytes of every block
    remaining: int = 0  # dirty bytes still to send
    duplicate: int = 0  # zero pages sent as ZERO records
    normal: int = 0  # pages sent with their data
    dirty_sync_count: int = 0
    dirty_pages_rate: int = 0  # pages dirtied per second, over at least a second
    mbps: float = 0.0  # megabits per second, over the last rate window
    pages_per_second: int = 0  # pages sent per second, over the same window
    # RAM records on the main channel (page headers, zero pages, pages sent
    # there, an iteration's EOS) while the workload runs, and while it is
    # stopped; multifd packets count in neither, only in multifd-bytes.
    precopy_bytes: int = 0
    downtime_bytes: int = 0

    def to_json(self, multifd_bytes: int, *, completed: bool = False) -> dict:
        return {
            "transferred": self.precopy_bytes + self.downtime_bytes + multifd_bytes,
            # QEMU leaves both out (zero) once completed.
            "remaining": 0 if completed else self.remaining,
            "total": self.total,
            "duplicate": self.duplicate,
            "skipped": 0,
            "normal": self.normal,
            "normal-bytes": self.normal * 4096,
            "dirty-pages-rate": 0 if completed else self.dirty_pages_rate,
            "mbps": round(self.mbps, 3),
            "dirty-sync-count": self.dirty_sync_count,
            "postcopy-requests": 0,
            "page-size": 4096,
            "multifd-bytes": multifd_bytes,
            "pages-per-second": self.pages_per_second,
            "precopy-bytes": self.precopy_bytes,
            "downtime-bytes": self.downtime_bytes,
            "postcopy-bytes": 0,
            "dirty-sync-missed-zero-copy": 0,
        }
