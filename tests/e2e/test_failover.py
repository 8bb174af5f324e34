"""Failover: what moves on to the next provider, what is relayed at once, what the client
gets when everything failed, provider preferences, the circuit breaker, max_attempts."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.helpers import assert_envelope
from tests.scripted_upstream import Drop, Hang, Json, Reply, Upstream, chat_completion

MakeUpstream = Callable[[], Awaitable[Upstream]]
MESSAGES = [{"role": "user", "content": "hi"}]
BODY: dict[str, Any] = {"model": "m", "messages": MESSAGES}


def routes(providers: dict[str, dict[str, Any]], models: dict[str, dict[str, Any]]) -> str:
    return yaml.safe_dump({"providers": providers, "models": models}, sort_keys=False)


def closed_port_url() -> str:
    """A loopback URL nobody listens on: bind port 0, note it, close it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}/v1"


def chain(urls: dict[str, str], timeout: dict[str, float] | None = None, **model: Any) -> str:
    """Providers named as given (in order), all serving model `m` as `up-<name>`."""
    providers: dict[str, dict[str, Any]] = {}
    for name, url in urls.items():
        providers[name] = {"base_url": url}
        if timeout is not None:
            providers[name]["timeout"] = timeout
    targets = [{"provider": name, "model": f"up-{name}"} for name in urls]
    return routes(providers, {"m": {"providers": targets, **model}})


async def chat(client: httpx.AsyncClient, gw: RunningGateway, **extra: Any) -> httpx.Response:
    return await client.post(f"{gw.base_url}/chat/completions", json={**BODY, **extra})


async def ups(make_upstream: MakeUpstream, n: int) -> list[Upstream]:
    return [await make_upstream() for _ in range(n)]


