"""The return path at each end of the main channel (capability `return-path`).

The source runs a thread that reads the destination's messages (PONG, SHUT)
and keeps its verdict; the destination answers PINGs and sends SHUT once, when
it has resumed (0) or failed (1, with our reason message after it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..channels import Channel, ChannelError, ChannelTimeoutError
from ..wire import Pong, ReturnPathDecoder, Shut, ShutReason, Where, WireError
from ..wire.return_path import RETURN_PATH

SHUT_OK = 0
SHUT_FAILED = 1
READ_CHUNK = 4096
# A destination that closes before its first PONG gave up on what precedes the
# PING: the file header or the configuration (a QEMU 7.2 destination exits
# then, with no SHUT; its own log has the reason).
BEFORE_PONG = (
    "; it had not answered our PING: it refused the stream's header or configuration "
    "(a QEMU destination checks the machine type, the capabilities it lists and, "
    "with validate-uuid, the UUID)"
)
# A destination that reads nothing never answers the PING sent with the header.
NO_PONG = (
    "; the destination has not answered our PING on the return path: it has not "
    "begun to read the main channel (a QEMU destination begins only once all its "
    "multifd channels are connected: are its multifd capability and "
    "multifd-channels the same as ours?)"
)


class ReturnPathReader:
    """The source's side: one thread reading the destination's messages.

    A verdict that is not "loaded" (SHUT nonzero, the return path closed
    without SHUT, a bad message) goes to `on_failure` at once, so a migration
    the destination has given up on stops instead of sending on.
    """

    def __init__(self, channel: Channel, on_failure: Callable[[str], None]) -> None:
        self._channel = channel
        self._on_failure: Callable[[str], None] | None = on_failure
        self._decoder = ReturnPathDecoder()
        self._done = threading.Event()
        self._stopping = threading.Event()
        self.pongs: list[int] = []
        self.shut: int | None = None
        self.reason: str | None = None
        self._failure: str | None = None
        self._thread: threading.Thread | None = threading.Thread(
            target=self._run, name="return-path", daemon=True
        )

    def start(self) -> None:
        assert self._thread is not None
        self._thread.start()

    def wait(self, timeout: float | None) -> bool:
        """Until the destination's verdict is known; False if `timeout` passed first."""
        return self._done.wait(timeout)

    def verdict(self) -> str | None:
        """Why the destination did not load the migration, or None if it did
        (SHUT 0) or has not said yet."""
        if self.shut is not None and self.shut != SHUT_OK:
            because = f": {self.reason}" if self.reason else ""
            return f"the destination reported failure (SHUT {self.shut}){because}"
        return self._failure

    def silent(self) -> bool:
        """The destination has said nothing at all: no PONG, no SHUT, and the
        return path has not broken either."""
        return not self.pongs and self.shut is None and self._failure is None

    def info(self) -> dict[str, Any]:
        """What the destination said so far, for query-migrate."""
        return {"pongs": list(self.pongs), "shut": self.shut}

    def close(self) -> None:
        """Join the thread; the caller first shuts the channel down if it may
        still be blocked reading. Failures seen from now on are the consequence
        of ending, not news from the destination."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        # Drops the reference back to the migration, so that it is freed by
        # reference counting alone once its owner lets go.
        self._thread = None
        self._on_failure = None

    def _run(self) -> None:
        try:
            self._read()
        except WireError as exc:
            self._failure = f"bad return path message from the destination: {exc}"
        except ChannelError as exc:
            if self.shut is None:
                self._failure = f"the return path from the destination broke: {exc}"
                if not self.pongs:
                    self._failure += BEFORE_PONG
        finally:
            self._done.set()
            verdict = self.verdict()
            on_failure = self._on_failure
            if verdict is not None and on_failure is not None and not self._stopping.is_set():
                on_failure(verdict)

    def _read(self) -> None:
        buffer = bytearray(READ_CHUNK)
        while True:
            try:
                n = self._channel.read_some_into(buffer)
            except ChannelTimeoutError:
                # The destination says nothing while it loads: silence is not an
                # error here. The source bounds its wait for SHUT itself.
                if self._stopping.is_set() or self.shut is not None:
                    return
                continue
            if n == 0:
                if self.shut is None:
                    self._failure = (
                        "the destination closed the return path without reporting its "
                        "result (no SHUT)"
                    )
                    if not self.pongs:
                        self._failure += BEFORE_PONG
                return
            self._decoder.feed(memoryview(buffer)[:n])
            while True:
                at = self._decoder.offset
                message = self._decoder.next_message()
                if message is None:
                    break
                if isinstance(message, Pong):
                    self.pongs.append(message.value)
                elif isinstance(message, Shut):
                    self.shut = message.status
                    # As QEMU's source: SHUT ends the return path. Our destination
                    # writes a failure's reason with its SHUT: read it if it came.
                    if message.status == SHUT_OK or not self._decoder.pending:
                        return
                elif isinstance(message, ShutReason):
                    if self.shut is None:
                        raise WireError(
                            "X_SHUT_REASON before SHUT",
                            where=Where(section=RETURN_PATH, offset=at),
                        )
                    self.reason = message.text
                    return


class ReturnPathWriter:
    """The destination's side: PONGs, and one SHUT."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        # PONGs come from the migration thread, a failure's SHUT from any thread.
        self._lock = threading.Lock()
        self._shut_sent = False

    def pong(self, value: int) -> None:
        with self._lock:
            self._channel.write_all(Pong(value).pack())

    def shut(self, status: int, reason: str | None = None) -> bool:
        """Send SHUT(status), and the reason after a failure's. Best effort: a
        source that is gone cannot hear it. Only the first call sends."""
        with self._lock:
            return self._send_shut(status, reason)

    def shut_now(self, status: int, reason: str | None = None) -> bool:
        """`shut`, but only if it need not wait: not while a PONG is being
        written, nor into a socket with no room (a source that does not read
        its return path could hold either for x-io-timeout)."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if not self._channel.writable():
                return False
            return self._send_shut(status, reason)
        finally:
            self._lock.release()

    def _send_shut(self, status: int, reason: str | None) -> bool:
        if self._shut_sent:
            return False
        self._shut_sent = True
        message = Shut(status).pack()
        if status != SHUT_OK and reason:
            message += ShutReason(reason).pack()
        try:
            # One write: the reason arrives with the SHUT it explains.
            self._channel.write_all(message)
        except (ChannelError, OSError):
            return False
        return True
