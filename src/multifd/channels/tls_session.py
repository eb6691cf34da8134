"""One TLS session that a reading thread and a writing thread share (the main
channel with return-path): every OpenSSL call on it runs alone, none waits under a lock."""

from __future__ import annotations

import select
import ssl
import threading
from typing import Any

# What pending_alert reads past before it gives up: an alert follows at most the
# data the peer had sent before it refused us.
_ALERT_READ_SIZE = 16 * 1024
_ALERT_READS = 64


class TLSSession:
    """The I/O of an established `ssl.SSLSocket`, safe from two threads at once.

    OpenSSL supports one call at a time on an SSL object, and CPython releases
    the GIL inside SSL_read and SSL_write; with `return-path` the main channel
    is read by one thread while another writes it. Concurrent calls share the
    session's state (its want-read/want-write flag, its handshake state while a
    TLS 1.3 session ticket is processed), and may fail, or wait for the wrong
    event. So the socket is non-blocking: each SSL call runs under a lock and
    returns at once, and the wait for the socket (poll) happens after the lock
    is released. A reader waiting for the peer never holds up a writer.

    A poll can only miss its event if another call took the bytes it waits for
    off the socket: a write reads only to renegotiate, which both contexts
    refuse (`OP_NO_RENEGOTIATION`, see tls.py), so only reads consume input.

    The socket must have finished its handshake; `timeout` bounds each wait
    for the socket (None waits forever), as a socket timeout would.
    """

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self.timeout: float | None = None
        sock.setblocking(False)

    def recv_into(self, view: memoryview) -> int:
        """Read at least one byte into `view` (0 at the end of the stream); raises
        `TimeoutError` when the socket stayed silent for `timeout`."""
        while True:
            with self._lock:
                try:
                    return self._sock.recv_into(view, len(view))
                except ssl.SSLWantReadError:
                    event = select.POLLIN
                except ssl.SSLWantWriteError:  # a TLS alert or key update to send first
                    event = select.POLLOUT
            self._wait(event)

    def send(self, view: memoryview) -> int:
        """Write `view` whole (OpenSSL writes no partial records here); raises
        `TimeoutError` when the socket took nothing for `timeout`."""
        while True:
            with self._lock:
                try:
                    # A retry after WANT_WRITE passes the same buffer, as SSL_write
                    # requires: the records it had already sent are not repeated.
                    return self._sock.send(view)
                except ssl.SSLWantWriteError:
                    event = select.POLLOUT
                except ssl.SSLWantReadError:
                    event = select.POLLIN
            self._wait(event)

    @property
    def server_side(self) -> bool:
        return self._sock.server_side

    def pending_alert(self) -> ssl.SSLError | None:
        """The alert the peer sent before it hung up, if it is already here: reads
        what has arrived (application data is dropped, the session has failed)
        without waiting, `_ALERT_READS` reads at most. Under TLS 1.3 a client's
        handshake ends before the server has checked the client's certificate,
        so a refusal comes back as an alert that only a read reports."""
        scratch = bytearray(_ALERT_READ_SIZE)
        with self._lock:
            for _ in range(_ALERT_READS):
                try:
                    if not self._sock.recv_into(scratch):
                        return None
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, ssl.SSLEOFError):
                    return None
                except ssl.SSLError as exc:
                    return exc if exc.reason else None
                except OSError:
                    return None
        return None

    def getpeercert(self) -> Any:
        with self._lock:
            return self._sock.getpeercert()

    def _wait(self, event: int) -> None:
        poller = select.poll()
        poller.register(self._sock.fileno(), event)
        timeout_ms = None if self.timeout is None else self.timeout * 1000
        # Readiness, an error or a hang-up (a shutdown() from another thread) all
        # end the wait: the next SSL call reports which.
        if not poller.poll(timeout_ms):
            raise TimeoutError
