"""The JSON message splitter: messages cut anywhere, several per chunk, strings that
hold braces, QEMU's single-quoted strings, its lexical errors and the resets they give
a client, and oversized or too deeply nested input refused at bounded cost."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multifd.control import FramingError, JsonSplitter
from multifd.control.framing import MAX_NESTING, Frame

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def single_quoted(value: object) -> str:
    """`value` as JSON with every string in QEMU's single quotes."""
    if isinstance(value, str):
        escaped = json.dumps(value)[1:-1].replace('\\"', '"').replace("'", "\\'")
        return f"'{escaped}'"
    if isinstance(value, list):
        return "[" + ", ".join(single_quoted(item) for item in value) + "]"
    if isinstance(value, dict):
        members = (f"{single_quoted(k)}: {single_quoted(v)}" for k, v in value.items())
        return "{" + ", ".join(members) + "}"
    return json.dumps(value)


def stray(token: str) -> FramingError:
    return FramingError(f"JSON parse error, stray '{token}'")


def feed_all(splitter: JsonSplitter, *chunks: bytes) -> list[object]:
    frames: list[object] = []
    for chunk in chunks:
        frames += splitter.feed(chunk)
    return frames


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=6),
    st.lists(st.integers(min_value=0, max_value=400), max_size=10),
    st.sampled_from(["", " ", "\r\n", "\n\t "]),
    st.sampled_from([json.dumps, single_quoted]),
)
def test_messages_survive_any_cut(
    messages: list[dict[str, object]],
    cuts: list[int],
    separator: str,
    spell: Callable[[object], str],
) -> None:
    stream = separator.join(spell(m) for m in messages).encode() + separator.encode()
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    splitter = JsonSplitter()
    frames = feed_all(splitter, *chunks)
    assert [json.loads(f) for f in frames] == messages  # type: ignore[arg-type]
    assert not splitter.pending


def test_braces_and_escaped_quotes_inside_strings_do_not_end_a_message() -> None:
    text = b'{"execute": "x", "arguments": {"uri": "unix:/t/}{\\"]["}}'
    assert JsonSplitter().feed(text) == [text]


def test_one_byte_at_a_time() -> None:
    first, second = b'{"execute": "query-status", "id": "a\\\\"}', b'{"execute": "quit"}'
    text = first + second
    splitter = JsonSplitter()
    frames = feed_all(splitter, *(text[i : i + 1] for i in range(len(text))))
    assert frames == [first, second]


def test_top_level_scalars_and_stray_closers_are_messages_of_their_own() -> None:
    # Each becomes one error answer upstream, never a stuck stream.
    assert JsonSplitter().feed(b'42 true "s"} ]{}') == [b"42", b"true", b'"s"', b"}", b"]", b"{}"]


def test_a_bare_value_waits_for_its_end() -> None:
    splitter = JsonSplitter()
    assert splitter.feed(b"12") == []
    assert splitter.pending
    assert splitter.feed(b"3\n") == [b"123"]


def test_an_oversized_message_is_refused_and_the_next_one_read() -> None:
    splitter = JsonSplitter(max_message=100)
    big = b'{"execute": "' + b"x" * 10_000 + b'"}'
    frames = feed_all(splitter, big[:5000], big[5000:] + b'{"execute": "quit"}')
    assert frames[0] == FramingError(
        f"JSON parse error, message of {len(big)} bytes exceeds the limit of 100 bytes"
    )
    assert frames[1] == b'{"execute": "quit"}'
    # Only the cap was kept while the big one streamed past.
    assert len(splitter._buffer) == 0


def test_memory_stays_bounded_while_an_endless_message_streams_in() -> None:
    splitter = JsonSplitter(max_message=1000)
    splitter.feed(b'{"a": "')
    for _ in range(100):
        assert splitter.feed(b"y" * 10_000) == []
    assert len(splitter._buffer) <= 1000
    assert splitter.pending