# --- what triggers a fallback ---------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        Json({"error": {"message": "rate"}}, status=429),
        Json({"error": {"message": "boom"}}, status=500),
        Json({"error": {"message": "unavailable"}}, status=503),
        Json({"error": {"message": "slow"}}, status=408),
        Json(b"<html>bad gateway</html>", status=502),
        Drop(),
        Hang(),
    ],
    ids=["429", "500", "503", "408", "502-html", "drop", "hang"],
)
async def test_fallback_triggers(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient, failure: Reply
) -> None:
    up1, up2 = await ups(make_upstream, 2)
    up1.script(failure)
    gw = await gateway(chain({"p1": up1.url, "p2": up2.url}, timeout={"read": 0.5}))
    r = await chat(client, gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-attempts"] == "2"
    assert r.headers["x-gateway-provider"] == "p2"
    assert r.headers["x-upstream-model"] == "up-p2"
    assert r.json()["model"] == "m"
    assert len(up1.requests) == 1 and len(up2.requests) == 1
    assert up2.requests[0].json()["model"] == "up-p2"


async def test_fallback_on_connection_refused(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(chain({"dead": closed_port_url(), "live": upstream.url}))
    r = await chat(client, gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-attempts"] == "2"
    assert r.headers["x-gateway-provider"] == "live"
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_client_errors_relayed_without_fallback(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient, status: int
) -> None:
    up1, up2 = await ups(make_upstream, 2)
    raw = b'{"error": {"message": "bad input", "type": "invalid_request_error", "code": "x"}}'
    up1.script(Json(raw, status=status, headers=[("x-upstream-thing", "1")]))
    gw = await gateway(chain({"p1": up1.url, "p2": up2.url}))
    r = await chat(client, gw)
    assert r.status_code == status
    assert r.content == raw
    assert r.headers["x-upstream-thing"] == "1"
    assert r.headers.get("x-request-id")
    assert r.headers.get("x-gateway-attempts", "1") == "1"
    assert up2.requests == []


# --- when every candidate fails -------------------------------------------------------


async def test_all_fail_last_status_relayed(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up1, up2 = await ups(make_upstream, 2)
    up1.script(Json({"error": {"message": "first"}}, status=500))
    last = b'{"error":{"message":"slow down","type":"rate_limit_error"}}'
    up2.script(Json(last, status=429, headers=[("Retry-After", "7")]))
    gw = await gateway(chain({"p1": up1.url, "p2": up2.url}))
    r = await chat(client, gw)
    assert r.status_code == 429
    assert r.content == last
    assert r.headers["retry-after"] == "7"
    assert r.headers["x-should-retry"] == "false"
    assert r.headers["x-gateway-attempts"] == "2"
    assert r.headers.get("x-request-id")


async def test_all_fail_last_that_answered_wins_over_later_unreachable(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    raw = b'{"error": {"message": "down for maintenance"}}'
    upstream.script(Json(raw, status=503, headers=[("retry-after", "3")]))
    gw = await gateway(chain({"p1": upstream.url, "dead": closed_port_url()}))
    r = await chat(client, gw)
    assert r.status_code == 503
    assert r.content == raw
    assert r.headers["retry-after"] == "3"
    assert r.headers["x-should-retry"] == "false"


async def test_none_reachable_is_502(gateway: GatewayFactory, client: httpx.AsyncClient) -> None:
    gw = await gateway(chain({"a": closed_port_url(), "b": closed_port_url()}))
    r = await chat(client, gw)
    assert_envelope(r, 502, "upstream_unavailable")
    assert r.headers["x-should-retry"] == "false"
    assert r.headers["x-gateway-attempts"] == "2"


async def test_drops_only_is_502(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up1, up2 = await ups(make_upstream, 2)
    up1.script(Drop())
    up2.script(Drop())
    gw = await gateway(chain({"p1": up1.url, "p2": up2.url}))
    r = await chat(client, gw)
    assert_envelope(r, 502, "upstream_unavailable")
    assert r.headers["x-should-retry"] == "false"


async def test_timeout_among_failures_is_504(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Hang())
    gw = await gateway(
        chain({"slow": upstream.url, "dead": closed_port_url()}, timeout={"read": 0.5})
    )
    r = await chat(client, gw)
    assert_envelope(r, 504, "upstream_timeout")
    assert r.headers["x-should-retry"] == "false"
    assert r.headers["x-gateway-attempts"] == "2"


async def test_max_attempts_one_stops_after_one_try(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up1, up2 = await ups(make_upstream, 2)
    raw = b'{"error":{"message":"boom"}}'
    up1.script(Json(raw, status=500))
    gw = await gateway(chain({"p1": up1.url, "p2": up2.url}, max_attempts=1))
    r = await chat(client, gw)
    assert r.status_code == 500
    assert r.content == raw
    assert r.headers["x-should-retry"] == "false"
    assert r.headers["x-gateway-attempts"] == "1"
    assert up2.requests == []


# --- provider preferences -------------------------------------------------------------


def tried(upstreams: dict[str, Upstream]) -> list[str]:
    return [name for name, up in upstreams.items() if up.requests]


@pytest.mark.parametrize(
    ("prefs", "fail", "served_by", "called"),
    [
        ({"order": ["c", "a"]}, {"c"}, "a", {"c", "a"}),
        ({"order": ["c"]}, {"c"}, "a", {"c", "a"}),  # then the others, in their own order
        ({"order": ["nope", "b"]}, set(), "b", {"b"}),  # unknown names are ignored
        ({"only": ["b"]}, set(), "b", {"b"}),
        ({"only": ["b", "c"]}, {"b"}, "c", {"b", "c"}),
        ({"ignore": ["a"]}, set(), "b", {"b"}),
        ({"ignore": ["a", "nope"]}, {"b"}, "c", {"b", "c"}),
        ({"order": ["c", "b"], "allow_fallbacks": True}, {"c", "b"}, "a", {"a", "b", "c"}),
        ({"order": ["b"], "ignore": ["a"]}, {"b"}, "c", {"b", "c"}),
    ],
)
async def test_provider_preferences(
    gateway: GatewayFactory,
    make_upstream: MakeUpstream,
    client: httpx.AsyncClient,
    prefs: dict[str, Any],
    fail: set[str],
    served_by: str,
    called: set[str],
) -> None:
    upstreams = dict(zip("abc", await ups(make_upstream, 3), strict=True))
    for name in fail:
        upstreams[name].script(Json({"error": {"message": name}}, status=500))
    gw = await gateway(chain({n: u.url for n, u in upstreams.items()}))
    r = await chat(client, gw, provider=prefs)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == served_by
    assert set(tried(upstreams)) == called
    assert r.headers["x-gateway-attempts"] == str(len(called))
    assert "provider" not in upstreams[served_by].requests[0].json()


async def test_provider_order_is_followed(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    """All fail: the relayed body is the last one tried, which shows the order's tail."""
    upstreams = dict(zip("abc", await ups(make_upstream, 3), strict=True))
    for name, up in upstreams.items():
        up.default = Json({"error": {"message": name}}, status=500)
    gw = await gateway(chain({n: u.url for n, u in upstreams.items()}))
    r = await chat(client, gw, provider={"order": ["c", "a", "b"]})
    assert r.status_code == 500
    assert r.headers["x-gateway-attempts"] == "3"
    assert r.json() == {"error": {"message": "b"}}
    # Named first, then the rest in the model's order: b, c, then a last.
    r = await chat(client, gw, provider={"order": ["b", "c"]})
    assert r.status_code == 500
    assert r.headers["x-gateway-attempts"] == "3"
    assert r.json() == {"error": {"message": "a"}}
    assert [len(u.requests) for u in upstreams.values()] == [2, 2, 2]


async def test_allow_fallbacks_false_stops_after_ordered(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    upstreams = dict(zip("abc", await ups(make_upstream, 3), strict=True))
    raw = b'{"error":{"message":"c failed"}}'
    upstreams["c"].script(Json(raw, status=500))
    gw = await gateway(chain({n: u.url for n, u in upstreams.items()}))
    r = await chat(client, gw, provider={"order": ["c"], "allow_fallbacks": False})
    assert r.status_code == 500
    assert r.content == raw
    assert r.headers["x-should-retry"] == "false"
    assert tried(upstreams) == ["c"]


async def test_only_restricts_even_when_it_fails(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    upstreams = dict(zip("abc", await ups(make_upstream, 3), strict=True))
    raw = b'{"error":{"message":"b failed"}}'
    upstreams["b"].script(Json(raw, status=503))
    gw = await gateway(chain({n: u.url for n, u in upstreams.items()}))
    r = await chat(client, gw, provider={"only": ["b"]})
    assert r.status_code == 503
    assert r.content == raw
    assert tried(upstreams) == ["b"]


# --- circuit breaker ------------------------------------------------------------------


async def test_breaker_skips_entry_after_three_failures(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up1, up2 = await ups(make_upstream, 2)
    up1.default = Json({"error": {"message": "down"}}, status=500)
    gw = await gateway(chain({"p1": up1.url, "p2": up2.url}))
    for i in range(3):
        r = await chat(client, gw)
        assert r.status_code == 200, (i, r.text)
        assert r.headers["x-gateway-attempts"] == "2"
    assert len(up1.requests) == 3
    r = await chat(client, gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "p2"
    assert r.headers["x-gateway-attempts"] == "1"
    assert len(up1.requests) == 3  # skipped while cooling down
    assert len(up2.requests) == 4


async def test_breaker_counts_consecutive_failures_only(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up1, up2 = await ups(make_upstream, 2)
    fail = Json({"error": {"message": "down"}}, status=500)
    up1.script(fail, fail, Json(), fail, fail)
    gw = await gateway(chain({"p1": up1.url, "p2": up2.url}))
    for _ in range(5):
        assert (await chat(client, gw)).status_code == 200
    # fail, fail, success (resets), fail, fail: never three in a row, so p1 is still tried.
    await chat(client, gw)
    assert len(up1.requests) == 6


async def test_breaker_all_cooling_down_is_503(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.default = Json({"error": {"message": "down"}}, status=500)
    gw = await gateway(chain({"p": upstream.url}))
    for _ in range(3):
        assert (await chat(client, gw)).status_code == 500
    r = await chat(client, gw)
    assert_envelope(r, 503, "no_provider_available")
    assert len(upstream.requests) == 3


async def test_breaker_503_says_do_not_retry(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.default = Json({"error": {"message": "down"}}, status=500)
    gw = await gateway(chain({"p": upstream.url}))
    for _ in range(3):
        assert (await chat(client, gw)).status_code == 500
    r = await chat(client, gw)
    assert r.status_code == 503
    assert r.headers.get("x-should-retry") == "false"


async def test_breaker_counts_timeouts_and_refusals(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(chain({"dead": closed_port_url(), "live": upstream.url}))
    for _ in range(3):
        r = await chat(client, gw)
        assert r.headers["x-gateway-attempts"] == "2"
    r = await chat(client, gw)
    assert r.status_code == 200
    assert r.headers["x-gateway-attempts"] == "1"
    assert r.headers["x-gateway-provider"] == "live"


async def test_breaker_is_per_entry(
    gateway: GatewayFactory,
    upstream: Upstream,
    make_upstream: MakeUpstream,
    client: httpx.AsyncClient,
) -> None:
    """Two models on the same provider: one entry cooling down does not block the other."""
    backup: Upstream = await make_upstream()
    upstream.default = Json(chat_completion())
    fail = Json({"error": {"message": "down"}}, status=500)
    upstream.script(fail, fail, fail)
    gw = await gateway(
        routes(
            {"p": {"base_url": upstream.url}, "q": {"base_url": backup.url}},
            {
                "m": {"providers": [{"provider": "p", "model": "one"}, {"provider": "q"}]},
                "n": {"providers": [{"provider": "p", "model": "two"}]},
            },
        )
    )
    for _ in range(3):
        assert (await chat(client, gw)).headers["x-gateway-provider"] == "q"
    r = await client.post(
        f"{gw.base_url}/chat/completions", json={"model": "n", "messages": MESSAGES}
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "p"
    assert upstream.requests[-1].json()["model"] == "two"
