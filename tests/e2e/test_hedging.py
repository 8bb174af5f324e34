"""Hedged attempts (timing, the winner, the loser's connection, the share cap) and late
commit with keep-alives, against real loopback upstreams."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.scripted_upstream import DONE, Json, Sse, Upstream, chat_completion, chunk

MakeUpstream = Callable[[], Awaitable[Upstream]]
MESSAGES = [{"role": "user", "content": "hi"}]
KEEPALIVE = b": keep-alive\n\n"
HEDGE_MS = 100
SLACK = 0.6  # hedge delay + the fast provider's time + generous slack, in seconds


def role_chunk() -> bytes:
    """A first delta with the role only: no content yet."""
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def rewritten(raw: bytes) -> bytes:
    return raw.replace(b'"upstream-model"', b'"m"')


def routes(ups: dict[str, Upstream], **opts: Any) -> str:
    """Model `m` on the given providers, in order, each as `upstream-model`."""
    extra = opts.pop("provider", {})
    doc = {
        "providers": {n: {"base_url": u.url, **extra} for n, u in ups.items()},
        "models": {
            "m": {"providers": [{"provider": n, "model": "upstream-model"} for n in ups], **opts}
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


async def pair(make_upstream: MakeUpstream) -> tuple[Upstream, Upstream]:
    return await make_upstream(), await make_upstream()


def body(stream: bool = False) -> dict[str, Any]:
    return {"model": "m", "messages": MESSAGES, "stream": stream}


class Timed:
    """A streamed response: when the head came, when each raw chunk came, all of it."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: httpx.Headers = httpx.Headers()
        self.head_at = 0.0
        self.chunks: list[tuple[float, bytes]] = []

    @property
    def content(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    @property
    def first_at(self) -> float:
        return self.chunks[0][0]


async def timed(client: httpx.AsyncClient, gw: RunningGateway, stream: bool) -> Timed:
    out = Timed()
    t0 = time.monotonic()
    async with client.stream("POST", f"{gw.base_url}/chat/completions", json=body(stream)) as resp:
        out.head_at = time.monotonic() - t0
        out.status, out.headers = resp.status_code, resp.headers
        async for data in resp.aiter_raw():
            out.chunks.append((time.monotonic() - t0, data))
    return out


async def until(cond: Callable[[], bool], within: float = 3.0) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# --- hedging --------------------------------------------------------------------------


async def test_hedge_fast_provider_wins_and_slow_one_is_closed(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    slow, fast = await pair(make_upstream)
    slow.script(Json(chat_completion(content="slow"), delay=1.0))
    fast.script(Json(chat_completion(content="fast")))
    gw = await gateway(routes({"a": slow, "b": fast}, hedge_after_ms=HEDGE_MS))
    t0 = time.monotonic()
    r = await client.post(f"{gw.base_url}/chat/completions", json=body())
    took = time.monotonic() - t0
    done_at = time.monotonic()
    assert r.status_code == 200, r.text
    assert took < SLACK, took
    assert r.json()["choices"][0]["message"]["content"] == "fast"
    assert r.json()["model"] == "m"
    assert r.headers["x-gateway-provider"] == "b"
    assert len(slow.requests) == 1 and len(fast.requests) == 1
    closed_at = await slow.wait_closed(2.0)
    assert closed_at < done_at + 0.5  # the loser is closed at once, not when it answers


@pytest.mark.parametrize(
    "slow_reply",
    [
        Sse([chunk("slow"), DONE], first_delay=1.0),
        # Bytes arrive at once, but no content: that still counts as "no content yet".
        Sse([role_chunk(), chunk("slow"), DONE], delay=1.0),
    ],
    ids=["nothing-for-1s", "role-only-then-1s"],
)
async def test_hedge_streaming_first_token_from_fast_provider(
    gateway: GatewayFactory,
    make_upstream: MakeUpstream,
    client: httpx.AsyncClient,
    slow_reply: Sse,
) -> None:
    slow, fast = await pair(make_upstream)
    slow.script(slow_reply)
    served = [role_chunk(), chunk("fast"), DONE]
    fast.script(Sse(served))
    gw = await gateway(routes({"a": slow, "b": fast}, hedge_after_ms=HEDGE_MS))
    t0 = time.monotonic()
    r = await timed(client, gw, stream=True)
    assert r.status == 200
    assert r.first_at < SLACK, r.first_at
    assert r.headers["x-gateway-provider"] == "b"
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.content == rewritten(b"".join(served))
    assert b"slow" not in r.content
    closed_at = await slow.wait_closed(2.0)
    assert closed_at - t0 < SLACK + 0.5, closed_at - t0


async def test_hedged_time_to_first_token_bound_over_many_requests(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    slow, fast = await pair(make_upstream)
    slow.default = Sse([chunk("slow"), DONE], first_delay=1.0)
    fast.default = Sse([chunk("fast"), DONE])
    gw = await gateway(routes({"a": slow, "b": fast}, hedge_after_ms=HEDGE_MS))
    gw.runtime.relay.hedge_share = 1.0  # lift the cap: every request hedges
    firsts = []
    for _ in range(10):
        r = await timed(client, gw, stream=True)
        assert r.status == 200
        assert r.headers["x-gateway-provider"] == "b"
        assert r.content == rewritten(chunk("fast") + DONE)
        firsts.append(r.first_at)
    assert max(firsts) < SLACK, firsts
    assert len(fast.requests) == 10
    await until(lambda: len(slow.closed) == 10)


async def test_no_hedge_when_first_provider_answers_in_time(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    a, b = await pair(make_upstream)
    a.script(
        Json(),
        Sse([chunk("x"), DONE]),
        Json(delay=0.1),
        Sse([role_chunk(), chunk("y"), DONE], delay=0.1),
    )
    gw = await gateway(routes({"a": a, "b": b}, hedge_after_ms=400))
    for stream in (False, True, False, True):
        r = await client.post(f"{gw.base_url}/chat/completions", json=body(stream))
        assert r.status_code == 200, r.text
        assert r.headers["x-gateway-provider"] == "a"
        assert r.headers["x-gateway-attempts"] == "1"
    assert len(a.requests) == 4
    assert b.requests == []


async def test_hedge_loser_is_the_second_when_the_first_answers_first(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    a, b = await pair(make_upstream)
    a.script(Json(chat_completion(content="from-a"), delay=0.3))
    b.script(Json(chat_completion(content="from-b"), delay=1.5))
    gw = await gateway(routes({"a": a, "b": b}, hedge_after_ms=HEDGE_MS))
    t0 = time.monotonic()
    r = await client.post(f"{gw.base_url}/chat/completions", json=body())
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "a"
    assert r.json()["choices"][0]["message"]["content"] == "from-a"
    assert time.monotonic() - t0 < 1.0
    assert len(b.requests) == 1  # the hedge did start
    closed_at = await b.wait_closed(2.0)
    assert closed_at - t0 < 1.0  # closed once a won, long before b would answer


async def test_hedge_failing_fast_does_not_beat_a_slow_success(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    a, b = await pair(make_upstream)
    a.script(Json(chat_completion(content="from-a"), delay=0.4))
    b.script(Json({"error": {"message": "boom"}}, status=500))
    gw = await gateway(routes({"a": a, "b": b}, hedge_after_ms=HEDGE_MS))
    r = await client.post(f"{gw.base_url}/chat/completions", json=body())
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "a"
    assert r.json()["choices"][0]["message"]["content"] == "from-a"
    assert len(b.requests) == 1
    assert "x-should-retry" not in r.headers


async def test_hedge_share_is_capped(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    slow, fast = await pair(make_upstream)
    slow.default = Json(delay=0.15)
    gw = await gateway(routes({"a": slow, "b": fast}, hedge_after_ms=20))
    share = gw.runtime.relay.hedge_share
    assert share == pytest.approx(0.1)  # the documented default
    n = 20
    served = []
    for _ in range(n):
        r = await client.post(f"{gw.base_url}/chat/completions", json=body())
        assert r.status_code == 200, r.text
        served.append(r.headers["x-gateway-provider"])
    hedges = len(fast.requests)
    assert 1 <= hedges <= 1 + n * share, served
    assert served.count("b") == hedges  # every hedge won (the fast one)
    assert len(slow.requests) == n


# --- late commit with keep-alives -----------------------------------------------------


async def test_late_commit_keepalive_then_content_byte_exact(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    events = [chunk("late"), chunk(" answer"), DONE]
    upstream.script(Sse(events, first_delay=1.2))
    gw = await gateway(routes({"p": upstream}, commit_after=0.2))
    r = await timed(client, gw, stream=True)
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.head_at < 0.9, r.head_at  # committed at commit_after, not at content
    assert r.chunks[0][1] == KEEPALIVE
    assert r.first_at < 0.9, r.first_at
    content_at = next(t for t, c in r.chunks if b"late" in c)
    assert content_at > 1.0, content_at
    # Exactly one keep-alive (the next is due 10 s later), then the stream as sent.
    assert r.content == KEEPALIVE + rewritten(b"".join(events))


async def test_after_commit_failure_before_content_still_fails_over(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    a, b = await pair(make_upstream)
    a.script(Sse([chunk("never")], first_delay=0.9, drop_after=0))
    served = [chunk("from-b"), DONE]
    b.script(Sse(served))
    gw = await gateway(routes({"a": a, "b": b}, commit_after=0.2))
    r = await timed(client, gw, stream=True)
    assert r.status == 200
    assert r.first_at < 0.75, r.first_at  # the keep-alive, well before a fails
    assert r.content == KEEPALIVE + rewritten(b"".join(served))
    assert len(a.requests) == 1 and len(b.requests) == 1


@pytest.mark.parametrize(
    ("reply", "code"),
    [
        (Sse([chunk("never")], first_delay=0.6, drop_after=0), "upstream_disconnected"),
        (Sse([chunk("never")], hang_after=0), "upstream_timeout"),
    ],
    ids=["drop", "idle"],
)
async def test_after_commit_failure_on_last_candidate_is_final_error_event(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    reply: Sse,
    code: str,
) -> None:
    upstream.script(reply)
    gw = await gateway(
        routes({"p": upstream}, commit_after=0.2, provider={"timeout": {"read": 0.8}})
    )
    r = await timed(client, gw, stream=True)
    assert r.status == 200  # committed with the keep-alive before the failure
    assert r.content.startswith(KEEPALIVE)
    rest = r.content[len(KEEPALIVE) :]
    assert rest.startswith(b"data: ") and rest.endswith(b"\n\n"), rest
    assert rest.count(b"\n\n") == 1, rest  # one final event, no [DONE]
    error = json.loads(rest[len(b"data: ") :])["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"]
    assert error["code"] == code, error


@pytest.mark.parametrize(
    ("reply", "status"),
    [
        (Sse([chunk("never")], drop_after=0), 502),
        (Sse([role_chunk(), chunk("never")], drop_after=1), 502),
        (
            Sse(
                [
                    role_chunk(),
                    b'data: {"error": {"message": "model overloaded", "type": "server_error"}}\n\n',
                ]
            ),
            None,
        ),
    ],
    ids=["drop-at-once", "drop-after-role", "inband-error-after-role"],
)
async def test_failure_before_content_on_only_candidate_is_http_error(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    reply: Sse,
    status: int | None,
) -> None:
    upstream.script(reply)
    gw = await gateway(routes({"p": upstream}))
    r = await client.post(f"{gw.base_url}/chat/completions", json=body(stream=True))
    assert r.status_code != 200, r.text
    assert r.status_code >= 400, r.text
    if status is not None:
        assert r.status_code == status, r.text
        assert r.json()["error"]["code"] == "upstream_unavailable"
    else:
        assert b"model overloaded" in r.content
    assert r.headers["x-should-retry"] == "false"
    assert r.headers.get("x-request-id")
    assert not r.headers["content-type"].startswith("text/event-stream")
    assert b"never" not in r.content
