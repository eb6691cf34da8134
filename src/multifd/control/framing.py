"""Splitting a QMP byte stream into JSON messages, with no I/O and bounded memory:
the tokens, lexical errors and resets of QEMU's json-lexer, and its json-streamer's rule
that a message ends where its outermost brace or bracket closes."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

DEFAULT_MAX_MESSAGE = 1 << 20  # bytes; QMP commands are a few hundred
MAX_NESTING = 1024  # QEMU's json-streamer refuses deeper input too


class _State(Enum):
    START = "start"  # between tokens
    STRING = "string"  # `_quote` says which quote closes it
    STRING_ESCAPE = "string-escape"  # after a backslash
    KEYWORD = "keyword"  # [a-z]+, as QEMU: its parser tells `true` from nonsense
    # A number, in RFC 8259's grammar.
    SIGN = "sign"
    ZERO = "zero"
    INT = "int"
    POINT = "point"
    FRACTION = "fraction"
    EXP_MARK = "exp-mark"
    EXP_SIGN = "exp-sign"
    EXPONENT = "exponent"
    RECOVERY = "recovery"  # after a lexical error, skipping to where tokens may start again


_DIGITS = b"0123456789"
# Each number state's moves, and whether a number may end there: any other byte then
# ends the number (and is looked at again) or is a lexical error. None marks a byte
# that is an error although the number could end: "01" is not 0 followed by 1.
_NUMBER: dict[_State, tuple[dict[int, _State | None], bool]] = {
    _State.SIGN: ({ord("0"): _State.ZERO} | dict.fromkeys(b"123456789", _State.INT), False),
    _State.ZERO: ({ord("."): _State.POINT} | dict.fromkeys(_DIGITS, None), True),
    _State.INT: (
        {ord("."): _State.POINT}
        | dict.fromkeys(_DIGITS, _State.INT)
        | dict.fromkeys(b"eE", _State.EXP_MARK),
        True,
    ),
    _State.POINT: (dict.fromkeys(_DIGITS, _State.FRACTION), False),
    _State.FRACTION: (
        dict.fromkeys(_DIGITS, _State.FRACTION) | dict.fromkeys(b"eE", _State.EXP_MARK),
        True,
    ),
    _State.EXP_MARK: (
        dict.fromkeys(_DIGITS, _State.EXPONENT) | dict.fromkeys(b"+-", _State.EXP_SIGN),
        False,
    ),
    _State.EXP_SIGN: (dict.fromkeys(_DIGITS, _State.EXPONENT), False),
    _State.EXPONENT: (dict.fromkeys(_DIGITS, _State.EXPONENT), True),
}
# States that loop on digits: a regular expression skips their runs in C.
_DIGIT_RUNS = frozenset({_State.INT, _State.FRACTION, _State.EXPONENT})

_NON_WHITESPACE = re.compile(rb"[^ \t\r\n]")
_NON_DIGIT = re.compile(rb"[^0-9]")
_NON_LETTER = re.compile(rb"[^a-z]")
# Inside a string: an escape, the closing quote, or a byte QEMU refuses there
# (a control character, or 0xFE and 0xFF, which UTF-8 never holds).
_STRING_STOP = {
    quote: re.compile(rb"[\\" + bytes([quote]) + rb"\x00-\x1f\xfe\xff]") for quote in b"\"'"
}
# Where QEMU's lexer takes up tokens again after an error: a structural character, or
# a byte no JSON text holds outside a string (a control character other than tab, 0xFE,
# 0xFF). The QMP spec tells a client to send one of the latter to reset a parser it
# left with half a message; that byte is itself the lexical error which ends it.
_RESYNC = re.compile(rb"[\x00-\x08\x0a-\x1f\xfe\xff\[\]{}:,]")
# Inside a message, a run of tokens that cannot end it and need no respelling: taken
# in C, where the states would take them one by one. A keyword or number counts only
# once the byte after it shows that it is whole.
_PLAIN_TOKENS = re.compile(
    rb"(?:[ \t\r\n,:]"
    rb'|"(?:[^"\\\x00-\x1f\xfe\xff]|\\[\x20-\x26\x28-\xfd])*"'
    rb"|(?:[a-z]+|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)(?=[ \t\r\n,:\]}])"
    rb")+"
)
_STRING_PART = re.compile(rb'\\.|"', re.DOTALL)


@dataclass(frozen=True)
class FramingError:
    """Input that is no message: a lexical error, or a message refused whole (too big,
    too deep); `desc` says which, in QEMU's words where QEMU has them."""

    desc: str


