"""Routing end to end against real loopback upstreams: the strategies, the circuit breaker
driven by an injected clock, max_attempts, request-level `models` fallback, the key's
allow-list over every listed slug, and the OpenAI SDK's retries against the gateway."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.scripted_upstream import DONE, Drop, Json, Reply, Sse, Upstream, chat_completion, chunk

MakeUpstream = Callable[[], Awaitable[Upstream]]
MESSAGES = [{"role": "user", "content": "hi"}]


def routes(providers: dict[str, str], models: dict[str, dict[str, Any]]) -> str:
    """Providers by name -> URL; models as given."""
    doc = {"providers": {n: {"base_url": u} for n, u in providers.items()}, "models": models}
    return yaml.safe_dump(doc, sort_keys=False)


def model(*names: str, **opts: Any) -> dict[str, Any]:
    """A model served by the named providers (upstream model `up-<name>`), in that order."""
    return {"providers": [{"provider": n, "model": f"up-{n}"} for n in names], **opts}


async def upstreams(make_upstream: MakeUpstream, *names: str) -> dict[str, Upstream]:
    return {n: await make_upstream() for n in names}


def urls(ups: dict[str, Upstream]) -> dict[str, str]:
    return {n: u.url for n, u in ups.items()}


async def chat(client: httpx.AsyncClient, gw: RunningGateway, **body: Any) -> httpx.Response:
    return await client.post(
        f"{gw.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES, **body}
    )


async def until(cond: Callable[[], bool], within: float = 3.0) -> None:
    """Bounded wait for a condition the test cannot await directly."""
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def counts(ups: dict[str, Upstream]) -> dict[str, int]:
    return {n: len(u.requests) for n, u in ups.items()}


FAIL_500 = Json({"error": {"message": "down"}}, status=500)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- strategies -----------------------------------------------------------------------


async def test_round_robin_alternates_exactly(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b", "c")
    gw = await gateway(routes(urls(ups), {"m": model("a", "b", "c", strategy="round_robin")}))
    served = []
    for _ in range(9):
        r = await chat(client, gw)
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-attempts"] == "1"
        assert r.json()["model"] == "m"
        served.append(r.headers["x-gateway-provider"])
    assert served == ["a", "b", "c"] * 3
    assert counts(ups) == {"a": 3, "b": 3, "c": 3}
    for name, up in ups.items():
        assert all(req.json()["model"] == f"up-{name}" for req in up.requests)


async def test_round_robin_failure_moves_to_the_next_in_rotation(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b", "c")
    ups["b"].script(FAIL_500)
    gw = await gateway(routes(urls(ups), {"m": model("a", "b", "c", strategy="round_robin")}))
    seen = []
    for _ in range(6):
        r = await chat(client, gw)
        assert r.status_code == 200, r.text
        seen.append((r.headers["x-gateway-provider"], r.headers["x-gateway-attempts"]))
    # The second request starts at b, which fails: c serves it after two attempts.
    assert seen == [("a", "1"), ("c", "2"), ("c", "1"), ("a", "1"), ("b", "1"), ("c", "1")]


async def test_weighted_distribution_and_weight_zero(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "heavy", "light", "never")
    targets = [
        {"provider": "heavy", "weight": 3},
        {"provider": "light", "weight": 1},
        {"provider": "never", "weight": 0},
    ]
    gw = await gateway(routes(urls(ups), {"m": {"strategy": "weighted", "providers": targets}}))
    gw.runtime.strategies.rng = random.Random(1234)
    served: Counter[str] = Counter()
    for _ in range(8):  # 200 requests, 25 at a time (the order does not depend on load)
        for r in await asyncio.gather(*(chat(client, gw) for _ in range(25))):
            assert r.status_code == 200, r.text
            served[r.headers["x-gateway-provider"]] += 1
    assert served.total() == 200
    heavy = served["heavy"] / 200
    assert 0.60 <= heavy <= 0.90, served
    assert served["light"] >= 20, served
    assert served["never"] == 0
    assert ups["never"].requests == []
    assert counts(ups) == {"heavy": served["heavy"], "light": served["light"], "never": 0}


async def test_least_busy_prefers_the_idle_provider(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    ups["a"].script(Json(delay=0.6))
    gw = await gateway(routes(urls(ups), {"m": model("a", "b", strategy="least_busy")}))
    # Both idle: the first goes to a (model order) and is held there.
    held = asyncio.ensure_future(chat(client, gw))
    await until(lambda: len(ups["a"].requests) == 1)
    r = await chat(client, gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "b"
    assert r.headers["x-gateway-attempts"] == "1"
    assert len(ups["a"].requests) == 1
    # a still busy, b idle: the next goes to b, and is held there too.
    ups["b"].script(Json(delay=1.0))
    held_b = asyncio.ensure_future(chat(client, gw))
    await until(lambda: len(ups["b"].requests) == 2)
    assert len(ups["a"].requests) == 1
    first = await held
    assert first.headers["x-gateway-provider"] == "a"
    health = gw.runtime.health
    await until(lambda: health.state(("a", "up-a", "")).in_flight == 0)
    # Now a is free while b is busy: a serves.
    r = await chat(client, gw)
    assert r.headers["x-gateway-provider"] == "a"
    assert (await held_b).headers["x-gateway-provider"] == "b"
    assert counts(ups) == {"a": 2, "b": 2}


async def test_latency_prefers_the_faster_provider(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "slow", "fast")
    ups["slow"].default = Json(delay=0.2)
    gw = await gateway(routes(urls(ups), {"m": model("slow", "fast", strategy="latency")}))
    gw.runtime.strategies.rng = random.Random(7)
    # Warm-up: each provider gets measured.
    for _ in range(2):
        assert (await chat(client, gw)).status_code == 200
    assert len(ups["slow"].requests) >= 1 and len(ups["fast"].requests) >= 1
    served: Counter[str] = Counter()
    for _ in range(30):
        r = await chat(client, gw)
        assert r.status_code == 200, r.text
        served[r.headers["x-gateway-provider"]] += 1
    # Exploration may send an occasional request to the slow one; most go to the fast one.
    assert served["fast"] >= 24, served


async def test_attempts_header_counts_every_try_streaming(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b", "c")
    ups["a"].script(FAIL_500)
    ups["b"].script(Drop())
    served = [chunk("x", model="up-c"), DONE]
    ups["c"].script(Sse(served))
    gw = await gateway(routes(urls(ups), {"m": model("a", "b", "c")}))
    r = await chat(client, gw, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "c"
    assert r.headers["x-gateway-attempts"] == "3"
    assert r.content == b"".join(served).replace(b'"up-c"', b'"m"')


# --- circuit breaker with an injected clock -------------------------------------------


async def test_breaker_open_half_open_failed_probe_then_closed(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    ups["a"].default = FAIL_500
    gw = await gateway(routes(urls(ups), {"m": model("a", "b")}))
    clock = FakeClock()
    gw.runtime.health.clock = clock

    async def served_by() -> tuple[str, str]:
        r = await chat(client, gw)
        assert r.status_code == 200, r.text
        return r.headers["x-gateway-provider"], r.headers["x-gateway-attempts"]

    for _ in range(3):
        assert await served_by() == ("b", "2")
    assert len(ups["a"].requests) == 3
    # Open: a gets nothing for the default 30 s.
    assert await served_by() == ("b", "1")
    clock.now += 29.9
    assert await served_by() == ("b", "1")
    assert len(ups["a"].requests) == 3
    # Cooled down: one live request probes a; it fails, and a reopens at once.
    clock.now += 0.1
    assert await served_by() == ("b", "2")
    assert len(ups["a"].requests) == 4
    assert await served_by() == ("b", "1")
    clock.now += 29.9
    assert await served_by() == ("b", "1")
    assert len(ups["a"].requests) == 4
    # The next probe succeeds: closed again, a serves every request.
    ups["a"].default = Json()
    clock.now += 0.1
    assert await served_by() == ("a", "1")
    for _ in range(3):
        assert await served_by() == ("a", "1")
    assert len(ups["a"].requests) == 8
    # Closed means the failure count restarted: one failure does not reopen it.
    ups["a"].script(FAIL_500)
    assert await served_by() == ("b", "2")
    assert await served_by() == ("a", "1")


async def test_breaker_half_open_lets_exactly_one_probe_through(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    ups["a"].script(FAIL_500, FAIL_500, FAIL_500, Json(delay=0.5))
    gw = await gateway(routes(urls(ups), {"m": model("a", "b")}))
    clock = FakeClock()
    gw.runtime.health.clock = clock
    for _ in range(3):
        assert (await chat(client, gw)).status_code == 200
    clock.now += 30
    probe = asyncio.ensure_future(chat(client, gw))
    await until(lambda: len(ups["a"].requests) == 4)
    # While the probe is out, other requests skip a.
    for _ in range(3):
        r = await chat(client, gw)
        assert r.headers["x-gateway-provider"] == "b"
        assert r.headers["x-gateway-attempts"] == "1"
    assert len(ups["a"].requests) == 4
    r = await probe
    assert r.status_code == 200
    assert r.headers["x-gateway-provider"] == "a"
    assert (await chat(client, gw)).headers["x-gateway-provider"] == "a"


async def test_breaker_cooldown_setting_honoured(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    ups["a"].default = FAIL_500
    gw = await gateway(
        routes(urls(ups), {"m": model("a", "b", cooldown={"failures": 2, "seconds": 10})})
    )
    clock = FakeClock()
    gw.runtime.health.clock = clock
    for _ in range(2):
        assert (await chat(client, gw)).headers["x-gateway-attempts"] == "2"
    r = await chat(client, gw)
    assert r.headers["x-gateway-attempts"] == "1"
    assert len(ups["a"].requests) == 2  # open after two failures, not three
    clock.now += 9.9
    assert (await chat(client, gw)).headers["x-gateway-attempts"] == "1"
    assert len(ups["a"].requests) == 2
    clock.now += 0.1
    r = await chat(client, gw)
    assert r.headers["x-gateway-attempts"] == "2"
    assert len(ups["a"].requests) == 3  # probed after 10 s, not 30


async def test_breaker_honours_upstream_retry_after(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    ups["a"].default = Json(
        {"error": {"message": "slow down"}}, status=429, headers=[("Retry-After", "60")]
    )
    gw = await gateway(
        routes(urls(ups), {"m": model("a", "b", cooldown={"failures": 2, "seconds": 10})})
    )
    clock = FakeClock()
    gw.runtime.health.clock = clock
    for _ in range(2):
        r = await chat(client, gw)
        assert r.status_code == 200
        assert r.headers["x-gateway-attempts"] == "2"
    for step in (10.0, 49.9):  # 10 s (the configured cooldown), then 59.9 s in all
        clock.now += step
        r = await chat(client, gw)
        assert r.headers["x-gateway-attempts"] == "1", clock.now
        assert len(ups["a"].requests) == 2
    clock.now += 0.1
    r = await chat(client, gw)
    assert r.headers["x-gateway-attempts"] == "2"
    assert len(ups["a"].requests) == 3


async def test_every_candidate_cooling_down_is_503_saying_when(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    ups["a"].default = FAIL_500  # opens for 20 s
    ups["b"].default = Json(
        {"error": {"message": "busy"}}, status=429, headers=[("Retry-After", "60")]
    )
    gw = await gateway(
        routes(urls(ups), {"m": model("a", "b", cooldown={"failures": 1, "seconds": 20})})
    )
    clock = FakeClock()
    gw.runtime.health.clock = clock
    r = await chat(client, gw)
    assert r.status_code == 429
    clock.now += 7.5
    r = await chat(client, gw)
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "no_provider_available"
    assert err["details"]["retry_after_seconds"] == pytest.approx(12.5, abs=0.01)
    assert r.headers["retry-after"] == "13"
    assert r.headers["x-should-retry"] == "false"
    assert r.headers.get("x-request-id")
    assert counts(ups) == {"a": 1, "b": 1}
    # Once the earlier one cools down, it is probed.
    clock.now += 12.5
    r = await chat(client, gw)
    assert counts(ups) == {"a": 2, "b": 1}


# --- attempts budget, request-level fallback, allow-list ------------------------------


async def test_max_attempts_two_of_three_failing(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b", "c")
    for name, up in ups.items():
        up.default = Json({"error": {"message": name}}, status=500)
    gw = await gateway(routes(urls(ups), {"m": model("a", "b", "c", max_attempts=2)}))
    r = await chat(client, gw)
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "b"}}
    assert r.headers["x-gateway-attempts"] == "2"
    assert r.headers["x-should-retry"] == "false"
    assert counts(ups) == {"a": 1, "b": 1, "c": 0}


@pytest.mark.parametrize("stream", [False, True])
async def test_models_list_falls_back_across_slugs(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient, stream: bool
) -> None:
    ups = await upstreams(make_upstream, "a1", "a2", "b1")
    ups["a1"].script(FAIL_500)
    ups["a2"].script(Json({"error": {"message": "busy"}}, status=503))
    if stream:
        ups["b1"].script(Sse([chunk("hello", model="up-b1"), DONE]))
    else:
        ups["b1"].script(Json(chat_completion(model="up-b1")))
    gw = await gateway(routes(urls(ups), {"a": model("a1", "a2"), "b": model("b1")}))
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"models": ["a", "b"], "messages": MESSAGES, "stream": stream},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "b1"
    assert r.headers["x-gateway-attempts"] == "3"
    if stream:
        assert r.content == chunk("hello", model="b") + DONE
    else:
        assert r.json()["model"] == "b"
    assert counts(ups) == {"a1": 1, "a2": 1, "b1": 1}
    assert ups["b1"].requests[0].json()["model"] == "up-b1"
    assert "models" not in ups["b1"].requests[0].json()


@pytest.mark.parametrize(
    "body",
    [
        {"models": ["a", "b"]},
        {"model": "a", "models": ["b"]},
        {"models": ["b", "a"]},
    ],
)
async def test_allow_list_covers_every_fallback_slug(
    gateway: GatewayFactory,
    make_upstream: MakeUpstream,
    client: httpx.AsyncClient,
    body: dict[str, Any],
) -> None:
    ups = await upstreams(make_upstream, "pa", "pb")
    keys = "keys:\n  - name: only-a\n    key: sk-only-a\n    models: [a]\n"
    gw = await gateway(routes(urls(ups), {"a": model("pa"), "b": model("pb")}), keys)
    headers = {"authorization": "Bearer sk-only-a"}
    ok = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "a", "messages": MESSAGES},
        headers=headers,
    )
    assert ok.status_code == 200, ok.text
    r = await client.post(
        f"{gw.base_url}/chat/completions", json={**body, "messages": MESSAGES}, headers=headers
    )
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "model_not_allowed"
    assert r.json()["error"]["details"]["model"] == "b"
    assert counts(ups) == {"pa": 1, "pb": 0}


# --- the OpenAI SDK's retries ---------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        Json({"error": {"message": "unavailable"}}, status=503),
        Json({"error": {"message": "slow down"}}, status=429, headers=[("Retry-After", "1")]),
        Drop(),
    ],
    ids=["503", "429-retry-after", "drop-502"],
)
async def test_openai_sdk_makes_no_more_upstream_requests_than_the_gateway(
    gateway: GatewayFactory, make_upstream: MakeUpstream, failure: Reply
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    for up in ups.values():
        up.default = failure
    gw = await gateway(routes(urls(ups), {"m": model("a", "b")}))
    async with openai.AsyncOpenAI(base_url=gw.base_url, api_key="x") as sdk:
        assert sdk.max_retries == 2
        with pytest.raises(openai.APIStatusError) as info:
            await sdk.chat.completions.create(model="m", messages=[MESSAGES[0]])  # type: ignore[list-item]
    resp = info.value.response
    assert resp.headers["x-should-retry"] == "false"
    attempts = int(resp.headers["x-gateway-attempts"])
    assert attempts == 2
    assert sum(counts(ups).values()) == attempts


async def test_openai_sdk_does_not_retry_no_provider_available(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.default = FAIL_500
    gw = await gateway(routes({"p": upstream.url}, {"m": model("p")}))
    for _ in range(3):
        assert (await chat(client, gw)).status_code == 500
    seen: list[int] = []

    async def count(request: httpx.Request) -> None:
        seen.append(1)

    http = httpx.AsyncClient(event_hooks={"request": [count]})
    async with http, openai.AsyncOpenAI(base_url=gw.base_url, api_key="x", http_client=http) as sdk:
        with pytest.raises(openai.InternalServerError) as info:
            await sdk.chat.completions.create(model="m", messages=[MESSAGES[0]])  # type: ignore[list-item]
    assert info.value.status_code == 503
    assert info.value.code == "no_provider_available"
    assert len(seen) == 1
    assert len(upstream.requests) == 3


async def test_a_model_template_passes_claude_codes_names_whole(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """SPEC §14: `claude-*` with `model: "claude-{*}"` sends the client's name unchanged,
    and the answer carries the slug the client asked for."""
    routes = (
        f"providers:\n  p: {{base_url: '{upstream.url}'}}\n"
        "models:\n  'claude-*':\n    providers: [{provider: p, model: 'claude-{*}'}]\n"
    )
    gw = await gateway(routes)
    body = {"model": "claude-sonnet-4-5", "messages": [{"role": "user", "content": "hi"}]}
    r = await client.post(f"{gw.base_url}/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].json()["model"] == "claude-sonnet-4-5"
    assert r.json()["model"] == "claude-sonnet-4-5"
    assert r.headers["x-upstream-model"] == "claude-sonnet-4-5"
