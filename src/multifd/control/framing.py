"""Splitting a QMP byte stream into JSON messages, with no I/O and bounded memory:
a message ends where its outermost brace closes, as in QEMU's JSON streamer."""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MAX_MESSAGE = 1 << 20  # bytes; QMP commands are a few hundred
MAX_NESTING = 1024  # QEMU's json-streamer refuses deeper input too

# What the scanner looks for in each state; everything else is skipped in C.
_NON_SPACE = re.compile(rb"[^ \t\r\n]")
_STRUCTURE = re.compile(rb'[{}\[\]"]')
_STRING_END = re.compile(rb'[\\"]')
_BARE_END = re.compile(rb'[ \t\r\n{}\[\]"]')


@dataclass(frozen=True)
class FramingError:
    """A message that could not be taken whole; `desc` says why (for a QMP error)."""

    desc: str


Frame = bytes | FramingError


class JsonSplitter:
    """Feed it bytes as they arrive; it returns every complete top-level JSON value.

    A value larger than `max_message` bytes, or nested deeper than MAX_NESTING,
    is not kept: it is scanned to its end and reported as one `FramingError`,
    so one bad message never costs more than `max_message` bytes of memory and
    the next message is read normally.
    """

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buffer = bytearray()
        self._active = False  # inside a message
        self._size = 0  # bytes of the current message in earlier chunks, kept or not
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare = False  # inside a top-level number or keyword
        self._too_deep = False

    @property
    def pending(self) -> bool:
        """True when part of a message has been fed and its end not yet."""
        return self._active

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        start = i = 0  # start: where the current message begins in `data`
        end = len(data)
        while i < end:
            if not self._active:
                match = _NON_SPACE.search(data, i)
                if match is None:
                    return frames
                start = i = match.start()
                self._active = True
                first = data[i]
                if first == 0x22:  # quote
                    self._in_string = True
                    i += 1
                elif first in b"{[":
                    self._depth = 1
                    i += 1
                elif first in b"}]":
                    frames.append(self._finish(data, start, i + 1))
                    i += 1
                else:
                    self._bare = True
            elif self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                match = _STRING_END.search(data, i)
                if match is None:
                    break
                i = match.end()
                if data[match.start()] == 0x5C:  # backslash
                    self._escape = True
                else:
                    self._in_string = False
                    if self._depth == 0:
                        frames.append(self._finish(data, start, i))
            elif self._bare:
                match = _BARE_END.search(data, i)
                if match is None:
                    break
                # The delimiter belongs to the next message.
                i = match.start()
                frames.append(self._finish(data, start, i))
            else:
                match = _STRUCTURE.search(data, i)
                if match is None:
                    break
                i = match.end()
                byte = data[match.start()]
                if byte == 0x22:
                    self._in_string = True
                elif byte in b"{[":
                    self._depth += 1
                    self._too_deep |= self._depth > MAX_NESTING
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        frames.append(self._finish(data, start, i))
        if self._active:
            self._keep(data[start:])
            self._size += end - start
        return frames

    def _keep(self, chunk: bytes) -> None:
        # Past the cap only the count grows; the bytes are dropped.
        room = self.max_message - len(self._buffer)
        if room > 0:
            self._buffer += chunk[:room]

    def _finish(self, data: bytes, start: int, end: int) -> Frame:
        self._keep(data[start:end])
        size, too_deep = self._size + end - start, self._too_deep
        message = bytes(self._buffer)
        self._buffer.clear()
        self._active = self._in_string = self._escape = self._bare = self._too_deep = False
        self._size = self._depth = 0
        if size > self.max_message:
            return FramingError(
                f"JSON parse error, message of {size} bytes exceeds the limit of "
                f"{self.max_message} bytes"
            )
        if too_deep:
            return FramingError(f"JSON parse error, nesting deeper than {MAX_NESTING} levels")
        return message
