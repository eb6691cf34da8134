"""The JSON message splitter: messages cut anywhere, several per chunk, strings that
hold braces, and oversized or too deeply nested input refused at bounded cost."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from multifd.control import FramingError, JsonSplitter
from multifd.control.framing import MAX_NESTING

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


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
)
def test_messages_survive_any_cut(
    messages: list[dict[str, object]], cuts: list[int], separator: str
) -> None:
    stream = separator.join(json.dumps(m) for m in messages).encode() + separator.encode()
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
