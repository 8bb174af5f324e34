"""SPEC §13 over real sockets: budgets and quotas that hold against a tenant who tries to
break them, and Responses ids that stay their maker's."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.helpers import assert_envelope, until
from tests.scripted_upstream import DONE, Hang, Json, Sse, Upstream, chat_completion, chunk

MAX_TOKENS = 800
# An honest upstream keeps to max_tokens: prompt + completion = 800 tokens a request.
USAGE = {"prompt_tokens": 5, "completion_tokens": 795, "total_tokens": 800}
PRICE = {"input": 10.0, "output": 10.0}  # USD per 1M tokens: 1,000 tokens = $0.01


def routes(upstream: Upstream, *, priced: bool = False, apis: str = "") -> str:
    entry: dict[str, Any] = {"provider": "p", "model": "upstream-model"}
    if priced:
        entry["price"] = PRICE
    provider: dict[str, Any] = {"base_url": upstream.url, "api_key": "sk-up"}
    if apis:
        provider["apis"] = apis.split(",")
    return yaml.safe_dump({"providers": {"p": provider}, "models": {"m": {"providers": [entry]}}})


def keys(**entries: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {"keys": [{"name": n, "key": f"sk-{n}", **limits} for n, limits in entries.items()]}
    )


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer sk-{name}"}


def chat_body(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": content}], **extra}


async def key_usage(client: httpx.AsyncClient, gw: RunningGateway, name: str) -> dict[str, Any]:
    """/v1/key once every request has ended: a client may read its answer before the
    endpoint settles that request's hold (the same event loop: in_flight at 0 means
    every endpoint's finally has run)."""
    await until(lambda: gw.runtime.metrics.in_flight.value == 0)
    r = await client.get(f"{gw.base_url}/key", headers=auth(name))
    assert r.status_code == 200, r.text
    return r.json()


# --- reservations -----------------------------------------------------------------------


@pytest.mark.parametrize("concurrent", [30, 300])
@pytest.mark.parametrize("limit", ["quota", "budget"])
async def test_concurrent_requests_pass_a_small_limit_by_at_most_one_overshoot(
    gateway: GatewayFactory, upstream: Upstream, limit: str, concurrent: int
) -> None:
    """Before SPEC §13 every one of 30 concurrent requests on a 1,000-token quota was
    admitted (each checked against a spend nobody had charged yet)."""
    # The upstream holds every answer until all the others were answered: the requests
    # overlap however slowly a loaded machine runs them.
    gate = asyncio.Event()
    upstream.default = Json(dict(chat_completion(), usage=USAGE), gate=gate)
    limits = (
        {"token_quota": {"tokens": 1000, "period": "day"}}
        if limit == "quota"
        else {"budget": {"usd": 0.01, "period": "month"}}
    )
    gw = await gateway(routes(upstream, priced=True), keys(a=limits))
    body = chat_body(max_tokens=MAX_TOKENS)
    # At most 100 requests open at once (the test's own open-file limit): the rest wait
    # for a slot and arrive while the first two still run, as the first 100 do. A
    # semaphore, not httpx's pool limit: its queue is rescanned for every request.
    slots = asyncio.Semaphore(100)

    async def post(client: httpx.AsyncClient) -> httpx.Response:
        async with slots:
            return await client.post(
                f"{gw.base_url}/chat/completions", json=body, headers=auth("a")
            )

    limits_ = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=60, limits=limits_) as client:
        posts = [asyncio.ensure_future(post(client)) for _ in range(concurrent)]
        # Every request but those the upstream holds has its answer: then it may answer.
        await until(lambda: sum(p.done() for p in posts) >= concurrent - 2, within=50)
        assert len(upstream.requests) == 2
        gate.set()
        answers = await asyncio.gather(*posts)
        served = [r for r in answers if r.status_code == 200]
        refused = [r for r in answers if r.status_code != 200]
        for r in refused:
            assert_envelope(r, 429, "subscription_limit")
        info = await key_usage(client, gw, "a")
    period = info["usage"]["day" if limit == "quota" else "month"]
    # The first holds its whole ask (5 + 800 = 805 of 1,000 tokens), the second what is
    # left (195) and costs 800: overshoot 605, the largest real charge minus its hold.
    assert len(served) == 2 and len(upstream.requests) == 2
    if limit == "quota":
        assert period["tokens"] == 1600 <= 1000 + (800 - 195)
    else:
        assert period["cost_usd"] == pytest.approx(0.016)
        assert period["cost_usd"] <= 0.01 + (0.008 - 0.00195) + 1e-9