def test_nesting_deeper_than_the_limit_is_refused() -> None:
    depth = MAX_NESTING + 1
    frames = JsonSplitter(max_message=1 << 20).feed(b"[" * depth + b"]" * depth + b"{}")
    assert frames == [
        FramingError(f"JSON parse error, nesting deeper than {MAX_NESTING} levels"),
        b"{}",
    ]


def test_single_quoted_strings_are_respelt_as_json() -> None:
    # As QEMU's lexer: a single-quoted string may hold bare double quotes and braces,
    # and \' escapes an apostrophe in strings of either kind.
    text = b"""{'execute': 'x', 'id': 'a\\'b"}{', "more": "c\\'d\\"e"}"""
    frames = JsonSplitter().feed(text)
    assert frames == [b"""{"execute": "x", "id": "a'b\\"}{", "more": "c'd\\"e"}"""]
    assert json.loads(frames[0]) == {"execute": "x", "id": "a'b\"}{", "more": "c'd\"e"}


@pytest.mark.parametrize("reset", [b"\x01", b"\x1b", b"\x7f", b"\xfe", b"\xff"])
def test_a_byte_no_json_holds_resets_a_half_sent_message(reset: bytes) -> None:
    # The QMP spec's way to force the parser into a known state: the half message
    # is dropped with one error, and the next message is read whole.
    splitter = JsonSplitter()
    assert splitter.feed(b'{"execute": "query-status", "arguments": {') == []
    assert splitter.feed(reset) == [stray(reset.decode("utf-8", "replace"))]
    assert not splitter.pending
    assert splitter.feed(b'{"execute": "quit"}') == [b'{"execute": "quit"}']


def test_a_control_byte_inside_a_string_is_named_with_the_string_so_far() -> None:
    # Then, as QEMU, the rest is skipped up to a structural character, from which
    # tokens are read again: each leftover becomes a message the parser refuses
    # (QEMU 7.2 answers this input with six errors, then the quit).
    frames = JsonSplitter().feed(b'{"execute": "query-st\x01atus", "id": 1}{"execute": "quit"}')
    assert frames == [
        stray('"query-st\x01'),
        b",",
        b'"id"',
        b":",
        b"1",
        b"}",
        b'{"execute": "quit"}',
    ]
    assert JsonSplitter().feed(b'["a\\\t"]') == [stray('"a\\\t'), b"]"]


def test_stray_bytes_between_messages_are_reported_and_skipped() -> None:
    frames = JsonSplitter().feed(b'NaN {"execute": "quit"}\xc3\xa9 [1]')
    assert frames == [stray("N"), b'{"execute": "quit"}', stray("\ufffd"), b"[1]"]


@pytest.mark.parametrize(
    ("text", "frames"),
    [
        (b"[01,0]", [stray("01"), b",", b"0", b"]"]),
        (b"[-x,0]", [stray("-x"), b",", b"0", b"]"]),
        (b"[1.e5,0]", [stray("1.e"), b",", b"0", b"]"]),
        # The byte that breaks the number is part of the error, here the comma.
        (b"[2e+,0]", [stray("2e+,"), b"]"]),
    ],
)
def test_numbers_outside_the_grammar_are_lexical_errors(text: bytes, frames: list[Frame]) -> None:
    assert JsonSplitter().feed(text) == frames


def test_numbers_in_the_grammar_pass_whole() -> None:
    text = b"[0, -0, 12, -3.25, 1e5, 6.5E-3, 7e+2, true, null]"
    assert JsonSplitter().feed(text) == [text]


def test_braces_and_brackets_are_counted_apart_as_in_qemu() -> None:
    # A closer that was never opened ends the message, for the parser to refuse.
    assert JsonSplitter().feed(b"{{]}") == [b"{{]", b"}"]


def test_a_reset_inside_an_oversized_message_reports_the_size() -> None:
    splitter = JsonSplitter(max_message=100)
    big = b'{"execute": "' + b"x" * 1000
    frames = splitter.feed(big + b"\x01" + b'{"execute": "quit"}')
    assert frames == [
        FramingError(
            f"JSON parse error, message of {len(big) + 1} bytes exceeds the limit of 100 bytes"
        ),
        b'{"execute": "quit"}',
    ]
