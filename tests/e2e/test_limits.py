"""Per-key rpm / tpm / token_quota over real sockets, with a fake limiter clock.

Keys use plain `key:` secrets. Usage comes from the upstream's `usage` (JSON body or the
stream's usage chunk); the gateway injects `stream_options.include_usage` when it counts
tokens and the client did not ask, and hides the usage-only chunk it caused.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.scripted_upstream import DONE, Hang, Json, Sse, Upstream, chunk

MESSAGES = [{"role": "user", "content": "hi"}]
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
RESET = re.compile(r"(\d+ms|\d+s|\d+m\d+s)")
USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def routes(upstream: Upstream, stream_usage: bool | None = None) -> str:
    provider: dict[str, Any] = {"base_url": upstream.url, "api_key": "sk-up"}
    if stream_usage is not None:
        provider["stream_usage"] = stream_usage
    return yaml.safe_dump(
        {
            "providers": {"p": provider},
            "models": {"m": {"providers": [{"provider": "p", "model": "upstream-model"}]}},
        },
        sort_keys=False,
    )


def keys(**entries: dict[str, Any]) -> str:
    """keys.yaml with one plain-secret entry per name: secret `sk-NAME`."""
    return yaml.safe_dump(
        {"keys": [{"name": n, "key": f"sk-{n}", **limits} for n, limits in entries.items()]},
        sort_keys=False,
    )


def fake_clock(gw: RunningGateway, start: float = 1000.0) -> list[float]:
    t = [start]
    gw.runtime.limiter.clock = lambda: t[0]
    return t


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer sk-{name}"}


async def chat(
    client: httpx.AsyncClient, gw: RunningGateway, name: str, **body: Any
) -> httpx.Response:
    payload = {"model": "m", "messages": MESSAGES, **body}
    return await client.post(f"{gw.base_url}/chat/completions", json=payload, headers=auth(name))


async def post_raw(
    client: httpx.AsyncClient, gw: RunningGateway, name: str, raw: bytes
) -> httpx.Response:
    headers = {**auth(name), "content-type": "application/json"}
    return await client.post(f"{gw.base_url}/chat/completions", content=raw, headers=headers)


def code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def one(r: httpx.Response, name: str) -> str:
    """The header's single value (a repeated rate-limit header confuses SDKs)."""
    values = r.headers.get_list(name)
    assert len(values) == 1, (name, values)
    return values[0]


def usage_chunk(usage: dict[str, int] = USAGE) -> bytes:
    return chunk(None, choices=[], usage=usage)


def rewritten(data: bytes) -> bytes:
    return data.replace(b'"model": "upstream-model"', b'"model": "m"')


def spent(gw: RunningGateway, name: str) -> int:
    return gw.runtime.limiter.usage[name].spent


async def until(predicate: Any, within: float = 5.0) -> None:
    """Poll `predicate()` every 10 ms, up to `within` seconds."""
    for _ in range(int(within / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    assert predicate(), "condition not met in time"


# --- rpm ------------------------------------------------------------------------------


async def test_rpm_fourth_request_refused_with_retry_after_then_refills(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"rpm": 3}))
    t = fake_clock(gw)
    for remaining in ("2", "1", "0"):
        r = await chat(client, gw, "a")
        assert r.status_code == 200, r.text
        assert one(r, "x-ratelimit-remaining-requests") == remaining
    r = await chat(client, gw, "a")
    assert r.status_code == 429
    assert code(r) == "rate_limited"
    assert one(r, "retry-after") == "20"  # 60 s / 3 requests until one is back
    assert len(upstream.requests) == 3  # a refused request never reaches the upstream

    t[0] += 0.5  # 19.5 s to go: whole seconds, rounded up
    r = await chat(client, gw, "a")
    assert r.status_code == 429
    assert one(r, "retry-after") == "20"

    t[0] = 1000.0 + 60 / 3
    r = await chat(client, gw, "a")
    assert r.status_code == 200, r.text
    r = await chat(client, gw, "a")  # only one came back
    assert r.status_code == 429
    assert code(r) == "rate_limited"
    assert int(one(r, "retry-after")) >= 1
    assert len(upstream.requests) == 4


