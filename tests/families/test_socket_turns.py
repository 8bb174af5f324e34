"""gateway/families/socket_turns.py from values: a turn's answer as frames, and the
chains a socket keeps for SSE upstreams (end to end: tests/test_sockets.py)."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

from gateway.families.socket_turns import MAX_CHAINS, Chains, FrameRelay, items


def test_a_continued_turn_gets_the_whole_chain_and_no_previous_id() -> None:
    chains = Chains(max_bytes=1000)
    chains.keep("resp_1", {}, [{"role": "user", "content": "a"}, {"type": "x"}], 10)
    turn = {"model": "m", "input": "b", "previous_response_id": "resp_1", "store": False}
    assert chains.expand(turn) == {
        "model": "m", "store": False,
        "input": [{"role": "user", "content": "a"}, {"type": "x"},
                  {"role": "user", "content": "b"}],
    }  # fmt: skip
    other = {"input": "c", "previous_response_id": "resp_elsewhere"}
    assert chains.expand(other) is other  # not held here: the upstream's to resolve
    chains.keep("too_big", {}, [], 1001)
    assert chains.expand({"previous_response_id": "too_big"}) == {"previous_response_id": "too_big"}
    for n in range(MAX_CHAINS + 1):
        chains.keep(f"r{n}", {}, [], 1)
    assert len(chains.held) == MAX_CHAINS
    assert items(None) == [] and items("x") == [{"role": "user", "content": "x"}]


async def test_sse_events_become_frames_and_other_answers_one_error() -> None:
    sent: list[MutableMapping[str, Any]] = []
    events: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def event(data: dict[str, Any]) -> None:
        events.append(data)

    relay = FrameRelay(event, send, keep=True)
    await relay({"type": "http.response.start", "status": 200,
                 "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
    done = {"type": "response.completed", "response": {"id": "r", "output": []}}
    await relay({"type": "http.response.body", "body": b"data: {\"a\":1}\n\nda",
                 "more_body": True})  # fmt: skip
    await relay({"type": "http.response.body",
                 "body": b"ta: " + json.dumps(done).encode() + b"\n\ndata: [DONE]\n\n"})  # fmt: skip
    assert [m["text"] for m in sent] == ['{"a":1}', json.dumps(done)]
    assert relay.completed == done["response"]
    refused = FrameRelay(event, send)
    await refused({"type": "http.response.start", "status": 429, "headers": []})
    await refused({"type": "http.response.body",
                   "body": b'{"error": {"code": "rate_limited", "message": "slow"}}'})  # fmt: skip
    assert events == [{"type": "error", "status": 429,
                       "error": {"code": "rate_limited", "message": "slow"}}]  # fmt: skip
