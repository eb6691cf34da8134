"""The errors the channels layer raises: transport failures, early end of stream,
timeouts and TLS refusals, each naming the channel it happened on."""

from __future__ import annotations


class ChannelError(OSError):
    """A transport failure on one channel: ``channel 3: write failed: [Errno 32] …``.

    `channel` is the channel's name ("main channel", "channel 3", "listener" …);
    `errno` is the OS error number when there is one.
    """

    def __init__(self, channel: str, message: str, *, errno: int | None = None) -> None:
        super().__init__(f"{channel}: {message}")
        self.channel = channel
        self.message = message
        self.errno = errno


class ChannelTimeoutError(ChannelError, TimeoutError):
    """No progress on a channel within its timeout (I/O, connect or handshake)."""


class TLSError(ChannelError):
    """A TLS handshake or authorization refused; the message says which check failed."""


class ChannelEOFError(EOFError):
    """The peer closed the stream before a read was complete.

    ``channel 2: peer closed the stream 1024 bytes short: got 3072 of 4096 bytes read
    at stream offset 0x1540`` (the offset is where that read started), and `note`
    in brackets when the channel knows why (an exec: command's exit status).
    The wire layer's `Reader` turns it into a `WireError` naming the field it was reading.
    """

    def __init__(
        self, channel: str, *, missing: int, wanted: int, offset: int, note: str = ""
    ) -> None:
        # `message` without the channel, as ChannelError has it, for callers
        # that put the channel's name in front themselves.
        self.message = (
            f"peer closed the stream {missing} bytes short: got "
            f"{wanted - missing} of {wanted} bytes read at stream offset {offset:#x}"
        ) + (f" ({note})" if note else "")
        super().__init__(f"{channel}: {self.message}")
        self.channel = channel
        self.missing = missing
        self.wanted = wanted
        self.offset = offset
        self.note = note


def os_error_text(exc: OSError) -> str:
    """``[Errno 111] Connection refused``, or the text of an error without a number."""
    return f"[Errno {exc.errno}] {exc.strerror}" if exc.strerror else str(exc)
