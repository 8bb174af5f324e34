"""Unknown Responses items, Messages content blocks and event types pass byte for byte
(SPEC §14: thinking and signature blocks, encrypted reasoning, `additional_tools`): the
only bytes the gateway changes are the `model` values."""

from __future__ import annotations

import httpx
import yaml

from tests.conftest import GatewayFactory
from tests.e2e.test_routing import MakeUpstream
from tests.scripted_upstream import Json, Sse


def routes(url: str, api: str) -> str:
    doc = {"providers": {"a": {"base_url": url, "apis": [api]}},
           "models": {"m": {"providers": [{"provider": "a", "model": "up-a"}]}}}  # fmt: skip
    return yaml.safe_dump(doc)


# Spacing and member order as a client might write them: they must survive too.
RESPONSES_REQUEST = (
    b'{"model":"m","input":[{"type":"reasoning","id":"rs_1","encrypted_content":"gAAA\\u00e9=="'
    b',"summary":[]},{"type":"future_item_kind","payload":{"x":[1,2.50,"\\ud83d\\ude00"]}},'
    b'{"type":"function_call_output","call_id":"c1","output":"ok"}],'
    b'"additional_tools":[{"type":"mcp_future","server":"s"}],"include":["reasoning.encrypted_content"],'
    b'"store":false}'
)
RESPONSES_ANSWER = (
    b'{"id":"resp_1","object":"response","model":"up-a","output":[{"type":"reasoning",'
    b'"encrypted_content":"gBBB=="},{"type":"brand_new_output","data":{"k":"v"}}],'
    b'"usage":{"input_tokens":3,"output_tokens":1,"total_tokens":4}}'
)


async def test_responses_items_of_unknown_types_pass_both_ways(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    up = await make_upstream()
    up.script(Json(RESPONSES_ANSWER, headers=[("content-type", "application/json")]))
    gw = await gateway(routes(up.url, "responses"))
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{gw.base_url}/responses", content=RESPONSES_REQUEST,
                              headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert up.requests[0].body == RESPONSES_REQUEST.replace(b'"model":"m"', b'"model":"up-a"')
    assert r.content == RESPONSES_ANSWER.replace(b'"model":"up-a"', b'"model":"m"')


MESSAGES_EVENTS = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":'
    b'"message","role":"assistant","model":"up-a","content":[],"usage":{"input_tokens":5,'
    b'"output_tokens":0}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
    b'{"type":"thinking_delta","thinking":"hmm"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
    b'{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA"}}\n\n',
    b'event: future_event_kind\ndata: {"type":"future_event_kind","anything":[1,{"a":null}]}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
    b'"content_block":{"type":"redacted_thinking","data":"EmwKAhgBEgy3va3pzix"}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":2,"delta":'
    b'{"type":"text_delta","text":"Hi"}}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":3}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]


async def test_messages_blocks_and_events_of_unknown_types_pass_byte_for_byte(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    up = await make_upstream()
    up.script(Sse(MESSAGES_EVENTS, headers=[("content-type", "text/event-stream")]))
    gw = await gateway(routes(up.url, "messages"))
    request = (
        b'{"model":"m","max_tokens":64,"stream":true,"thinking":{"type":"enabled",'
        b'"budget_tokens":1024},"messages":[{"role":"assistant","content":[{"type":"thinking",'
        b'"thinking":"x","signature":"sig=="},{"type":"future_block","v":1}]},'
        b'{"role":"user","content":"go on"}]}'
    )
    async with httpx.AsyncClient() as client:
        r = await client.post(f"{gw.base_url}/messages", content=request,
                              headers={"content-type": "application/json",
                                       "anthropic-version": "2023-06-01"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert up.requests[0].body == request.replace(b'"model":"m"', b'"model":"up-a"')
    expected = b"".join(MESSAGES_EVENTS).replace(b'"model":"up-a"', b'"model":"m"')
    assert r.content == expected
