"""Prompt-cache affinity end to end (SPEC §14): real loopback upstreams, the gateway over
real sockets, and two gateway processes sharing pins through a real redis-server."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.e2e.test_routing import FAIL_500, MakeUpstream, model, routes, upstreams, urls
from tests.scripted_upstream import Json
from tests.state.test_redis import Redis

MESSAGES = [{"role": "user", "content": "hi"}]


async def ask(client: httpx.AsyncClient, base: str, session: str | None = None, **body: Any) -> str:
    headers = {"x-session-id": session} if session else {}
    r = await client.post(
        f"{base}/chat/completions",
        json={"model": "m", "messages": MESSAGES, **body},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    return r.headers["x-gateway-provider"]


@pytest.mark.parametrize("strategy", ["round_robin", "weighted"])
async def test_a_session_stays_on_one_entry_and_others_still_spread(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient, strategy: str
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    gw = await gateway(routes(urls(ups), {"m": model("a", "b", strategy=strategy)}))
    for session in ("s1", "s2", "s3"):
        served = {await ask(client, gw.base_url, session) for _ in range(50)}
        assert len(served) == 1, (session, served)
    # Claude Code's header and the body's session_id name sessions too.
    served = set()
    for _ in range(10):
        r = await client.post(
            f"{gw.base_url}/chat/completions",
            json={"model": "m", "messages": MESSAGES},
            headers={"x-claude-code-session-id": "cc-1"},
        )
        served.add(r.headers["x-gateway-provider"])
    assert len(served) == 1
    spread = Counter([await ask(client, gw.base_url) for _ in range(40)])
    assert set(spread) == {"a", "b"}, spread


async def test_the_pin_moves_to_the_entry_that_serves_when_its_own_fails(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    gw = await gateway(routes(urls(ups), {"m": model("a", "b", strategy="round_robin")}))
    first = await ask(client, gw.base_url, "s")
    other = "b" if first == "a" else "a"
    ups[first].script(FAIL_500)
    assert await ask(client, gw.base_url, "s") == other
    ups[first].script(Json())  # healthy again: the session stays where it moved
    assert {await ask(client, gw.base_url, "s") for _ in range(10)} == {other}


async def test_the_requests_provider_choice_outranks_the_pin(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    gw = await gateway(routes(urls(ups), {"m": model("a", "b", strategy="round_robin")}))
    first = await ask(client, gw.base_url, "s")
    other = "b" if first == "a" else "a"
    assert await ask(client, gw.base_url, "s", provider={"only": [other]}) == other
    assert await ask(client, gw.base_url, "s", provider={"order": [other, first]}) == other


async def test_affinity_false_follows_the_strategy(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    m = model("a", "b", strategy="round_robin", affinity=False)
    gw = await gateway(routes(urls(ups), {"m": m}))
    served = [await ask(client, gw.base_url, "s") for _ in range(6)]
    assert served == ["a", "b"] * 3
    assert len(gw.runtime.affinity) == 0


async def test_two_gateways_on_one_redis_share_pins(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:  # fmt: skip
    redis = Redis(tmp_path)
    try:
        ups = await upstreams(make_upstream, "a", "b")
        doc = routes(urls(ups), {"m": model("a", "b", strategy="round_robin")})
        one = await gateway(doc, state=redis.url)
        two = await gateway(doc, state=redis.url)
        assert await ask(client, one.base_url) == "a"  # turns one's rotation to b
        assert await ask(client, one.base_url, "s") == "b"
        assert await one.runtime.shared.flush()
        # Without the shared pin, two's rotation would start at a.
        assert {await ask(client, two.base_url, "s") for _ in range(6)} == {"b"}
        assert {await ask(client, one.base_url, "s") for _ in range(6)} == {"b"}
        keys = redis.cli("--scan", "--pattern", "gateway:pin:*").split()
        assert len(keys) == 1
        assert 3590 <= int(redis.cli("ttl", keys[0])) <= 3600
    finally:
        redis.stop()
