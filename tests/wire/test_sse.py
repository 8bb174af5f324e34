"""gateway/wire/sse.py: events split and the `model` spliced from raw bytes; block-wise
rewriting must equal event-by-event rewriting, byte for byte."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable

import pytest

from gateway.wire.sse import EventSplitter, Splicer, event_spans, splice_model, split_events
from gateway.wire.usage import Tally

MODEL = b'"model"'
SLUG = b'"my/slug"'


def chunk(i: int, model: object = "upstream-model", **extra: object) -> bytes:
    obj = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model}
    obj.update(extra or {"choices": [{"index": 0, "delta": {"content": f"t{i}"}}]})
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def by_event(block: bytes) -> bytes:
    return b"".join(splice_model(e, SLUG) for e in split_events(block))


ODD_EVENTS = [
    chunk(1),
    b': comment with "model" in it\n\n',
    b'event: x\ndata: {"id":"c1","model":"upstream-model","x":{"model":"keep"}}\r\n\r\n',
    b'data: {"a":{"model":"nested"},"model":"upstream-model"}\n\n',
    b'data: {"model":"first","model":"second"}\n\n',
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":null}\n\n',
    b'data: {"model" : "spaced" , "z": 1}\r\r',
    chunk(2, model="other-model"),
    b"data: [DONE]\n\n",
]


@pytest.mark.parametrize("seed", range(20))
def test_splicer_equals_event_by_event_on_any_mix(seed: int) -> None:
    rng = random.Random(seed)
    events = [chunk(i) for i in range(6)] + rng.sample(
        ODD_EVENTS, k=rng.randint(0, len(ODD_EVENTS))
    )
    rng.shuffle(events)
    splicer = Splicer(SLUG)
    # Several blocks through one splicer: the learned fast path must stay exact.
    cut = rng.randint(0, len(events))
    for block in (b"".join(events[:cut]), b"".join(events[cut:]), b"".join(events)):
        assert splicer.block(block) == by_event(block)


def test_splicer_learns_the_repeated_line_head() -> None:
    splicer = Splicer(SLUG)
    first = chunk(0) + chunk(1)
    assert splicer.block(first) == by_event(first)
    assert splicer.learned is not None
    old, new = splicer.learned
    assert old.endswith(b'"model":"upstream-model",') and new.endswith(b'"model":"my/slug",')
    later = chunk(2) + chunk(3)
    assert splicer.block(later) == by_event(later)


def test_feed_block_holds_back_only_the_unfinished_event() -> None:
    stream = b"".join(ODD_EVENTS) + b'data: {"partial":'
    for cut in range(len(stream)):
        splitter = EventSplitter()
        out = splitter.feed_block(stream[:cut]) + splitter.feed_block(stream[cut:])
        assert out + splitter.rest() == stream
        assert out.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))


def test_tally_block_reads_usage_and_hides_only_the_injected_chunk() -> None:
    usage = chunk(
        9, choices=[], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    )
    block = chunk(1) + chunk(2) + usage + b"data: [DONE]\n\n"
    shown = Tally(hide_usage_chunk=False, count_content=False)
    assert shown.block(block) == block
    assert shown.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    hidden = Tally(hide_usage_chunk=True, count_content=False)
    assert hidden.block(block) == chunk(1) + chunk(2) + b"data: [DONE]\n\n"
    assert hidden.usage is not None and hidden.usage["total_tokens"] == 7
    counting = Tally(hide_usage_chunk=True, count_content=True)
    assert counting.block(block) == chunk(1) + chunk(2) + b"data: [DONE]\n\n"
    assert counting.content_chars == len("t1") + len("t2")


# --------------------------------------------------------------------------- sse

STREAM = (
    b'data: {"model":"up","choices":[{"delta":{"content":"{\\n}"}}]}\n\n'
    b"event: ping\r\ndata: 1\r\n\r\n"
    b": comment with \r\n\r\n"
    b'data: {"model": "up"}\r\r'
    b"id: 7\rdata: x\r\n\n"
    b"data: two\ndata: lines\r\r\n"
    b"data: [DONE]\n\n"
    b"data: unterminated"
)
EXPECTED_EVENTS = [
    b'data: {"model":"up","choices":[{"delta":{"content":"{\\n}"}}]}\n\n',
    b"event: ping\r\ndata: 1\r\n\r\n",
    b": comment with \r\n\r\n",
    b'data: {"model": "up"}\r\r',
    b"id: 7\rdata: x\r\n\n",
    b"data: two\ndata: lines\r\r\n",
    b"data: [DONE]\n\n",
]
REST = b"data: unterminated"


def _events(splitter: EventSplitter, chunk: bytes) -> list[bytes]:
    """The events one read completes, as the attempt reads them (feed_block, event_spans)."""
    block = splitter.feed_block(chunk)
    return [block[start:end] for start, end in event_spans(block)]


def _feed(chunks: Iterable[bytes]) -> tuple[list[bytes], bytes]:
    splitter = EventSplitter()
    events: list[bytes] = []
    for c in chunks:
        events.extend(_events(splitter, c))
    return events, splitter.rest()


def _norm(event: bytes) -> bytes:
    return event.strip(b"\r\n")


def test_event_splitter_whole_stream() -> None:
    events, rest = _feed([STREAM])
    assert events == EXPECTED_EVENTS
    assert rest == REST


def test_event_splitter_every_split_point() -> None:
    expected = [_norm(e) for e in EXPECTED_EVENTS]
    for i in range(len(STREAM) + 1):
        events, rest = _feed([STREAM[:i], STREAM[i:]])
        assert b"".join(events) + rest == STREAM, i
        assert [_norm(e) for e in events] == expected, i
        assert _norm(rest) == REST, i


def test_event_splitter_every_pair_of_split_points() -> None:
    expected = [_norm(e) for e in EXPECTED_EVENTS]
    n = len(STREAM)
    for i in range(0, n + 1, 3):
        for j in range(i, n + 1, 2):
            events, rest = _feed([STREAM[:i], STREAM[i:j], STREAM[j:]])
            assert b"".join(events) + rest == STREAM, (i, j)
            assert [_norm(e) for e in events] == expected, (i, j)


def test_event_splitter_byte_by_byte() -> None:
    events, rest = _feed([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert b"".join(events) + rest == STREAM
    assert [_norm(e) for e in events] == [_norm(e) for e in EXPECTED_EVENTS]


def test_event_splitter_never_holds_a_complete_event_back() -> None:
    splitter = EventSplitter()
    for event in EXPECTED_EVENTS:
        out = _events(splitter, event)
        assert b"".join(out).strip(b"\r\n") == event.strip(b"\r\n")
        assert len(out) == 1


def test_event_splitter_rest_is_emptied() -> None:
    splitter = EventSplitter()
    assert _events(splitter, b"data: a\n") == []
    assert splitter.rest() == b"data: a\n"
    assert splitter.rest() == b""
    assert _events(splitter, b"data: b\n\n") == [b"data: b\n\n"]


def test_event_splitter_crlf_is_one_line_ending() -> None:
    # `\r\n` alone is not a blank line.
    assert _feed([b"data: a\r\ndata: b\r\n"]) == ([], b"data: a\r\ndata: b\r\n")


PLAIN_SLUG = b'"slug"'


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b'data: {"model":"up","a":1}\n\n', b'data: {"model":"slug","a":1}\n\n'),
        (b'data:{"model":"up"}\r\n\r\n', b'data:{"model":"slug"}\r\n\r\n'),
        (b'data: { "model" :  "up" , "x":2}\r\r', b'data: { "model" :  "slug" , "x":2}\r\r'),
        (
            b'data: {"choices":[{"model":"in"}],"model":"up"}\n\n',
            b'data: {"choices":[{"model":"in"}],"model":"slug"}\n\n',
        ),
        (
            b'event: model\ndata: {"model":"up"}\n\n',
            b'event: model\ndata: {"model":"slug"}\n\n',
        ),
        (
            b': "model" comment\nid: 1\ndata: {"model":"up"}\n\n',
            b': "model" comment\nid: 1\ndata: {"model":"slug"}\n\n',
        ),
        (
            b'data: {"model":"a"}\ndata: {"model":"b"}\n\n',
            b'data: {"model":"slug"}\ndata: {"model":"slug"}\n\n',
        ),
    ],
)
def test_splice_model_rewrites_top_level_model(event: bytes, expected: bytes) -> None:
    assert splice_model(event, PLAIN_SLUG) == expected


@pytest.mark.parametrize(
    "event",
    [
        b"data: [DONE]\n\n",
        b"data: [DONE]\r\n\r\n",
        b': {"model":"up"}\n\n',
        b'event: {"model":"up"}\n\n',
        b'id: {"model":"up"}\n\n',
        b'data: "model" is a word\n\n',
        b'data: ["model", "up"]\n\n',
        b'data: {"choices":[{"model":"in"}]}\n\n',
        b'data: {"text":"\\"model\\": \\"up\\""}\n\n',
        b'data: {"model_id":"up"}\n\n',
        b'xdata: {"model":"up"}\n\n',
        b'data: {"model":\n\n',
        b"",
    ],
)
def test_splice_model_leaves_other_lines_alone(event: bytes) -> None:
    assert splice_model(event, PLAIN_SLUG) == event
