"""A request's attempts are bounded in time as well as in number (`attempts_timeout`), and
each attempt closes what it holds in one place."""

from __future__ import annotations

import time

import httpx
import pytest

from gateway import latecommit as keepalive
from gateway.attempt import AttemptCancelled
from gateway.config.routes import Cooldown, Model, Provider, Target
from gateway.errors import GatewayError
from gateway.exchange import Opened
from gateway.health import Health
from gateway.plan import candidate
from tests.conftest import GatewayFactory
from tests.scripted_upstream import DONE, Hang, Sse, Upstream, chunk


def two_hanging(a: Upstream, b: Upstream, **model: object) -> str:
    extra = "".join(f"    {k}: {v}\n" for k, v in model.items())
    return (
        "providers:\n"
        f"  a:\n    base_url: {a.url}\n    timeout: {{read: 30}}\n"
        f"  b:\n    base_url: {b.url}\n    timeout: {{read: 30}}\n"
        "models:\n  m:\n"
        f"{extra}"
        "    hedge_after_ms: 100\n"
        "    providers: [{provider: a}, {provider: b}]\n"
    )


async def test_attempts_timeout_ends_a_request_with_504_and_closes_attempts(
    gateway: GatewayFactory, make_upstream: object, client: httpx.AsyncClient
) -> None:
    a, b = await make_upstream(), await make_upstream()  # type: ignore[operator]
    a.default, b.default = Hang(), Hang()
    gw = await gateway(two_hanging(a, b, attempts_timeout=0.5))
    t0 = time.monotonic()
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    elapsed = time.monotonic() - t0
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert r.headers["x-should-retry"] == "false"
    assert elapsed < 5  # far below the providers' 30 s read timeout
    # Both attempts (the second one a hedge) were closed, not left hanging.
    await a.wait_closed()
    await b.wait_closed()


async def test_attempts_timeout_after_keepalive_commit_ends_with_timeout_event(
    gateway: GatewayFactory, make_upstream: object, client: httpx.AsyncClient
) -> None:
    a, b = await make_upstream(), await make_upstream()  # type: ignore[operator]
    a.default, b.default = Hang(), Hang()
    gw = await gateway(two_hanging(a, b, attempts_timeout=0.6, commit_after=0.1))
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with client.stream("POST", f"{gw.base_url}/chat/completions", json=body) as r:
        assert r.status_code == 200
        raw = b"".join([chunk async for chunk in r.aiter_raw()])
    assert raw.startswith(b": keep-alive\n\n")
    assert raw.endswith(b"\n\n")
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: {")
    assert b'"code":"upstream_timeout"' in last
    assert b"[DONE]" not in raw


async def test_attempts_timeout_without_hedging_bounds_a_plain_request(
    gateway: GatewayFactory, make_upstream: object, client: httpx.AsyncClient
) -> None:
    a, b = await make_upstream(), await make_upstream()  # type: ignore[operator]
    a.default = Hang()
    routes = (
        "providers:\n"
        f"  a:\n    base_url: {a.url}\n    timeout: {{read: 30}}\n"
        f"  b:\n    base_url: {b.url}\n"
        "models:\n  m:\n    attempts_timeout: 0.4\n"
        "    providers: [{provider: a}, {provider: b}]\n"
    )
    gw = await gateway(routes)
    t0 = time.monotonic()
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - t0 < 5
    await a.wait_closed()
    # The time was spent on a: b was never tried once the request's time was up.
    assert b.requests == []


def one_provider(a: Upstream, **model: object) -> str:
    extra = "".join(f"    {k}: {v}\n" for k, v in model.items())
    return (
        "providers:\n"
        f"  a:\n    base_url: {a.url}\n    stream_usage: false\n"
        "models:\n  m:\n"
        f"{extra}"
        "    providers: [{provider: a, model: up}]\n"
    )


STREAM = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}


