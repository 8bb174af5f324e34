"""Per-entry request shaping (SPEC §14) over real sockets: what the upstream received
(header and body bytes), what the client was told (x-gateway-dropped), failover between
a shaping and a plain entry, and the official Anthropic SDK as Claude Code's stand-in."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GatewayFactory
from tests.scripted_upstream import Json, Sse, Upstream

CM = "context-management-2025-06-27"
ATU = "advanced-tool-use-2025-11-20"
# Spacing of the client's own: the splice keeps it, a re-serialisation would not.
BODY = (
    b'{"model": "m", "max_tokens": 5,\n "context_management": {"edits": [{"type": '
    b'"clear_tool_uses_20250919", "note": "}\\",{"}]},\n "messages": [{"role": "user", '
    b'"content": "hi"}]}'
)
SENT = (
    b'{"model": "upstream-model", "max_tokens": 5,\n "messages": [{"role": "user", '
    b'"content": "hi"}]}'
)
PLAIN = BODY.replace(b'"m"', b'"upstream-model"', 1)  # what a plain entry receives


def message(text: str = "ok") -> dict[str, Any]:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": "upstream-model",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}  # fmt: skip


def routes(
    *entries: tuple[Upstream, dict[str, Any]], provider: dict[str, Any] | None = None
) -> str:
    providers = {
        f"p{i}": {"base_url": up.url, "api_key": f"sk-up-{i}", "apis": ["messages"]}
        for i, (up, _) in enumerate(entries, 1)
    }
    if provider:
        providers["p1"].update(provider)
    models = [
        {"provider": f"p{i}", "model": "upstream-model", **own}
        for i, (_, own) in enumerate(entries, 1)
    ]
    return yaml.safe_dump({"providers": providers, "models": {"m": {"providers": models}}})


SHAPED = {"drop_betas": [CM, ATU], "drop_fields": ["context_management"]}
HEADERS = {"anthropic-beta": f"{CM} ,  fine-2025-01-01,{ATU}", "content-type": "application/json"}


async def post(client: httpx.AsyncClient, url: str, **headers: str) -> httpx.Response:
    return await client.post(f"{url}/v1/messages", content=BODY, headers={**HEADERS, **headers})


async def test_an_entry_drops_betas_and_fields_and_says_so(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.default = Json(message(), headers=[("x-gateway-dropped", "forged")])
    gw = await gateway(routes((upstream, SHAPED)))
    r = await post(client, gw.url)
    assert r.status_code == 200, r.text
    assert r.headers.get_list("x-gateway-dropped") == [f"{CM},{ATU},context_management"]
    (seen,) = upstream.requests
    assert seen.body == SENT  # the member and its comma gone, every other byte as sent
    assert [v for k, v in seen.headers if k == "anthropic-beta"] == ["fine-2025-01-01"]
    assert r.json()["model"] == "m"


async def test_allow_betas_and_a_beta_header_left_empty(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.default = Json(message())
    # The provider's drop list is replaced by the entry's allow list.
    gw = await gateway(routes((upstream, {"allow_betas": []}), provider={"drop_betas": [ATU]}))
    r = await post(client, gw.url)
    assert r.headers["x-gateway-dropped"] == f"{CM},fine-2025-01-01,{ATU}"
    assert upstream.requests[0].header("anthropic-beta") is None  # not sent empty
    assert upstream.requests[0].body == PLAIN


async def test_nothing_to_drop_sends_the_request_as_it_came(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.default = Json(message(), headers=[("x-gateway-dropped", "forged")])
    gw = await gateway(routes((upstream, {"drop_betas": ["other"], "drop_fields": ["other"]})))
    r = await post(client, gw.url)
    assert r.status_code == 200
    assert "x-gateway-dropped" not in r.headers  # nor the upstream's own
    seen = upstream.requests[0]
    assert seen.body == PLAIN and seen.header("anthropic-beta") == HEADERS["anthropic-beta"]


async def test_a_plain_entry_is_untouched_and_an_upstream_cannot_forge_the_header(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.default = Json(message(), headers=[("x-gateway-dropped", "forged")])
    gw = await gateway(routes((upstream, {})))
    r = await post(client, gw.url)
    assert r.status_code == 200 and "x-gateway-dropped" not in r.headers
    assert upstream.requests[0].body == PLAIN


async def test_failover_each_attempt_shapes_for_its_own_entry(
    gateway: GatewayFactory, make_upstream: Any, client: httpx.AsyncClient
) -> None:
    shaping, plain = await make_upstream(), await make_upstream()
    gw = await gateway(routes((shaping, SHAPED), (plain, {})))
    # The shaping entry fails: the plain one serves what the client sent, and the
    # client hears of no removal.
    shaping.script(Json({"type": "error"}, status=500))
    plain.script(Json(message()))
    r = await post(client, gw.url)
    assert r.status_code == 200 and r.headers["x-gateway-provider"] == "p2"
    assert "x-gateway-dropped" not in r.headers
    assert shaping.requests[0].body == SENT and plain.requests[0].body == PLAIN
    assert plain.requests[0].header("anthropic-beta") == HEADERS["anthropic-beta"]

    # The other way round: the plain entry fails, the shaping entry's removals are told.
    gw2 = await gateway(routes((plain, {}), (shaping, SHAPED)))
    plain.script(Json({"type": "error"}, status=529))
    shaping.script(Json(message()))
    r = await post(client, gw2.url)
    assert r.status_code == 200 and r.headers["x-gateway-provider"] == "p2"
    assert r.headers["x-gateway-dropped"] == f"{CM},{ATU},context_management"
    assert plain.requests[-1].body == PLAIN and shaping.requests[-1].body == SENT


async def test_the_relayed_refusal_of_a_shaping_entry_carries_the_header(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    refusal = {"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}
    upstream.script(Json(refusal, status=400), Json(refusal, status=503))
    gw = await gateway(routes((upstream, SHAPED)))
    r = await post(client, gw.url)
    assert r.status_code == 400 and r.json() == refusal
    assert r.headers["x-gateway-dropped"] == f"{CM},{ATU},context_management"
    r = await post(client, gw.url)  # a retryable status, relayed as the last failure
    assert r.status_code == 503
    assert r.headers["x-gateway-dropped"] == f"{CM},{ATU},context_management"


def sse(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


async def test_a_stream_is_shaped_and_told_in_its_head(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    start = {**message(), "content": [], "stop_reason": None}
    upstream.script(
        Sse(
            [
                sse("message_start", message=start),
                sse("content_block_start", index=0, content_block={"type": "text", "text": ""}),
                sse("content_block_delta", index=0, delta={"type": "text_delta", "text": "yo"}),
                sse("message_stop"),
            ]
        )
    )
    gw = await gateway(routes((upstream, {"drop_fields": ["context_management"]})))
    body = BODY.replace(b'"max_tokens": 5,', b'"max_tokens": 5, "stream": true,')
    async with client.stream("POST", f"{gw.url}/v1/messages", content=body, headers=HEADERS) as r:
        text = b"".join([chunk async for chunk in r.aiter_bytes()])
    assert r.status_code == 200 and r.headers["x-gateway-dropped"] == "context_management"
    assert b'"text": "yo"' in text
    assert json.loads(upstream.requests[0].body) == {
        "model": "upstream-model", "max_tokens": 5, "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }  # fmt: skip


async def test_anthropic_sdk_betas_and_context_management(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    anthropic = pytest.importorskip("anthropic")
    upstream.default = Json(message("shaped"))
    gw = await gateway(routes((upstream, SHAPED)))
    sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-client", max_retries=0)
    try:
        raw = await sdk.beta.messages.with_raw_response.create(
            model="m",
            max_tokens=20,
            messages=[{"role": "user", "content": "hello"}],
            betas=[CM, "interleaved-thinking-2025-05-14"],
            extra_body={"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}},
        )
        msg = await raw.parse()
    finally:
        await sdk.close()
    assert msg.content[0].text == "shaped" and msg.model == "m"
    assert raw.headers["x-gateway-dropped"] == f"{CM},context_management"
    seen = upstream.requests[0]
    assert seen.header("anthropic-beta") == "interleaved-thinking-2025-05-14"
    sent = seen.json()
    assert "context_management" not in sent and sent["messages"][0]["content"] == "hello"
    assert sent["model"] == "upstream-model"