async def test_a_small_quota_serves_one_request_at_a_time(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gate = asyncio.Event()  # the first answer waits until the second was refused
    upstream.script(Json(dict(chat_completion(), usage=USAGE), gate=gate))
    upstream.default = Json(dict(chat_completion(), usage={"total_tokens": 10}))
    gw = await gateway(routes(upstream), keys(a={"token_quota": 3000}))
    url = f"{gw.base_url}/chat/completions"
    first = asyncio.ensure_future(client.post(url, json=chat_body(), headers=auth("a")))
    await until(lambda: len(upstream.requests) == 1)
    # The first holds prompt + 4,096 capped at 3,000: nothing is left while it runs.
    r = await client.post(url, json=chat_body(), headers=auth("a"))
    error = assert_envelope(r, 429, "subscription_limit")
    assert error["details"]["held"] == 3000
    gate.set()
    assert (await first).status_code == 200
    # Its hold is settled once its endpoint ends, which may be just after the answer.
    await until(lambda: gw.runtime.limiter.usage["a"].held_tokens == 0)
    r = await client.post(url, json=chat_body(), headers=auth("a"))
    assert r.status_code == 200, r.text  # settled at 800: the next one fits
    info = await key_usage(client, gw, "a")
    assert info["usage"]["total"]["tokens"] == 810


async def test_a_stream_left_before_its_usage_is_charged_the_estimate(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: five cut streams cost $0 and 25 tokens; read to the end, $0.11."""
    caplog.set_level(logging.INFO, logger="gateway.access")
    upstream.script(Sse([chunk("x" * 400), chunk("y" * 400), chunk("z")], hang_after=2))
    gw = await gateway(routes(upstream, priced=True), keys(a={"budget": {"usd": 5}}))
    prompt = "p" * 4000
    body = chat_body(prompt, stream=True)
    async with client.stream(
        "POST", f"{gw.base_url}/chat/completions", json=body, headers=auth("a")
    ) as r:
        assert r.status_code == 200
        async for part in r.aiter_bytes():
            if b"y" * 400 in part:
                break
    await upstream.wait_closed(5)
    spent = await until_charged(client, gw)
    # prompt: 4,000 + "role" "user" "content" = 4,015 bytes, 1,004 tokens; output: 800
    # relayed bytes, 200 tokens; at $10 per 1M each.
    assert spent["tokens"] == 1004 + 200
    assert spent["cost_usd"] == pytest.approx(1204 * 10 / 1e6)
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "gateway.access"]
    served = [line for line in lines if line.get("path") == "/chat/completions"]
    assert served and served[-1]["usage"] == "estimated"
    assert served[-1]["tokens_charged"] == 1204 and served[-1]["client_disconnected"]


async def until_charged(client: httpx.AsyncClient, gw: RunningGateway) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def charged() -> bool:
        seen.update((await key_usage(client, gw, "a"))["usage"]["total"])
        return bool(seen["tokens"])

    for _ in range(250):
        if await charged():
            return seen
        await asyncio.sleep(0.02)
    raise AssertionError("the request was never charged")


async def test_a_prompt_hidden_in_tools_is_charged_when_no_usage_comes(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """Before: a 400 KB prompt in `tools` was charged 25 tokens."""
    upstream.script(Hang())
    gw = await gateway(routes(upstream), keys(a={"token_quota": 10_000_000}))
    tool = {"type": "function", "function": {"name": "f", "description": "d" * 400_000}}
    body = chat_body(stream=True, tools=[tool])
    task = asyncio.ensure_future(
        client.post(f"{gw.base_url}/chat/completions", json=body, headers=auth("a"))
    )
    await until(lambda: len(upstream.requests) == 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await upstream.wait_closed(5)
    spent = await until_charged(client, gw)
    assert spent["tokens"] >= 100_000


async def test_a_prompt_bigger_than_what_remains_is_refused_before_any_upstream(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"token_quota": 1000}))
    r = await client.post(
        f"{gw.base_url}/chat/completions", json=chat_body("s" * 8000), headers=auth("a")
    )
    assert_envelope(r, 429, "subscription_limit")
    assert upstream.requests == []


async def test_an_upstream_error_or_a_failed_request_is_not_charged(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Json({"error": {"message": "bad"}}, status=400))
    gw = await gateway(routes(upstream), keys(a={"token_quota": 10_000}))
    r = await client.post(f"{gw.base_url}/chat/completions", json=chat_body(), headers=auth("a"))
    assert r.status_code == 400
    info = await key_usage(client, gw, "a")
    assert info["usage"]["total"]["tokens"] == 0
    assert gw.runtime.limiter.usage["a"].held_tokens == 0  # its hold was let go


# --- count_tokens ------------------------------------------------------------------------


async def test_count_tokens_is_never_charged_nor_counted_in_rpm(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.default = Json({"input_tokens": 12})
    limits = {"rpm": 1, "token_quota": 100_000, "count_tokens_rpm": 5}
    gw = await gateway(routes(upstream, apis="messages"), keys(a=limits))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    url = f"{gw.url}/v1/messages/count_tokens"
    answers = await asyncio.gather(
        *(client.post(url, json=body, headers=auth("a")) for _ in range(5))
    )
    assert [r.status_code for r in answers] == [200] * 5
    r = await client.post(url, json=body, headers=auth("a"))  # the sixth in a minute
    assert r.status_code == 429
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1
    info = await key_usage(client, gw, "a")
    assert info["usage"]["total"] == {**info["usage"]["total"], "requests": 0, "tokens": 0}
    # rpm 1 is still whole for a real request.
    upstream.default = Json({"id": "msg_1", "type": "message", "model": "upstream-model",
                             "content": [], "usage": {"input_tokens": 3, "output_tokens": 4}})  # fmt: skip
    r = await client.post(
        f"{gw.url}/v1/messages", json={**body, "max_tokens": 10}, headers=auth("a")
    )
    assert r.status_code == 200, r.text
    assert len(upstream.requests) == 6


# --- Responses ids -----------------------------------------------------------------------


def response_obj(rid: str) -> dict[str, Any]:
    return {"id": rid, "object": "response", "model": "upstream-model", "status": "completed",
            "output": [], "usage": {"input_tokens": 1, "output_tokens": 1}}  # fmt: skip


async def make_response(
    client: httpx.AsyncClient, gw: RunningGateway, upstream: Upstream, name: str, rid: str
) -> None:
    upstream.script(Json(response_obj(rid)))
    r = await client.post(
        f"{gw.base_url}/responses", json={"model": "m", "input": "hi"}, headers=auth(name)
    )
    assert r.status_code == 200 and r.json()["id"] == rid


async def test_another_keys_response_id_is_unknown_whatever_it_is_asked(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={}, b={}))
    await make_response(client, gw, upstream, "a", "resp_secret")
    before = len(upstream.requests)
    base = f"{gw.base_url}/responses/resp_secret"
    asks = [
        client.get(base, headers=auth("b")),
        client.delete(base, headers=auth("b")),
        client.get(f"{base}/input_items", headers=auth("b")),
        client.post(f"{base}/cancel", headers=auth("b")),
        client.post(f"{gw.base_url}/responses", headers=auth("b"),
                    json={"previous_response_id": "resp_secret", "input": "more"}),
        client.post(f"{gw.base_url}/responses", headers=auth("b"),
                    json={"model": "m", "previous_response_id": "resp_secret", "input": "x"}),
    ]  # fmt: skip
    for r in await asyncio.gather(*asks):
        body = assert_envelope(r, 404, "response_not_found")
        assert '"m"' not in r.text and "upstream-model" not in r.text, body
    assert len(upstream.requests) == before  # nothing was sent upstream for b
    upstream.default = Json(response_obj("resp_secret"))
    r = await client.get(base, headers=auth("a"))  # its maker still reaches it
    assert r.status_code == 200 and r.json()["model"] == "m"


async def test_one_keys_ids_never_evict_anothers(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={}, b={}), response_ids_per_key=3)
    await make_response(client, gw, upstream, "b", "resp_b")
    for i in range(10):
        await make_response(client, gw, upstream, "a", f"resp_a{i}")
    ids = gw.runtime.response_ids
    assert ids.held_by("a") == 3 and ids.held_by("b") == 1
    upstream.default = Json(response_obj("resp_b"))
    assert (
        await client.get(f"{gw.base_url}/responses/resp_b", headers=auth("b"))
    ).status_code == 200
    r = await client.get(f"{gw.base_url}/responses/resp_a0", headers=auth("a"))
    assert_envelope(r, 404, "response_not_found")  # a's own oldest went, not b's


async def test_an_upstream_repeating_an_id_cannot_hand_it_to_another_key(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={}, b={}))
    await make_response(client, gw, upstream, "a", "resp_same")
    await make_response(client, gw, upstream, "b", "resp_same")  # the upstream repeats it
    before = len(upstream.requests)
    r = await client.get(f"{gw.base_url}/responses/resp_same", headers=auth("b"))
    assert_envelope(r, 404, "response_not_found")
    assert len(upstream.requests) == before


def test_a_hundred_thousand_ids_from_one_key_leave_the_others_alone() -> None:
    from gateway.families.responses import ResponseIds

    ids = ResponseIds(per_key=10_000, clock=lambda: 0.0)
    ids.remember("resp_b", "m", "p", "u", "b")
    for i in range(100_000):
        ids.remember(f"resp_{i}", "m", "p", "u", "a")
    assert ids.held_by("a") == 10_000 and len(ids) == 10_001
    assert ids.find("resp_b", "b") is not None
    assert ids.find("resp_99999", "a") is not None and ids.find("resp_0", "a") is None


# --- a slug from a path ------------------------------------------------------------------


async def test_a_control_character_in_a_deployment_path_is_refused_before_any_upstream(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream))
    r = await client.post(
        f"{gw.url}/openai/deployments/m%0D%0AX-Injected:%201/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
    )
    error = assert_envelope(r, 422, "validation_error")
    assert error["details"] == {"field": "model"}
    assert upstream.requests == []
    assert "x-injected" not in {k.lower() for k in r.headers}


async def test_a_stream_read_to_its_end_is_charged_its_usage(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """The control for the cut stream: read whole, its usage (not the estimate)."""
    usage = chunk(None, choices=[], usage={"prompt_tokens": 3, "completion_tokens": 2,
                                           "total_tokens": 5})  # fmt: skip
    upstream.script(Sse([chunk("hello"), usage, DONE]))
    gw = await gateway(routes(upstream), keys(a={"token_quota": 1000}))
    r = await client.post(
        f"{gw.base_url}/chat/completions", json=chat_body(stream=True), headers=auth("a")
    )
    assert r.status_code == 200
    assert (await key_usage(client, gw, "a"))["usage"]["total"]["tokens"] == 5


async def test_a_relayed_final_failure_carries_one_x_should_retry(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """An upstream's own x-should-retry: true must not sit beside the gateway's false."""
    upstream.default = Json({"error": {"message": "busy"}}, status=503,
                            headers=[("x-should-retry", "true")])  # fmt: skip
    gw = await gateway(routes(upstream))
    r = await client.post(f"{gw.base_url}/chat/completions", json=chat_body())
    assert r.status_code == 503
    assert r.headers.get_list("x-should-retry") == ["false"]