async def test_rpm_exact_under_concurrency(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.default = Json(delay=0.05)  # admitted requests overlap the refused ones
    gw = await gateway(routes(upstream), keys(a={"rpm": 20}))
    fake_clock(gw)
    results = await asyncio.gather(*(chat(client, gw, "a") for _ in range(50)))
    statuses = [r.status_code for r in results]
    assert statuses.count(200) == 20, statuses
    assert statuses.count(429) == 30, statuses
    assert all(code(r) == "rate_limited" for r in results if r.status_code == 429)
    assert len(upstream.requests) == 20


# --- tpm and token_quota --------------------------------------------------------------


async def test_tpm_checked_before_charged_after_overshoot_allowed(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"tpm": 10}))  # upstream reports 7 tokens
    t = fake_clock(gw)
    r1 = await chat(client, gw, "a")
    assert r1.status_code == 200, r1.text
    assert one(r1, "x-ratelimit-remaining-tokens") == "10"
    r2 = await chat(client, gw, "a")  # 3 left: admitted, then charged 7 (overshoot)
    assert r2.status_code == 200, r2.text
    assert one(r2, "x-ratelimit-remaining-tokens") == "3"
    assert spent(gw, "a") == 14
    r3 = await chat(client, gw, "a")
    assert r3.status_code == 429
    assert code(r3) == "rate_limited"
    wait = int(one(r3, "retry-after"))
    assert wait >= 1
    assert len(upstream.requests) == 2

    t[0] += wait  # Retry-After is honest: waiting that long is enough
    r4 = await chat(client, gw, "a")
    assert r4.status_code == 200, r4.text
    assert one(r3, "x-ratelimit-remaining-tokens") == "0"


async def test_token_quota_spent_is_subscription_limit(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"token_quota": 14}))
    t = fake_clock(gw)
    assert (await chat(client, gw, "a")).status_code == 200
    # 7 of 14 used: the prompt's estimate (5 tokens) fits what remains (SPEC §13)
    assert (await chat(client, gw, "a")).status_code == 200
    r = await chat(client, gw, "a")
    assert r.status_code == 429
    assert code(r) == "subscription_limit"
    t[0] += 3600  # a quota does not refill with time
    r = await chat(client, gw, "a")
    assert r.status_code == 429
    assert code(r) == "subscription_limit"
    assert len(upstream.requests) == 2


# --- headers --------------------------------------------------------------------------


async def test_rate_limit_headers_on_every_response_to_a_limited_key(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"rpm": 2, "tpm": 100}))
    fake_clock(gw)

    def check(r: httpx.Response, requests: str | None, tokens: str) -> None:
        for name in RATE_HEADERS:
            one(r, name)
        assert one(r, "x-ratelimit-limit-requests") == "2"
        assert one(r, "x-ratelimit-limit-tokens") == "100"
        if requests is not None:
            assert one(r, "x-ratelimit-remaining-requests") == requests
        assert one(r, "x-ratelimit-remaining-tokens") == tokens
        assert RESET.fullmatch(one(r, "x-ratelimit-reset-requests")), r.headers
        assert RESET.fullmatch(one(r, "x-ratelimit-reset-tokens")), r.headers

    r = await chat(client, gw, "a")  # JSON, charged 7
    assert r.status_code == 200, r.text
    check(r, "1", "100")

    upstream.script(Sse([chunk("a"), usage_chunk({"total_tokens": 7}), DONE]))
    r = await chat(client, gw, "a", stream=True)  # stream, charged 7
    assert r.status_code == 200, r.text
    check(r, "0", "93")

    r = await chat(client, gw, "a", model="no-such-model")
    assert r.status_code == 400
    assert code(r) == "model_not_found"
    check(r, None, "86")

    r = await chat(client, gw, "a")
    assert r.status_code == 429
    assert code(r) == "rate_limited"
    check(r, "0", "86")


async def test_unlimited_key_gets_no_rate_limit_headers(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(free={}, a={"rpm": 5}))
    upstream.script(Json(), Sse([chunk("a"), DONE]))
    responses = [
        await chat(client, gw, "free"),
        await chat(client, gw, "free", stream=True),
        await chat(client, gw, "free", model="no-such-model"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 400]
    for r in responses:
        assert not [h for h in r.headers if h.startswith("x-ratelimit")], r.headers
    # The limited key on the same gateway does get them.
    r = await chat(client, gw, "a")
    assert one(r, "x-ratelimit-limit-requests") == "5"


async def test_limits_are_per_key(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(
        routes(upstream), keys(a={"rpm": 1}, b={"rpm": 1}, q={"token_quota": 5}, free={})
    )
    fake_clock(gw)
    assert (await chat(client, gw, "a")).status_code == 200
    assert (await chat(client, gw, "a")).status_code == 429
    r = await chat(client, gw, "b")
    assert r.status_code == 200, r.text
    assert one(r, "x-ratelimit-remaining-requests") == "0"
    assert (await chat(client, gw, "b")).status_code == 429
    assert (await chat(client, gw, "q")).status_code == 200
    assert code(await chat(client, gw, "q")) == "subscription_limit"
    for _ in range(3):
        assert (await chat(client, gw, "free")).status_code == 200
    assert spent(gw, "q") == 7
    assert gw.runtime.limiter.usage.get("a") is None or spent(gw, "a") == 0


# --- streams --------------------------------------------------------------------------


STREAM_RAW = (
    b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}],'
    b' "temperature": 0.5}'
)