async def test_attempts_timeout_does_not_cut_a_stream_that_has_started(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    # Content at once, then an event every 0.2 s for 1.2 s: past the 0.5 s bound on tries.
    events = [chunk(str(i)) for i in range(6)]
    upstream.script(Sse([*events, DONE], delay=0.2))
    gw = await gateway(one_provider(upstream, attempts_timeout=0.5))
    t0 = time.monotonic()
    async with client.stream("POST", f"{gw.base_url}/chat/completions", json=STREAM) as r:
        assert r.status_code == 200
        raw = b"".join([part async for part in r.aiter_raw()])
    assert time.monotonic() - t0 > 1.0
    assert raw.endswith(DONE), raw[-200:]
    assert b"upstream_timeout" not in raw
    assert raw.count(b"data: {") == len(events)


async def test_attempts_timeout_after_keepalive_commit_without_hedging(
    gateway: GatewayFactory, make_upstream: object, client: httpx.AsyncClient
) -> None:
    a = await make_upstream()  # type: ignore[operator]
    a.default = Hang()
    gw = await gateway(one_provider(a, attempts_timeout=0.6, commit_after=0.1))
    t0 = time.monotonic()
    async with client.stream("POST", f"{gw.base_url}/chat/completions", json=STREAM) as r:
        assert r.status_code == 200
        raw = b"".join([part async for part in r.aiter_raw()])
    assert time.monotonic() - t0 < 5
    assert raw.startswith(b": keep-alive\n\n")
    last = raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: {") and b'"code":"upstream_timeout"' in last
    assert b"[DONE]" not in raw
    await a.wait_closed()


async def test_keepalives_repeat_until_content_then_the_stream_follows(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(keepalive, "KEEPALIVE_EVERY", 0.15)
    # Content after 1 s; commit at 0.1 s, then a keep-alive every 0.15 s meanwhile.
    upstream.script(Sse([chunk("late"), DONE], first_delay=1.0))
    gw = await gateway(one_provider(upstream, commit_after=0.1))
    async with client.stream("POST", f"{gw.base_url}/chat/completions", json=STREAM) as r:
        assert r.status_code == 200
        raw = b"".join([part async for part in r.aiter_raw()])
    keepalives = raw.count(b": keep-alive\n\n")
    assert 3 <= keepalives <= 8, raw
    body = raw.replace(b": keep-alive\n\n", b"")
    want = (chunk("late") + DONE).replace(b'"model": "upstream-model"', b'"model": "m"')
    assert body == want, body
    assert raw.startswith(b": keep-alive\n\n" * keepalives)  # none after the content


class _Span:
    def __init__(self) -> None:
        self.ended: list[tuple[int, str | None]] = []

    def end(self, status: int, error: GatewayError | None = None) -> None:
        self.ended.append((status, None if error is None else error.code))


class _Response:
    status = 429

    def __init__(self) -> None:
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


def test_an_attempt_closes_what_it_holds_in_one_place() -> None:
    """Opened.close: the upstream response, the entry's in-flight count and the span,
    with the failure counted against the entry only when asked (a hedge's loser and a
    cancelled attempt count nothing)."""
    provider = Provider(name="p", base_url="http://127.0.0.1:9")
    model = Model(
        slug="m", id="m", name="m", targets=(Target(provider, "up"),),
        cooldown=Cooldown(failures=1, seconds=30),
    )  # fmt: skip
    cand = candidate("m", model, model.targets[0])
    health = Health(clock=lambda: 0.0)
    for failed in (False, True):
        health.begin(cand.key)
        span, resp = _Span(), _Response()
        opened = Opened(cand, health, 0.0, span, resp)  # type: ignore[arg-type]
        assert health.state(cand.key).in_flight == 1
        opened.close(failed, AttemptCancelled("gone") if not failed else None)
        assert health.state(cand.key).in_flight == 0
        assert resp.closes == 1
        assert span.ended == [(429, None if failed else "cancelled")]
        assert health.available(cand.key) is not failed  # one failure opens the breaker
    # Closed before the upstream's head: no response, the span's status is the given one.
    health.begin(cand.key)
    span = _Span()
    Opened(cand, health, 0.0, span).close(False, AttemptCancelled("gone"), 0)  # type: ignore[arg-type]
    assert span.ended == [(0, "cancelled")] and health.state(cand.key).in_flight == 0
