"""Streaming: SSE relayed byte for byte and at once, mid-stream errors, disconnects, late commit.

Providers here set `stream_usage: false` so the request is not changed by usage injection;
none of these tests is about usage accounting.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.scripted_upstream import DONE, Hang, Raw, Sse, Upstream, chunk

MakeUpstream = Callable[[], Awaitable[Upstream]]
MESSAGES = [{"role": "user", "content": "hi"}]
STREAM_BODY: dict[str, Any] = {"model": "m", "stream": True, "messages": MESSAGES}
KEEPALIVE = b": keep-alive\n\n"


def routes(providers: dict[str, dict[str, Any]], models: dict[str, dict[str, Any]]) -> str:
    return yaml.safe_dump({"providers": providers, "models": models}, sort_keys=False)


def provider(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    return {"base_url": upstream.url, "api_key": "sk-up", "stream_usage": False, **extra}


def single(upstream: Upstream, provider_extra: dict[str, Any] | None = None, **model: Any) -> str:
    return routes(
        {"p": provider(upstream, **(provider_extra or {}))},
        {"m": {"providers": [{"provider": "p", "model": "upstream-model"}], **model}},
    )


def rewritten(data: bytes) -> bytes:
    """What the client should get for upstream bytes made by `chunk()`."""
    return data.replace(b'"model": "upstream-model"', b'"model": "m"')


def role_chunk() -> bytes:
    return chunk(
        None, choices=[{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]
    )


def split_error_tail(body: bytes, prefix: bytes) -> dict[str, Any]:
    """Assert `body` is `prefix` then exactly one final error event; return its error object."""
    assert body.startswith(prefix), body
    tail = body[len(prefix) :]
    assert tail.startswith(b"data: "), tail
    assert tail.endswith(b"\n\n"), tail
    assert tail.count(b"\n\n") == 1, tail
    assert b"[DONE]" not in body
    obj = json.loads(tail[len(b"data: ") :])
    assert set(obj) == {"error"}, obj
    err = obj["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err


async def post_stream(client: httpx.AsyncClient, gw: RunningGateway) -> httpx.Response:
    return await client.post(f"{gw.base_url}/chat/completions", json=STREAM_BODY)


# --- byte for byte --------------------------------------------------------------------


async def test_stream_bytes_relayed_exactly(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    events: list[bytes] = [
        b": ping\n\n",
        b'event: message\nid: 1\ndata: {"id":"c","model":"upstream-model","choices":[{"index":0,'
        b'"delta":{"role":"assistant","content":"a\xe2\x80\xa8b \\u2028"},"finish_reason":null}]}\n\n',
        b":another comment with data: inside\n\n",
        b'data:{"model" :  "upstream-model" ,"choices":[{"delta":{"content":"x",'
        b'"model":"upstream-model"}}],"x":{"model":"upstream-model"}}\n\n',
        b"event: custom\ndata: not json, model: upstream-model\n\n",
        b'data: {"choices":[{"delta":{"content":"no top-level model"}}]}\n\n',
        DONE,
    ]
    expected = b"".join(events).replace(
        b'"model":"upstream-model","choices":[{"index"', b'"model":"m","choices":[{"index"'
    )
    expected = expected.replace(b'"model" :  "upstream-model" ,', b'"model" :  "m" ,')
    upstream.script(
        Sse(
            events,
            headers=[
                ("X-Request-Id", "up-stream-1"),
                ("Set-Cookie", "s=1"),
                ("X-Ratelimit-Remaining-Tokens", "5"),
            ],
        )
    )
    gw = await gateway(single(upstream))
    r = await post_stream(client, gw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-upstream-request-id"] == "up-stream-1"
    assert r.headers.get_list("x-request-id") != ["up-stream-1"]
    assert "set-cookie" not in r.headers
    assert "x-ratelimit-remaining-tokens" not in r.headers  # the provider's capacity (SPEC §13)
    assert r.headers["x-gateway-provider"] == "p"
    assert r.headers["x-upstream-model"] == "upstream-model"
    assert r.headers.get("x-request-id")
    assert r.content == expected


async def test_crlf_and_cr_line_endings_kept(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    for eol in (b"\r\n", b"\r"):
        upstream: Upstream = await make_upstream()
        events = [
            b": ping" + eol + eol,
            b"event: delta" + eol + chunk("a").rstrip(b"\n") + eol + eol,
            chunk("b").rstrip(b"\n") + eol + eol,
            b"data: [DONE]" + eol + eol,
        ]
        upstream.script(Sse(events))
        gw = await gateway(single(upstream))
        r = await post_stream(client, gw)
        assert r.status_code == 200, r.text
        assert r.content == rewritten(b"".join(events)), eol


async def test_event_split_across_writes(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    whole = (
        b'data: {"id":"c","model":"upstream-model","choices":[{"delta":'
        b'{"content":"x\xe2\x80\xa8y"},"index":0}]}\r\n\r\n'
    )
    # Cut inside "model", inside the UTF-8 of U+2028, and between \r and \n.
    cuts = [whole.index(b"del"), whole.index(b"\xe2\x80") + 1, len(whole) - 3, len(whole) - 1]
    parts = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    assert b"".join(parts) == whole and len(parts) == 5
    second = chunk("z")
    upstream.script(Sse([*parts, second[:7], second[7:], DONE]))
    gw = await gateway(single(upstream))
    r = await post_stream(client, gw)
    assert r.status_code == 200, r.text
    expected = whole.replace(b'"model":"upstream-model"', b'"model":"m"')
    assert r.content == expected + rewritten(second) + DONE


async def test_stream_ending_without_done_relayed_as_ended(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    events = [chunk("a"), chunk("b")]
    upstream.script(Sse(events))
    gw = await gateway(single(upstream))
    r = await post_stream(client, gw)
    assert r.status_code == 200
    assert r.content == rewritten(b"".join(events))


# --- nothing held back ----------------------------------------------------------------


async def test_events_reach_client_while_upstream_is_silent(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    """The upstream sends three events and then goes quiet: all three must arrive now."""
    events = [chunk("a"), b": comment\n\n", chunk("b")]
    upstream.script(Sse(events, delay=0.1, hang_after=3))
    gw = await gateway(single(upstream))
    want = rewritten(b"".join(events))
    got = b""
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", f"{gw.base_url}/chat/completions", json=STREAM_BODY) as resp,
    ):
        assert resp.status_code == 200

        async def read_until_all() -> None:
            nonlocal got
            async for data in resp.aiter_raw():
                got += data
                if len(got) >= len(want):
                    return

        await asyncio.wait_for(read_until_all(), 3.0)
    assert got == want


async def test_paced_events_arrive_one_by_one(gateway: GatewayFactory, upstream: Upstream) -> None:
    pace = 0.15
    events = [chunk(str(i)) for i in range(5)]
    upstream.script(Sse([*events, DONE], delay=pace))
    gw = await gateway(single(upstream))
    want = [rewritten(e) for e in events]
    arrivals: list[float] = []
    buf = b""
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", f"{gw.base_url}/chat/completions", json=STREAM_BODY) as resp,
    ):
        assert resp.status_code == 200
        async for data in resp.aiter_raw():
            now = time.monotonic()
            buf += data
            while len(arrivals) < len(want) and buf.startswith(b"".join(want[: len(arrivals) + 1])):
                arrivals.append(now)
    assert buf == b"".join(want) + DONE
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    print(f"arrival gaps (pace {pace}s): {[round(g, 3) for g in gaps]}")
    # An event held back until the next one is sent arrives together with it (gap ~ 0).
    assert all(g > pace / 3 for g in gaps), gaps
    # And none waits for more than about one pacing interval plus slack.
    total = arrivals[-1] - arrivals[0]
    assert total < pace * 4 + 0.5, total


async def test_stream_arriving_at_once_leaves_in_one_message(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    """What has already arrived goes out together, the end included: one body message
    after the head (the server writes the head with it: one syscall for the stream)."""
    events = [role_chunk(), *(chunk(str(i)) for i in range(5)), DONE]
    body = b"".join(events)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    upstream.script(Raw(head + b"content-length: %d\r\n\r\n" % len(body) + body))
    gw = await gateway(single(upstream))
    request = json.dumps(STREAM_BODY).encode()
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not sent and not gone.is_set():
            gone.set()  # the first call gets the body; later ones wait for a disconnect
            return {"type": "http.request", "body": request, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(request)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", gw.port),
    }
    await asyncio.wait_for(gw.app(scope, receive, send), 10)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"], sent
    assert sent[0]["status"] == 200
    assert sent[1]["body"] == b"".join(rewritten(e) for e in events)
    assert not sent[1].get("more_body", False)


# --- breaks after the start -----------------------------------------------------------


async def test_stream_broken_after_content_ends_with_error_event(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    events = [chunk("a"), chunk("b"), chunk("c"), chunk("d"), DONE]
    upstream.script(Sse(events, drop_after=3))
    gw = await gateway(single(upstream))
    r = await post_stream(client, gw)
    assert r.status_code == 200
    err = split_error_tail(r.content, rewritten(b"".join(events[:3])))
    assert err["code"] == "upstream_disconnected"


async def test_stream_idle_past_read_timeout_ends_with_timeout_event(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    events = [chunk("a"), chunk("b"), chunk("c"), DONE]
    upstream.script(Sse(events, hang_after=2))
    gw = await gateway(single(upstream, {"timeout": {"read": 0.5}}))
    t0 = time.monotonic()
    r = await post_stream(client, gw)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200
    err = split_error_tail(r.content, rewritten(b"".join(events[:2])))
    assert err["code"] == "upstream_timeout"
    assert 0.4 < elapsed < 5, elapsed


async def test_paced_stream_longer_than_the_read_timeout_is_not_cut(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """The read timeout bounds the wait for each event, not the stream: events 0.1 s
    apart for 0.8 s in all under a 0.3 s read timeout, each relayed as it comes (from
    the upstream's reads, without a wake-up of the request's task)."""
    events = [chunk(str(i)) for i in range(8)]
    upstream.script(Sse([*events, DONE], delay=0.1))
    gw = await gateway(single(upstream, {"timeout": {"read": 0.3}}))
    r = await post_stream(client, gw)
    assert r.status_code == 200
    assert r.content == rewritten(b"".join(events)) + DONE


async def test_a_stalled_client_stalls_the_upstream(gateway: GatewayFactory) -> None:
    """A client that stops reading holds the upstream back (the gateway's buffers stay
    bounded), though events arrive one read at a time, as they leave without a wake-up
    of the request's task while the client reads; when it reads again, every byte comes
    in order."""
    # 12.5 MiB: over every buffer on the way (here the upstream stalls near 8 MiB).
    size, count = 32 * 1024, 400
    sent = 0

    def event(i: int) -> bytes:
        return b"data: " + (b"%06d" % i) * (size // 6) + b"\n\n"

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal sent
        try:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n")  # fmt: skip
            for i in range(count):
                data = event(i)
                w.write(b"%x\r\n%s\r\n" % (len(data), data))
                await w.drain()
                sent += 1
                await asyncio.sleep(0)  # one event a read, as a model sends them
            w.write(b"0\r\n\r\n")
            await w.drain()
        except ConnectionError:
            pass
        finally:
            w.close()

    up = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = up.sockets[0].getsockname()[1]
    gw = await gateway(
        routes(
            {"p": {"base_url": f"http://127.0.0.1:{port}/v1", "stream_usage": False}},
            {"m": {"providers": [{"provider": "p", "model": "upstream-model"}]}},
        )
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        body = json.dumps(STREAM_BODY).encode()
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: "
            b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        # Read nothing more until the upstream stops getting further (bounded wait).
        last, still = -1, 0
        for _ in range(100):
            await asyncio.sleep(0.05)
            still = still + 1 if sent == last else 0
            last = sent
            if still >= 6:
                break
        assert sent < count, "the upstream was read to its end for a client reading nothing"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        got = bytearray()
        while not got.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
            more = await asyncio.wait_for(reader.read(1 << 20), 10)
            assert more, "the connection closed before the stream's end"
            got += more
        data = bytes(got)
        writer.close()
    finally:
        sock.close()
        up.close()
    assert sent == count, data[:300]
    payload = b"".join(event(i) for i in range(count))
    # Chunked framing off: what the client got, in order.
    pieces, at = [], 0
    while True:
        line_end = data.index(b"\r\n", at)
        length = int(data[at:line_end], 16)
        if not length:
            break
        pieces.append(data[line_end + 2 : line_end + 2 + length])
        at = line_end + 4 + length
    same = b"".join(pieces) == payload  # a bool: pytest's diff of 12 MiB would take minutes
    assert same, f"{sum(map(len, pieces))} bytes relayed of {len(payload)}, or out of order"


# --- client disconnects ---------------------------------------------------------------


async def test_client_disconnect_mid_stream_closes_upstream(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    upstream.script(Sse([chunk(str(i)) for i in range(40)], delay=0.1))
    gw = await gateway(single(upstream))
    async with httpx.AsyncClient(timeout=10) as client:
        async with client.stream(
            "POST", f"{gw.base_url}/chat/completions", json=STREAM_BODY
        ) as resp:
            assert resp.status_code == 200
            async for data in resp.aiter_raw():
                if b"\n\n" in data:
                    break
            left = time.monotonic()
        # Leaving the block mid-body closes the client's connection.
        closed = await upstream.wait_closed(timeout=3.0)
    took = closed - left
    print(f"client close -> upstream close: {took * 1000:.1f} ms")
    assert took < 0.5, took


async def test_client_disconnect_while_waiting_closes_upstream(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    upstream.script(Hang())
    gw = await gateway(single(upstream))
    body = json.dumps({"model": "m", "messages": MESSAGES}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    for _ in range(300):
        if upstream.requests:
            break
        await asyncio.sleep(0.01)
    assert upstream.requests, "the request never reached the upstream"
    left = time.monotonic()
    writer.close()
    await writer.wait_closed()
    closed = await upstream.wait_closed(timeout=3.0)
    took = closed - left
    print(f"client close (waiting) -> upstream close: {took * 1000:.1f} ms")
    assert took < 0.5, took
    assert await reader.read() == b""  # nothing was answered


# --- late commit ----------------------------------------------------------------------


async def test_events_before_content_are_held_for_failover(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up1: Upstream = await make_upstream()
    up2: Upstream = await make_upstream()
    # The first provider sends a role-only delta and a comment, then the connection dies.
    up1.script(Sse([role_chunk(), b": ping\n\n", chunk("never")], drop_after=2))
    served = [role_chunk(), chunk("ok"), DONE]
    up2.script(Sse(served))
    gw = await gateway(
        routes(
            {"p1": provider(up1), "p2": provider(up2)},
            {
                "m": {
                    "providers": [
                        {"provider": "p1", "model": "upstream-model"},
                        {"provider": "p2", "model": "upstream-model"},
                    ]
                }
            },
        )
    )
    r = await post_stream(client, gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "p2"
    assert r.headers["x-gateway-attempts"] == "2"
    assert r.content == rewritten(b"".join(served))


async def test_stream_failing_before_content_on_last_candidate_is_http_error(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Sse([role_chunk(), chunk("late")], hang_after=1))
    gw = await gateway(single(upstream, {"timeout": {"read": 0.5}}))
    r = await post_stream(client, gw)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert r.headers["x-should-retry"] == "false"


async def test_late_commit_sends_keepalive_before_content(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    # Role-only delta at once, the first content 1.0 s later; commit_after is 0.3 s.
    upstream.script(Sse([role_chunk(), chunk("a") + DONE], delay=1.0))
    gw = await gateway(single(upstream, commit_after=0.3))
    chunks: list[tuple[float, bytes]] = []
    async with httpx.AsyncClient(timeout=10) as client:
        t0 = time.monotonic()
        async with client.stream(
            "POST", f"{gw.base_url}/chat/completions", json=STREAM_BODY
        ) as resp:
            t_head = time.monotonic() - t0
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for data in resp.aiter_raw():
                chunks.append((time.monotonic() - t0, data))
    body = b"".join(d for _, d in chunks)
    print(f"headers after {t_head:.3f}s; first bytes after {chunks[0][0]:.3f}s")
    # 200 and the first keep-alive went out while the upstream had not sent content yet.
    assert t_head < 0.85, t_head
    assert chunks[0][1].startswith(KEEPALIVE)
    assert chunks[0][0] < 0.85, chunks[0][0]
    assert b"late" not in chunks[0][1] and b'"a"' not in chunks[0][1]
    assert body == KEEPALIVE + rewritten(role_chunk() + chunk("a") + DONE)


async def test_without_content_nothing_is_committed_before_commit_after(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    # With the default commit_after (5 s), a role-only delta alone must not start the reply.
    upstream.script(Sse([role_chunk(), chunk("a"), DONE], delay=0.6))
    gw = await gateway(single(upstream))
    async with httpx.AsyncClient(timeout=10) as client:
        t0 = time.monotonic()
        async with client.stream(
            "POST", f"{gw.base_url}/chat/completions", json=STREAM_BODY
        ) as resp:
            t_head = time.monotonic() - t0
            body = await resp.aread()
    assert resp.status_code == 200
    assert t_head > 0.5, t_head  # the status waited for the content event (sent at 0.6 s)
    assert body == rewritten(role_chunk() + chunk("a") + DONE)


async def test_stream_silent_before_content_fails_over(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up1 = await make_upstream()
    up2 = await make_upstream()
    up1.script(Sse([role_chunk(), chunk("never")], hang_after=1))
    served = [chunk("ok"), DONE]
    up2.script(Sse(served))
    gw = await gateway(
        routes(
            {"p1": provider(up1, timeout={"read": 0.5}), "p2": provider(up2)},
            {
                "m": {
                    "providers": [
                        {"provider": "p1", "model": "upstream-model"},
                        {"provider": "p2", "model": "upstream-model"},
                    ]
                }
            },
        )
    )
    r = await post_stream(client, gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "p2"
    assert r.headers["x-gateway-attempts"] == "2"
    assert r.content == rewritten(b"".join(served))


async def test_first_event_error_fails_over(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up1: Upstream = await make_upstream()
    up2: Upstream = await make_upstream()
    up1.script(
        Sse(
            [
                b'data: {"error": {"message": "overloaded-xyz", "type": "server_error", "code": 503}}\n\n'
            ]
        )
    )
    served = [chunk("fine"), DONE]
    up2.script(Sse(served))
    gw = await gateway(
        routes(
            {"p1": provider(up1), "p2": provider(up2)},
            {
                "m": {
                    "providers": [
                        {"provider": "p1", "model": "upstream-model"},
                        {"provider": "p2", "model": "upstream-model"},
                    ]
                }
            },
        )
    )
    r = await post_stream(client, gw)
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "p2"
    assert r.headers["x-gateway-attempts"] == "2"
    assert r.content == rewritten(b"".join(served))
    assert b"overloaded-xyz" not in r.content
    assert len(up1.requests) == 1 and len(up2.requests) == 1


async def test_first_event_error_on_last_candidate_is_http_error(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(
        Sse(
            [
                b'data: {"error": {"message": "overloaded-xyz", "type": "server_error", "code": 503}}\n\n'
            ]
        )
    )
    gw = await gateway(single(upstream))
    r = await post_stream(client, gw)
    assert r.status_code >= 400, r.text
    assert b"overloaded-xyz" in r.content
    assert r.headers["x-should-retry"] == "false"
    assert r.headers.get("x-request-id")