async def test_stream_usage_injected_and_its_chunk_hidden(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"tpm": 1000}))
    fake_clock(gw)
    events = [chunk(None, choices=[{"index": 0, "delta": {"role": "assistant"}}]), chunk("Hel")]
    events += [
        chunk("lo"),
        chunk(None, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ]
    upstream.script(Sse([*events, usage_chunk(), DONE]))
    r = await post_raw(client, gw, "a", STREAM_RAW)
    assert r.status_code == 200, r.text
    sent = upstream.requests[-1].json()
    assert sent["stream_options"] == {"include_usage": True}
    client_fields = json.loads(STREAM_RAW)
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        **client_fields,
        "model": "upstream-model",
    }
    assert r.content == rewritten(b"".join(events) + DONE)
    assert spent(gw, "a") == 12


async def test_stream_usage_client_asked_is_relayed_and_body_unchanged(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"tpm": 1000}))
    fake_clock(gw)
    raw = (
        b'{"model": "m", "stream": true, "stream_options": {"include_usage": true},'
        b' "messages": [{"role": "user", "content": "hi"}]}'
    )
    events = [chunk("Hel"), chunk("lo"), usage_chunk(), DONE]
    upstream.script(Sse(events))
    r = await post_raw(client, gw, "a", raw)
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].body == raw.replace(b'"m"', b'"upstream-model"')
    assert r.content == rewritten(b"".join(events))
    assert spent(gw, "a") == 12


async def test_stream_include_usage_false_counts_as_not_asking(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"tpm": 1000}))
    fake_clock(gw)
    events = [chunk("Hel"), chunk("lo")]
    upstream.script(Sse([*events, usage_chunk(), DONE]))
    r = await chat(client, gw, "a", stream=True, stream_options={"include_usage": False})
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].json()["stream_options"] == {"include_usage": True}
    assert r.content == rewritten(b"".join(events) + DONE)
    assert spent(gw, "a") == 12


async def test_provider_without_stream_usage_never_injected(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream, stream_usage=False), keys(a={"tpm": 1000}))
    fake_clock(gw)
    events = [chunk("Hel"), chunk("lo"), DONE]
    upstream.script(Sse(events), Sse(events))
    r = await post_raw(client, gw, "a", STREAM_RAW)
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].body == STREAM_RAW.replace(b'"m"', b'"upstream-model"')
    assert r.content == rewritten(b"".join(events))
    r = await chat(client, gw, "a", stream=True, stream_options={"include_usage": False})
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].json()["stream_options"] == {"include_usage": False}


async def test_stream_usage_tokens_are_charged(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"tpm": 10}))
    fake_clock(gw)
    upstream.script(Sse([chunk("Hel"), chunk("lo"), usage_chunk(), DONE]))
    r = await chat(client, gw, "a", stream=True)
    assert r.status_code == 200, r.text
    assert spent(gw, "a") == 12
    r = await chat(client, gw, "a", stream=True)  # 10 - 12 < 0: refused
    assert r.status_code == 429
    assert code(r) == "rate_limited"
    assert len(upstream.requests) == 1


async def test_client_disconnect_mid_stream_charges_an_estimate(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"tpm": 100000}))
    fake_clock(gw)
    prompt, content = "x" * 400, "y" * 200
    upstream.script(Sse([chunk(content), chunk("z"), usage_chunk(), DONE], hang_after=1))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": prompt}]}
    url = f"{gw.base_url}/chat/completions"
    async with client.stream("POST", url, json=body, headers=auth("a")) as r:
        assert r.status_code == 200
        got = b""
        async for part in r.aiter_raw():
            got += part
            if content.encode() in got:
                break  # leave with the stream open: no usage chunk has come
    await upstream.wait_closed(5)
    await until(lambda: "a" in gw.runtime.limiter.usage and spent(gw, "a") > 0)
    # A quarter of prompt + relayed content characters: (400 + 200) / 4 = 150.
    assert 140 <= spent(gw, "a") <= 160, spent(gw, "a")


async def test_client_disconnect_before_any_content_still_charged(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"token_quota": 100000}))
    fake_clock(gw)
    upstream.script(Hang())
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x" * 40}]}
    task = asyncio.ensure_future(
        client.post(f"{gw.base_url}/chat/completions", json=body, headers=auth("a"))
    )
    await until(lambda: len(upstream.requests) == 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await upstream.wait_closed(5)
    await until(lambda: "a" in gw.runtime.limiter.usage and spent(gw, "a") > 0)
    # The prompt estimate alone: every string the upstream reads, 4 bytes a token:
    # "role" "user" "content" and 40 x: 55 bytes, 14 tokens (SPEC §13).
    assert spent(gw, "a") == 14, spent(gw, "a")