Frame = bytes | FramingError


def _respell(part: re.Match[bytes]) -> bytes:
    text = part.group()
    if text == b"\\'":
        return b"'"
    if text == b'"':
        return b'\\"'
    return text


def _as_json_string(token: bytes) -> bytes:
    """A string token spelt as JSON: QEMU's lexer also takes 'single-quoted' strings,
    which may hold bare double quotes, and a \\' escape in strings of either kind."""
    return b'"' + _STRING_PART.sub(_respell, token[1:-1]) + b'"'


class JsonSplitter:
    """Feed it bytes as they arrive; it returns every complete top-level JSON value,
    with its strings spelt as JSON (so `json.loads` reads it), and a `FramingError`
    for each lexical error.

    A lexical error, as in QEMU, drops the message it interrupts and skips to the next
    structural or control character: that is how a client resets a half-sent message.
    A value larger than `max_message` bytes, or nested deeper than MAX_NESTING, is not
    kept: it is scanned to its end and reported as one `FramingError`, so one bad
    message never costs more than `max_message` bytes of memory and the next message
    is read normally.
    """

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._state = _State.START
        self._quote = 0  # the byte that closes the current string
        self._buffer = bytearray()  # the current message, strings spelt as JSON
        self._active = False  # inside a message
        self._size = 0  # bytes of the current message so far, kept in `_buffer` up to the cap
        self._token_at = 0  # where the current string or number starts in `_buffer`
        self._braces = 0
        self._brackets = 0
        self._too_deep = False
        # Valid during `feed`: the chunk's bytes from `_mark` on are part of the
        # current message but not yet in `_buffer`.
        self._mark = 0
        self._frames: list[Frame] = []

    @property
    def pending(self) -> bool:
        """True when part of a message has been fed and its end not yet."""
        return self._active

    def feed(self, data: bytes) -> list[Frame]:
        self._mark = i = 0
        while i < len(data):
            i = self._STEPS[self._state](self, data, i)
        if self._active:
            self._keep(data[self._mark :])
        frames, self._frames = self._frames, []
        return frames

    # -- one step per state: each returns where the next one looks ------------------

    def _start(self, data: bytes, i: int) -> int:
        if self._active:
            match = _PLAIN_TOKENS.match(data, i)
            if match is not None:
                return match.end()
        match = _NON_WHITESPACE.search(data, i)
        if match is None:
            return len(data)
        i = match.start()
        byte = data[i]
        if byte in b"{}[]:,":
            self._begin(i)
            if byte == 0x7B:
                self._braces += 1
            elif byte == 0x7D:
                self._braces -= 1
            elif byte == 0x5B:
                self._brackets += 1
            elif byte == 0x5D:
                self._brackets -= 1
            self._too_deep |= self._braces + self._brackets > MAX_NESTING
            return self._token_end(data, i + 1)
        if byte in b"\"'":
            self._quote = byte
            self._begin_token(_State.STRING, i)
        elif byte == 0x2D:
            self._begin_token(_State.SIGN, i)
        elif byte == 0x30:
            self._begin_token(_State.ZERO, i)
        elif 0x31 <= byte <= 0x39:
            self._begin_token(_State.INT, i)
        elif 0x61 <= byte <= 0x7A:
            self._begin_token(_State.KEYWORD, i)
        else:
            return self._stray(data, i, None)
        return i + 1

    def _string(self, data: bytes, i: int) -> int:
        match = _STRING_STOP[self._quote].search(data, i)
        if match is None:
            return len(data)
        i = match.start()
        byte = data[i]
        if byte == 0x5C:  # backslash
            self._state = _State.STRING_ESCAPE
            return i + 1
        if byte != self._quote:
            return self._stray(data, i, self._token_at)
        self._keep_through(data, i + 1)
        if self._size <= self.max_message:
            token = bytes(self._buffer[self._token_at :])
            if self._quote == 0x27 or b"\\'" in token:
                self._buffer[self._token_at :] = _as_json_string(token)
        self._state = _State.START
        return self._token_end(data, i + 1)

    def _string_escape(self, data: bytes, i: int) -> int:
        # Which escapes JSON allows is the parser's business; a control byte is not.
        if 0x20 <= data[i] <= 0xFD:
            self._state = _State.STRING
            return i + 1
        return self._stray(data, i, self._token_at)

    def _keyword(self, data: bytes, i: int) -> int:
        match = _NON_LETTER.search(data, i)
        if match is None:
            return len(data)
        self._state = _State.START
        return self._token_end(data, match.start())

    def _number(self, data: bytes, i: int) -> int:
        if self._state in _DIGIT_RUNS:
            match = _NON_DIGIT.search(data, i)
            if match is None:
                return len(data)
            i = match.start()
        moves, may_end = _NUMBER[self._state]
        byte = data[i]
        if byte in moves:
            following = moves[byte]
            if following is None:
                return self._stray(data, i, self._token_at)
            self._state = following
            return i + 1
        if may_end:
            self._state = _State.START
            return self._token_end(data, i)
        return self._stray(data, i, self._token_at)

    def _recovery(self, data: bytes, i: int) -> int:
        match = _RESYNC.search(data, i)
        if match is None:
            return len(data)
        self._state = _State.START
        return match.start()  # that byte starts a token, or is stray again

    _STEPS: ClassVar[dict[_State, Callable[[JsonSplitter, bytes, int], int]]] = {
        _State.START: _start,
        _State.STRING: _string,
        _State.STRING_ESCAPE: _string_escape,
        _State.KEYWORD: _keyword,
        **dict.fromkeys(_NUMBER, _number),
        _State.RECOVERY: _recovery,
    }

    # -- messages ---------------------------------------------------------------------

    def _begin(self, i: int) -> None:
        if not self._active:
            self._active = True
            self._mark = i

    def _begin_token(self, state: _State, i: int) -> None:
        self._begin(i)
        # Where byte i will be once the chunk so far is kept (nothing is respelt
        # between `_mark` and i).
        self._token_at = len(self._buffer) + i - self._mark
        self._state = state

    def _token_end(self, data: bytes, end: int) -> int:
        """A token ends before `end`: the message too, if it closes every brace and
        bracket it opened, or closes one it did not open, as QEMU's streamer has it."""
        if self._braces < 0 or self._brackets < 0 or self._braces == self._brackets == 0:
            self._keep_through(data, end)
            self._frames.append(self._refusal() or bytes(self._buffer))
            self._reset()
        return end

    def _stray(self, data: bytes, i: int, token_at: int | None) -> int:
        """Byte i is a lexical error: QEMU names it with the string or number it cut
        short (from `token_at` in the buffer), drops the message it was in, and skips
        ahead to where tokens may start again."""
        token = data[i : i + 1]
        refusal = None
        if self._active:
            self._keep_through(data, i + 1)
            refusal = self._refusal()
            if token_at is not None:
                token = bytes(self._buffer[token_at:])
        stray = f"JSON parse error, stray '{token.decode('utf-8', 'replace')}'"
        self._frames.append(refusal or FramingError(stray))
        self._reset()
        self._state = _State.RECOVERY
        return i + 1

    def _keep_through(self, data: bytes, end: int) -> None:
        self._keep(data[self._mark : end])
        self._mark = end

    def _keep(self, chunk: bytes) -> None:
        # Past the cap only the count grows; the bytes are dropped.
        self._size += len(chunk)
        if self._size > self.max_message:
            self._buffer.clear()
        else:
            self._buffer += chunk

    def _refusal(self) -> FramingError | None:
        if self._size > self.max_message:
            return FramingError(
                f"JSON parse error, message of {self._size} bytes exceeds the limit of "
                f"{self.max_message} bytes"
            )
        if self._too_deep:
            return FramingError(f"JSON parse error, nesting deeper than {MAX_NESTING} levels")
        return None

    def _reset(self) -> None:
        self._buffer.clear()
        self._active = self._too_deep = False
        self._size = self._braces = self._brackets = 0
