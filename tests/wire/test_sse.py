"""Block-wise SSE rewriting must equal event-by-event rewriting, byte for byte."""

from __future__ import annotations

import json
import random

import pytest

from gateway.wire.sse import EventSplitter, Splicer, splice_model, split_events
from gateway.wire.usage import Tally

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
    assert old.endswith(b'"model":"upstream-model"') and new.endswith(b'"model":"my/slug"')
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
