"""count_tokens (SPEC §14) over real sockets: relayed where an entry serves it, else the
gateway's own estimate, never a 404; SPEC §13's rules hold either way. Responses'
input_tokens the same."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
import yaml

from gateway.wire.estimate import prompt_tokens
from tests.conftest import GatewayFactory
from tests.scripted_upstream import Json, Upstream

BODY = {
    "model": "m",
    "system": "You are terse.",
    "messages": [{"role": "user", "content": "How many tokens is this sentence, roughly?"}],
    "tools": [{"name": "read", "input_schema": {"type": "object", "properties": {}}}],
}
ESTIMATE = prompt_tokens(BODY)


def routes(up: Upstream, apis: list[str], **entry: Any) -> str:
    provider = {"base_url": up.url, "api_key": "sk-up", "apis": apis}
    model = {"providers": [{"provider": "p", "model": "upstream-model", **entry}],
             "cooldown": {"failures": 1, "seconds": 60}}  # fmt: skip
    return yaml.safe_dump({"providers": {"p": provider}, "models": {"m": model}})


async def count(client: httpx.AsyncClient, url: str, **headers: str) -> httpx.Response:
    return await client.post(f"{url}/v1/messages/count_tokens", json=BODY, headers=headers)


def estimated(r: httpx.Response, asked: str | None = None) -> None:
    """The gateway's count; `asked`: the entry whose upstream was asked first."""
    assert r.status_code == 200, r.text
    assert r.json() == {"input_tokens": ESTIMATE}
    assert r.headers["x-gateway-count-tokens"] == "estimate"
    assert r.headers.get("x-gateway-provider") == asked


async def test_relayed_to_an_entry_that_serves_it(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    anthropic = pytest.importorskip("anthropic")
    upstream.default = Json({"input_tokens": 12})
    gw = await gateway(routes(upstream, ["messages"]))
    sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-client", max_retries=0)
    try:
        counted = await sdk.messages.count_tokens(model="m", messages=BODY["messages"])
    finally:
        await sdk.close()
    assert counted.input_tokens == 12  # the upstream's own count
    (seen,) = upstream.requests
    assert seen.path == "/v1/messages/count_tokens" and seen.json()["model"] == "upstream-model"


async def test_no_entry_serves_messages(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    anthropic = pytest.importorskip("anthropic")
    gw = await gateway(routes(upstream, ["chat"]))
    estimated(await count(client, gw.url))
    sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-client", max_retries=0)
    try:
        counted = await sdk.messages.count_tokens(
            model="m", system=BODY["system"], messages=BODY["messages"], tools=BODY["tools"]
        )
    finally:
        await sdk.close()
    assert counted.input_tokens == ESTIMATE
    assert upstream.requests == []  # nothing reached the upstream
    # A message itself still needs an entry that serves the family.
    r = await client.post(f"{gw.url}/v1/messages", json={**BODY, "max_tokens": 5})
    assert r.status_code == 400


async def test_the_entry_says_estimate(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream, ["messages"], count_tokens="estimate"))
    estimated(await count(client, gw.url))
    assert upstream.requests == []


@pytest.mark.parametrize("status", [404, 405, 501])
async def test_the_upstream_has_no_counting_endpoint(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, status: int
) -> None:
    error = {"type": "error", "error": {"type": "not_found_error", "message": "no route"}}
    upstream.script(Json(error, status=status), Json(error, status=status))
    gw = await gateway(routes(upstream, ["messages"]))
    estimated(await count(client, gw.url), "p")
    # Not a failure of the entry (cooldown after one failure): it still serves.
    estimated(await count(client, gw.url), "p")
    upstream.script(Json({"input_tokens": 7}))
    r = await count(client, gw.url)
    assert r.status_code == 200 and r.json() == {"input_tokens": 7}
    assert len(upstream.requests) == 3


async def test_other_upstream_errors_are_relayed(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    upstream.script(Json(error, status=400))
    gw = await gateway(routes(upstream, ["messages"]))
    r = await count(client, gw.url)
    assert r.status_code == 400 and r.json() == error


async def test_an_estimate_keeps_count_tokens_rules(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """Never charged, never rpm, its own count_tokens_rpm (SPEC §13)."""
    limits = {"name": "a", "key": "sk-client-a", "rpm": 1, "token_quota": 100_000,
              "count_tokens_rpm": 3}  # fmt: skip
    gw = await gateway(routes(upstream, ["chat"]), yaml.safe_dump({"keys": [limits]}))
    auth = {"authorization": "Bearer sk-client-a"}
    for _ in range(3):
        estimated(await count(client, gw.url, **auth))
    r = await count(client, gw.url, **auth)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    usage = gw.runtime.limiter.usage["a"]
    assert usage.held_tokens == 0
    r = await client.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers=auth,
    )
    assert r.status_code == 200  # rpm 1 still whole for a real request
    assert upstream.requests[0].path == "/v1/chat/completions"


async def test_a_slug_not_in_the_catalog_is_refused_as_for_a_message(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream, ["chat"]))
    r = await client.post(f"{gw.url}/v1/messages/count_tokens", json={**BODY, "model": "nope"})
    # As for a message: 400 model_not_found, in Anthropic's envelope.
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "x-gateway-count-tokens" not in r.headers


async def test_responses_input_tokens_the_same(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    body = {"model": "m", "input": "Count me in, please.", "instructions": "Be brief."}
    upstream.script(Json({"error": {"message": "not found"}}, status=404))
    gw = await gateway(routes(upstream, ["responses"]))
    r = await client.post(f"{gw.url}/v1/responses/input_tokens", json=body)
    assert r.status_code == 200
    assert orjson.loads(r.content) == {
        "object": "response.input_tokens",
        "input_tokens": prompt_tokens(body),
    }
    gw2 = await gateway(routes(upstream, ["chat"]))
    r = await client.post(f"{gw2.url}/v1/responses/input_tokens", json=body)
    assert r.status_code == 200 and r.json()["input_tokens"] == prompt_tokens(body)


async def test_a_count_is_shaped_like_a_message(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """Claude Code sends its betas on count_tokens too: the entry's removals apply, and
    are told whether the upstream counted or the gateway did."""
    beta = {"anthropic-beta": "context-management-2025-06-27,other-1"}
    upstream.script(Json({"input_tokens": 9}), Json({"type": "error"}, status=404))
    gw = await gateway(routes(upstream, ["messages"], drop_betas=["context-management-2025-06-27"]))
    r = await count(client, gw.url, **beta)
    assert r.json() == {"input_tokens": 9}
    assert r.headers["x-gateway-dropped"] == "context-management-2025-06-27"
    assert upstream.requests[0].header("anthropic-beta") == "other-1"
    r = await count(client, gw.url, **beta)
    estimated(r, "p")
    assert r.headers["x-gateway-dropped"] == "context-management-2025-06-27"
