"""Prompt-cache affinity end to end (SPEC §14): real loopback upstreams, the gateway over
real sockets, and two gateway processes sharing pins through a real redis-server."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from tests.conftest import GatewayFactory
from tests.e2e.test_routing import FAIL_500, MakeUpstream, model, routes, upstreams, urls
from tests.helpers import loopback_socket, start_uvicorn
from tests.scripted_upstream import Json, chat_completion
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


class PromptCache:
    """An upstream whose usage reports a prompt cache the way a provider's works: the
    longest prefix of messages this same entry saw before is read from its cache."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        messages = json.loads(body)["messages"]
        sizes = [len(json.dumps(m)) // 4 for m in messages]
        cached = 0
        for i in range(len(messages), 0, -1):
            if json.dumps(messages[:i]) in self.seen:
                cached = sum(sizes[:i])
                break
        for i in range(1, len(messages) + 1):
            self.seen.add(json.dumps(messages[:i]))
        prompt = sum(sizes)
        usage = {"prompt_tokens": prompt, "completion_tokens": 5,
                 "total_tokens": prompt + 5,
                 "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip
        out = json.dumps({**chat_completion(content="ok " * 20), "usage": usage}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})  # fmt: skip
        await send({"type": "http.response.body", "body": out})


async def session_hit_ratio(gateway: GatewayFactory, affinity: bool, entries: int) -> float:
    """20 turns of one growing conversation (a tool result of ~2k tokens a turn) on a
    round-robin model: the share of its prompt tokens read from the provider's cache
    (the gateway's own metric)."""
    servers = []
    ups = {}
    names = "abcd"[:entries]
    for name in names:
        sock = loopback_socket()
        config = uvicorn.Config(PromptCache(), log_level="warning", lifespan="off")
        servers.append(await start_uvicorn(config, sock))
        ups[name] = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        m = model(*names, strategy="round_robin", affinity=affinity)
        gw = await gateway(routes(ups, {"m": m}))
        history: list[dict[str, str]] = [{"role": "system", "content": "You code. " * 400}]
        async with httpx.AsyncClient(timeout=10) as client:
            for turn in range(20):
                history.append({"role": "user", "content": f"step {turn}: " + "x" * 8000})
                r = await client.post(
                    f"{gw.base_url}/chat/completions",
                    json={"model": "m", "messages": history},
                    headers={"x-session-id": "agent-1"},
                )
                assert r.status_code == 200, r.text
                history.append(r.json()["choices"][0]["message"])
        kinds: Counter[str] = Counter()
        for labels, counter in gw.runtime.metrics.prompt_tokens.children.items():
            kinds[labels[3]] += int(counter.value)
        return kinds["cache_read"] / (kinds["cache_read"] + kinds["uncached"])
    finally:
        for server, task in servers:
            server.should_exit = True
            await task


@pytest.mark.parametrize("entries", [2, 4])
async def test_a_20_turn_session_keeps_its_prompt_cache_with_affinity(
    gateway: GatewayFactory, entries: int
) -> None:
    """The issue's figure: `pytest -s tests/e2e/test_affinity.py -k 20_turn` prints it."""
    on = await session_hit_ratio(gateway, True, entries)
    off = await session_hit_ratio(gateway, False, entries)
    print(f"\ncache-hit ratio, 20-turn session, {entries} entries: affinity on {on:.3f}, "
          f"off {off:.3f}")  # fmt: skip
    assert on > 0.88  # every turn after the first reads all it sent before
    # Without it each entry saw the conversation only up to its own last turn.
    assert off < on - 0.04 * entries
