"""SPEC §7, upstream side: what a misbehaving upstream can and cannot do to the gateway.

Real-socket tests drive the real gateway (httpx -> gateway -> a scripted raw upstream,
all on 127.0.0.1). Every scripted upstream echoes a per-request marker from the request
body into its answer, so a response that reached the wrong request would show. The
protocol tests at the end drive H1Connection on an in-memory transport.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import yaml

import gateway.wire.sse as sse_module
from gateway.errors import UpstreamResponseTooLarge
from gateway.upstream.connection import (
    _ALLOWED,
    HIGH_WATER,
    LOW_WATER,
    MAX_HEAD_BYTES,
    MAX_HEAD_FIELDS,
    ConnectionLost,
    H1Connection,
    State,
)
from gateway.upstream.pool import Origin, Pool
from gateway.wire.sse import EventSplitter
from tests.conftest import GatewayFactory, RunningGateway, one_provider
from tests.helpers import assert_envelope
from tests.scripted_upstream import DONE, Sse, Upstream, chat_completion, chunk

MESSAGES = [{"role": "user", "content": "hi"}]
KiB = 1024
MiB = 1024 * KiB

# --------------------------------------------------------------------------- raw upstream


class RawUpstream:
    """A raw TCP upstream on 127.0.0.1 that numbers its connections (from 1) and records
    which connection each request arrived on, with the request's marker."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.port = 0
        self.connections = 0
        self.requests: list[tuple[int, str]] = []  # (connection number, marker)
        self.closed: set[int] = set()  # connections the gateway closed (EOF or reset)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = self.connections
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(w)
        try:
            await self.handler(self, r, w, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed.add(n)
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(w)
            w.close()

    async def next_request(self, r: asyncio.StreamReader, n: int) -> str | None:
        """Read one request; its marker (recorded), or None once the gateway closed."""
        try:
            head = await r.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.add(n)
            return None
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await r.readexactly(length)
        marker = str(json.loads(body).get("marker"))
        self.requests.append((n, marker))
        return marker

    async def until_closed(self, r: asyncio.StreamReader, n: int, timeout: float = 5.0) -> bool:  # noqa: ASYNC109 (a bound, by design)
        """Discard what arrives until the gateway closes (bounded); True if it did."""
        try:
            async with asyncio.timeout(timeout):
                while await r.read(64 * KiB):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            pass
        self.closed.add(n)
        return True

    async def wait_closed(self, n: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (a bound, by design)
        """Until the gateway has closed connection `n` (bounded)."""
        deadline = time.monotonic() + timeout
        while n not in self.closed:
            assert time.monotonic() < deadline, f"the gateway never closed connection {n}"
            await asyncio.sleep(0.01)


RawHandler = Callable[
    [RawUpstream, asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]
]
MakeRaw = Callable[[RawHandler], Awaitable[RawUpstream]]


@pytest.fixture
async def raw() -> AsyncIterator[MakeRaw]:
    made: list[RawUpstream] = []

    async def make(handler: RawHandler) -> RawUpstream:
        up = RawUpstream(handler)
        await up.start()
        made.append(up)
        return up

    yield make
    for up in made:
        await up.stop()


def answer(marker: str, head: bytes = b"") -> bytes:
    """A whole 200 chat completion whose content is the request's marker."""
    body = json.dumps(chat_completion(content=marker)).encode()
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + head
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


def routes(*urls: str, read: float = 5.0) -> str:
    """Providers p1..pn at the URLs, in that order, all serving model `m`."""
    providers = {
        f"p{i}": {"base_url": url, "timeout": {"connect": 2, "read": read}}
        for i, url in enumerate(urls, 1)
    }
    targets = [{"provider": f"p{i}", "model": f"up-{i}"} for i in range(1, len(urls) + 1)]
    return yaml.safe_dump(
        {"providers": providers, "models": {"m": {"providers": targets}}}, sort_keys=False
    )


async def chat(
    client: httpx.AsyncClient, gw: RunningGateway, marker: str, **extra: Any
) -> httpx.Response:
    body = {"model": "m", "messages": MESSAGES, "marker": marker, **extra}
    return await client.post(f"{gw.base_url}/chat/completions", json=body)


def content(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


# --------------------------------------------------------------- 1. informational heads

INTERIM = {
    "100-continue": [b"HTTP/1.1 100 Continue\r\n\r\n"],
    "103-early-hints": [
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload; as=style\r\n"
        b"Link: </app.js>; rel=preload; as=script\r\n\r\n"
    ],
    "102-processing": [b"HTTP/1.1 102 Processing\r\n\r\n"],
    "102-103-100": [
        b"HTTP/1.1 102 Processing\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ],
}


@pytest.mark.parametrize("paused", [True, False], ids=["then-a-moment-later", "same-write"])
@pytest.mark.parametrize("interim", list(INTERIM.values()), ids=list(INTERIM))
async def test_informational_heads_are_skipped_and_never_answer_another_request(
    raw: MakeRaw,
    gateway: GatewayFactory,
    client: httpx.AsyncClient,
    interim: list[bytes],
    paused: bool,
) -> None:
    async def handler(
        up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
    ) -> None:
        while (marker := await up.next_request(r, n)) is not None:
            if paused:
                for head in interim:
                    w.write(head)
                    await w.drain()
                    await asyncio.sleep(0.03)  # the script: the real answer comes later
                w.write(answer(marker))
            else:
                w.write(b"".join(interim) + answer(marker))
            await w.drain()

    up = await raw(handler)
    gw = await gateway(routes(up.url))
    first = await chat(client, gw, "first")
    assert content(first) == "first"
    assert "link" not in first.headers  # an interim head's fields are not the answer's
    second = await chat(client, gw, "second")
    assert content(second) == "second"
    # The second request went over the same kept-alive connection: the path on which an
    # interim head mistaken for the answer would hand one request's answer to the next.
    assert up.requests == [(1, "first"), (1, "second")]
    many = await asyncio.gather(*(chat(client, gw, f"c{i}") for i in range(4)))
    assert [content(r) for r in many] == [f"c{i}" for i in range(4)]
    assert sorted(m for _, m in up.requests[2:]) == [f"c{i}" for i in range(4)]


# ------------------------------------------------------- 2. bytes after a response's end

EXTRA = {
    "whole-second-response": answer("LEAKED"),
    "garbage": b"garbage that is no response at all\r\n\r\n",
    "stray-100-continue": b"HTTP/1.1 100 Continue\r\n\r\n",
    "stray-crlf": b"\r\n",
}


@pytest.mark.parametrize("later", [False, True], ids=["same-write", "later-write"])
@pytest.mark.parametrize("extra", list(EXTRA.values()), ids=list(EXTRA))
async def test_bytes_after_a_response_close_its_connection(
    raw: MakeRaw,
    gateway: GatewayFactory,
    client: httpx.AsyncClient,
    extra: bytes,
    later: bool,
) -> None:
    answered = asyncio.Event()

    async def handler(
        up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
    ) -> None:
        while (marker := await up.next_request(r, n)) is not None:
            if marker != "first":
                w.write(answer(marker))
            elif later:
                w.write(answer(marker))
                await w.drain()
                # The extra bytes come once the gateway has relayed the answer (and put
                # the connection back in its pool).
                await asyncio.wait_for(answered.wait(), 5)
                w.write(extra)
            else:
                w.write(answer(marker) + extra)
            await w.drain()

    up = await raw(handler)
    gw = await gateway(routes(up.url))
    first = await chat(client, gw, "first")
    assert content(first) == "first"
    assert "LEAKED" not in first.text
    answered.set()
    if later:
        # Bytes that come after the answer was relayed: the gateway must notice them on
        # its idle connection and close it (bounded wait) before the next request.
        await up.wait_closed(1)
    second = await chat(client, gw, "second")
    assert content(second) == "second"
    third = await chat(client, gw, "third")
    assert content(third) == "third"
    # Never reused: the next requests came on a new connection (kept alive between them).
    assert up.requests == [(1, "first"), (2, "second"), (2, "third")]
    await up.wait_closed(1)


# ---------------------------------------------------------------- 3. 101 Switching Protocols

SWITCH = {
    "with-upgrade": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\n\x81\x05hello",
    "without-upgrade": b"HTTP/1.1 101 Switching Protocols\r\n\r\nnot http any more",
    "after-100": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n"
    b"Upgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
}


def answering(data: bytes) -> Callable[..., Awaitable[None]]:
    """A raw upstream handler: read one request, send `data`, wait for the close."""

    async def handler(
        up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
    ) -> None:
        if await up.next_request(r, n) is None:
            return
        w.write(data)
        await w.drain()
        await up.until_closed(r, n)

    return handler


@pytest.mark.parametrize("head", list(SWITCH.values()), ids=list(SWITCH))
async def test_switching_protocols_fails_the_attempt(
    raw: MakeRaw,
    gateway: GatewayFactory,
    make_upstream: Callable[[], Awaitable[Upstream]],
    client: httpx.AsyncClient,
    head: bytes,
) -> None:
    up = await raw(answering(head))
    good = await make_upstream()

    # As the only provider: 502 upstream_unavailable, and the process keeps serving.
    alone = await gateway(routes(up.url), reload_interval=0)
    r = await chat(client, alone, "solo")
    assert_envelope(r, 502, "upstream_unavailable")
    await up.wait_closed(1)
    health = await client.get(f"{alone.url}/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"

    # With a second provider: the fallback serves.
    both = await gateway(routes(up.url, good.url), reload_interval=0)
    r = await chat(client, both, "fallback")
    assert content(r) == "hi"
    assert r.headers["x-gateway-provider"] == "p2"
    assert r.headers["x-gateway-attempts"] == "2"
    assert good.requests[-1].json()["marker"] == "fallback"
    await up.wait_closed(2)
    assert (await client.get(f"{both.url}/healthz")).status_code == 200


# ------------------------------------------------------------------------ 4. head limits


def fields(count: int, size: int) -> bytes:
    return b"".join(b"x-f%d: %s\r\n" % (i, b"v" * size) for i in range(count))


HEAD_START = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"


def head_and_body(extra_fields: bytes) -> bytes:
    body = json.dumps(chat_completion(content="too big")).encode()
    return HEAD_START + extra_fields + b"content-length: %d\r\n\r\n" % len(body) + body


async def big_head_paused(
    up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
) -> None:
    """80 KiB of head fields (80 of them), then nothing until the gateway gives up: the
    head is over the limit before its end has been sent."""
    if await up.next_request(r, n) is None:
        return
    w.write(HEAD_START + fields(80, 1000))
    await w.drain()
    if not await up.until_closed(r, n):
        w.write(b"content-length: 2\r\n\r\nok")  # the gateway waited for the rest: wrong
        await w.drain()
        await up.until_closed(r, n)


async def huge_head_one_write(
    up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
) -> None:
    """A whole 1 MiB head (128 fields of 8 KiB) with its body, in one write."""
    if await up.next_request(r, n) is None:
        return
    w.write(head_and_body(fields(128, 8 * KiB)))
    await w.drain()
    await up.until_closed(r, n)


async def many_fields(
    up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
) -> None:
    """300 small fields, under 5 KiB in all, with a body, in one write."""
    if await up.next_request(r, n) is None:
        return
    w.write(head_and_body(fields(300, 2)))
    await w.drain()
    await up.until_closed(r, n)


@pytest.mark.parametrize(
    "handler",
    [big_head_paused, huge_head_one_write, many_fields],
    ids=["80KiB-head-then-a-pause", "1MiB-head-one-write", "300-fields"],
)
async def test_oversized_response_head_fails_the_attempt(
    raw: MakeRaw, gateway: GatewayFactory, client: httpx.AsyncClient, handler: RawHandler
) -> None:
    up = await raw(handler)
    gw = await gateway(routes(up.url))
    r = await chat(client, gw, "big")
    assert_envelope(r, 502, "upstream_unavailable")
    await up.wait_closed(1)
    assert (await client.get(f"{gw.url}/healthz")).status_code == 200


async def test_oversized_response_head_in_one_read_fails_the_attempt(
    raw: MakeRaw, gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    async def handler(
        up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
    ) -> None:
        if await up.next_request(r, n) is None:
            return
        w.write(head_and_body(fields(80, 1000)))  # 80 KiB head, 80 fields, one write
        await w.drain()
        await up.until_closed(r, n)

    up = await raw(handler)
    gw = await gateway(routes(up.url))
    r = await chat(client, gw, "big")
    assert_envelope(r, 502, "upstream_unavailable")


async def test_large_but_allowed_head_is_served(
    raw: MakeRaw, gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    """The control: 200 fields and about 40 KiB of head are within both limits."""

    async def handler(
        up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
    ) -> None:
        while (marker := await up.next_request(r, n)) is not None:
            w.write(answer(marker, fields(200, 180)))
            await w.drain()

    up = await raw(handler)
    gw = await gateway(routes(up.url))
    r = await chat(client, gw, "fits")
    assert content(r) == "fits"
    assert r.headers["x-f199"] == "v" * 180


# ---------------------------------------------------------------------- 5. response size


@cache
def gzip_bomb() -> bytes:
    """512 MiB of zeros as one gzip member: about 510 KB on the wire."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MiB)
    bomb = b"".join([packer.compress(zeros) for _ in range(512)]) + packer.flush()
    assert len(bomb) < 600 * KiB
    return bomb


async def serve_gzip_bomb(
    up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
) -> None:
    bomb = gzip_bomb()
    while await up.next_request(r, n) is not None:
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
            b"content-length: %d\r\n\r\n" % len(bomb)
        )
        w.write(bomb)
        await w.drain()


def vm_hwm(pid: int) -> int:
    """Peak resident set size of the process, in bytes (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    assert match is not None, status
    return int(match.group(1)) * KiB


async def test_gzip_bomb_is_refused_with_bounded_memory(
    raw: MakeRaw, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    """`python -m gateway serve` with the default --max-response-bytes (64 MiB): a 510 KB
    gzip body that decodes to 512 MiB is refused, and the process's peak RSS stays far
    below what decoding it (or even a quarter of it) would take."""
    up = await raw(serve_gzip_bomb)
    # A read timeout far past the decoding's own time: on a loaded machine (the suite
    # runs in several processes) 64 MiB of inflating must not pass for a silent upstream.
    (tmp_path / "routes.yaml").write_text(routes(up.url, read=60))
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    args = ["--routes", "routes.yaml", "--port", "0", "--log-level", "warning"]
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            *args,
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = None
        deadline = time.monotonic() + 15
        while url is None:
            assert proc.returncode is None, f"gateway exited: {log_path.read_text()}"
            assert time.monotonic() < deadline, f"gateway did not start: {log_path.read_text()}"
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", log_path.read_text())
            if found:
                try:
                    if (await client.get(f"{found.group(1)}/healthz")).status_code == 200:
                        url = found.group(1)
                except httpx.TransportError:
                    pass
            if url is None:
                await asyncio.sleep(0.05)
        before = vm_hwm(proc.pid)
        r = await client.post(
            f"{url}/v1/chat/completions", json={"model": "m", "messages": MESSAGES}, timeout=90
        )
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] in ("upstream_response_too_large", "upstream_unavailable")
        peak = vm_hwm(proc.pid)
        # Decoding the whole bomb would need over 512 MiB (1 GiB joined); the 64 MiB limit
        # bounds it to the limit plus the process itself.
        assert peak < 300 * MiB, f"peak RSS {peak / MiB:.0f} MiB (before: {before / MiB:.0f} MiB)"
        assert (await client.get(f"{url}/healthz")).status_code == 200
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)


async def test_gzip_bomb_over_a_small_limit_is_upstream_response_too_large(
    raw: MakeRaw, gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    up = await raw(serve_gzip_bomb)
    gw = await gateway(routes(up.url), max_response_bytes=MiB)
    r = await chat(client, gw, "bomb")
    assert r.json()["error"]["code"] == "upstream_response_too_large", r.text
    assert_envelope(r, 502, "upstream_response_too_large")


async def identity_body(
    up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
) -> None:
    while (marker := await up.next_request(r, n)) is not None:
        if marker == "big":
            w.write(answer("x" * (200 * KiB)))
        else:
            w.write(answer(marker))
        await w.drain()


async def test_plain_body_over_the_limit_fails_as_502(
    raw: MakeRaw, gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    up = await raw(identity_body)
    gw = await gateway(routes(up.url), max_response_bytes=64 * KiB)
    r = await chat(client, gw, "big")
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] in ("upstream_response_too_large", "upstream_unavailable")
    assert "xxxxxxxx" not in r.text
    # An answer under the limit still goes through (on a fresh connection: the unread
    # rest of the refused one cannot be reused).
    assert content(await chat(client, gw, "small")) == "small"
    assert up.requests == [(1, "big"), (2, "small")]


async def test_plain_body_over_the_limit_is_upstream_response_too_large(
    raw: MakeRaw, gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    up = await raw(identity_body)
    gw = await gateway(routes(up.url), max_response_bytes=64 * KiB)
    r = await chat(client, gw, "big")
    assert r.json()["error"]["code"] == "upstream_response_too_large", r.text
    assert_envelope(r, 502, "upstream_response_too_large")


# ------------------------------------------------------------------------------- 6. streams

EVENT_LIMIT = 64 * KiB


def sse_routes(upstream: Upstream) -> str:
    return routes(upstream.url, read=3)


async def stream_chat(client: httpx.AsyncClient, gw: RunningGateway) -> tuple[int, str, bytes]:
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    async with client.stream("POST", f"{gw.base_url}/chat/completions", json=body) as r:
        data = await r.aread()
        return r.status_code, r.headers.get("content-type", ""), data


def final_error(data: bytes) -> dict[str, Any]:
    """The stream ends with exactly one `data: {"error": ...}` event and no [DONE]."""
    assert data.endswith(b"\n\n"), data[-200:]
    last = data[:-2].rsplit(b"\n\n", 1)[-1]
    assert last.startswith(b"data: "), last[:200]
    payload = json.loads(last[len(b"data: ") :])
    assert list(payload) == ["error"]
    assert set(payload["error"]) == {"message", "type", "code"}
    assert b"[DONE]" not in data
    return cast(dict[str, Any], payload["error"])


async def test_event_over_max_event_bytes_after_content_ends_the_stream(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """Content went out, then an event grows past --max-event-bytes without ending: the
    client gets the events before it, then the error event, and the stream ends."""
    parts = [b'data: {"pad": "' + b"a" * (16 * KiB)] + [b"a" * (16 * KiB)] * 15  # 256 KiB
    events = [chunk("Hel"), chunk("lo"), *parts, b'"}\n\n', chunk("never"), DONE]
    # Paced, then silent (socket open) once the big event is out: only the limit can end it.
    upstream.script(Sse(events, delay=0.01, hang_after=2 + len(parts)))
    gw = await gateway(sse_routes(upstream), max_event_bytes=EVENT_LIMIT)
    status, ctype, data = await stream_chat(client, gw)
    assert status == 200
    assert ctype.startswith("text/event-stream")
    assert data.startswith(chunk("Hel", model="m") + chunk("lo", model="m"))
    assert b"aaaa" not in data  # no byte of the oversized event went out
    assert b"never" not in data
    assert final_error(data)["code"] == "upstream_response_too_large"
    await upstream.wait_closed()  # and the upstream request is closed


async def test_event_over_max_event_bytes_finished_by_a_later_read_ends_the_stream(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    big = b'data: {"pad": "' + b"a" * (40 * KiB)
    events = [chunk("Hel"), big, b"a" * (40 * KiB) + b'"}\n\n', chunk("lo"), DONE]
    upstream.script(Sse(events, delay=0.02))
    gw = await gateway(sse_routes(upstream), max_event_bytes=EVENT_LIMIT)
    status, _, data = await stream_chat(client, gw)
    assert status == 200
    assert data.startswith(chunk("Hel", model="m"))
    assert b"aaaa" not in data
    assert final_error(data)["code"] == "upstream_response_too_large"


def role_only(pad: int) -> bytes:
    """A chunk with no content (role only), padded: held until content arrives."""
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}],
        "pad": "p" * pad,
    }
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def test_events_held_before_content_over_the_limit_are_an_http_error(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """Each held event is small, but together they pass --max-event-bytes before any
    content: a proper HTTP 502, never a 200."""
    held = [role_only(500)] * 150  # ~100 KiB, every event under 1 KiB
    upstream.script(Sse([*held, chunk("late"), DONE]))
    gw = await gateway(sse_routes(upstream), max_event_bytes=EVENT_LIMIT)
    status, ctype, data = await stream_chat(client, gw)
    assert status == 502, data[:300]
    assert ctype.startswith("application/json")
    err = json.loads(data)["error"]
    assert err["code"] in ("upstream_response_too_large", "upstream_unavailable")
    assert b"late" not in data


async def test_events_held_before_content_over_the_limit_are_upstream_response_too_large(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Sse([*[role_only(500)] * 150, chunk("late"), DONE]))
    gw = await gateway(sse_routes(upstream), max_event_bytes=EVENT_LIMIT)
    status, _, data = await stream_chat(client, gw)
    assert status == 502
    assert json.loads(data)["error"]["code"] == "upstream_response_too_large"


async def test_held_events_under_the_limit_are_relayed(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """The control: the same shape under the limit streams normally."""
    held = [role_only(500)] * 40  # ~27 KiB
    upstream.script(Sse([*held, chunk("late"), DONE]))
    gw = await gateway(sse_routes(upstream), max_event_bytes=EVENT_LIMIT)
    status, _, data = await stream_chat(client, gw)
    assert status == 200
    assert data.count(b'"role": "assistant"') == 40
    assert data.endswith(chunk("late", model="m") + DONE)


# ------------------------------------------------------------------ 7. linear SSE splitting


class CountingPattern:
    """Stands in for a compiled regex; records how many bytes each search may look at."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.spans: list[int] = []

    def search(
        self, data: bytes, pos: int = 0, endpos: int = sys.maxsize
    ) -> re.Match[bytes] | None:
        self.spans.append(min(len(data), endpos) - pos)
        return self.pattern.search(data, pos, endpos)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pattern, name)


def spy_on_splitter(monkeypatch: pytest.MonkeyPatch) -> tuple[CountingPattern, list[int]]:
    pattern = CountingPattern(sse_module._EVENT_END)
    monkeypatch.setattr(sse_module, "_EVENT_END", pattern)
    scanned: list[int] = []
    real = sse_module.last_event_end

    def last_event_end(buf: bytes, lo: int, hi: int) -> int:
        scanned.append(hi - lo)
        return real(buf, lo, hi)

    monkeypatch.setattr(sse_module, "last_event_end", last_event_end)
    return pattern, scanned


def test_event_splitter_work_per_feed_is_bounded_by_the_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """20,000 reads of 1 KiB of one event that never ends (single newlines, no blank
    line): each feed searches at most its own bytes plus 3, never the event so far."""
    pattern, scanned = spy_on_splitter(monkeypatch)
    piece = b"x" * (KiB - 1) + b"\n"
    count = 20_000
    splitter = EventSplitter(limit=(count - 1) * KiB)
    for i in range(count - 1):
        assert splitter.feed_block(piece) == b"", i
    with pytest.raises(UpstreamResponseTooLarge) as info:
        splitter.feed_block(piece)
    assert info.value.code == "upstream_response_too_large"
    assert len(scanned) == count
    assert max(scanned) <= KiB + 3
    assert max(pattern.spans) <= KiB + 3
    assert sum(scanned) + sum(pattern.spans) <= 2 * count * (KiB + 3)


def test_event_splitter_returns_the_whole_event_when_it_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pattern, scanned = spy_on_splitter(monkeypatch)
    piece = b"y" * 1000 + b"\r\n"
    splitter = EventSplitter(limit=4 * MiB)
    for _ in range(3000):
        assert splitter.feed_block(piece) == b""
    block = splitter.feed_block(b"\r\nnext")
    assert block == piece * 3000 + b"\r\n"
    assert splitter.rest() == b"next"
    assert max(scanned) <= len(piece) + 3
    assert max(pattern.spans) <= len(piece) + 3


def test_event_splitter_refuses_an_oversized_event_that_arrives_whole() -> None:
    splitter = EventSplitter(limit=64 * KiB)
    with pytest.raises(UpstreamResponseTooLarge):
        splitter.feed_block(b"data: " + b"a" * (80 * KiB) + b"\n\n")


def test_event_splitter_refuses_an_oversized_tail_after_an_event() -> None:
    splitter = EventSplitter(limit=64 * KiB)
    with pytest.raises(UpstreamResponseTooLarge):
        splitter.feed_block(b"data: {}\n\n" + b"data: " + b"a" * (80 * KiB))


# ------------------------------------------------------------ 8. client credentials upstream

GATEWAY_SECRET = "sk-gw-client-secret-4242"
KEYS = f"keys:\n  - name: svc\n    key: {GATEWAY_SECRET}\n"
NEVER_FORWARDED = ("x-api-key", "api-key", "proxy-authorization", "cookie", "expect")


@pytest.mark.parametrize("keyed", [False, True], ids=["no-keys", "gateway-key"])
async def test_client_credentials_never_reach_the_upstream(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, keyed: bool
) -> None:
    headers = {
        "authorization": "Bearer sk-client-bearer",
        "x-api-key": "sk-client-x-api-key",
        "api-key": "sk-client-api-key",
        "proxy-authorization": "Basic Y2xpZW50OnNrLWNsaWVudA==",
        "cookie": "session=sk-client-cookie",
        "expect": "100-continue",
        "x-team": "search",
    }
    if keyed:
        headers["authorization"] = f"Bearer {GATEWAY_SECRET}"
    gw = await gateway(one_provider(upstream), KEYS if keyed else None)
    body = {"model": "m", "messages": MESSAGES}
    r = await client.post(f"{gw.base_url}/chat/completions", json=body, headers=headers)
    assert r.status_code == 200, r.text
    seen = upstream.requests[-1]
    names = [name for name, _ in seen.headers]
    for name in NEVER_FORWARDED:
        assert name not in names, seen.headers
    assert [v for k, v in seen.headers if k == "authorization"] == ["Bearer sk-upstream-secret"]
    assert seen.header("x-team") == "search"
    for _, value in seen.headers:
        assert "sk-client" not in value and GATEWAY_SECRET not in value
    assert seen.json()["messages"] == MESSAGES


# ------------------------------------------------------ 9. H1Connection protocol unit tests

REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: up\r\ncontent-length: 2\r\n\r\n{}"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeTransport:
    """In-memory transport: records what the connection does to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.pauses = 0
        self.resumes = 0
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def pause_reading(self) -> None:
        self.pauses += 1

    def resume_reading(self) -> None:
        self.resumes += 1

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted


_TRACED: list[Traced] = []


class Traced(H1Connection):
    """Records every state the connection enters and every change outside `_ALLOWED`,
    whether it goes through `_to` or assigns `state` directly on a hot path."""

    def __init__(self) -> None:
        self.trail: list[State] = []
        self.illegal: list[tuple[State, State]] = []
        super().__init__()
        _TRACED.append(self)

    @property
    def state(self) -> State:
        return cast(State, self.__dict__["_state"])

    @state.setter
    def state(self, new: State) -> None:
        old = self.__dict__.get("_state")
        if old is not None and new not in _ALLOWED[old]:
            # Recorded, not raised: a raise inside a parser callback would be taken for
            # a parse error. The autouse fixture below fails the test.
            self.illegal.append((old, new))
        self.__dict__["_state"] = new
        self.trail.append(new)


@pytest.fixture(autouse=True)
def _every_transition_is_in_the_table() -> Iterator[None]:
    _TRACED.clear()
    yield
    illegal = [(old.name, new.name) for conn in _TRACED for old, new in conn.illegal]
    _TRACED.clear()
    assert not illegal, f"state changes outside _ALLOWED: {illegal}"


def release_to_pool(conn: H1Connection) -> bool:
    """The pool's own release of a connection whose answer was read: True when it was
    kept for the next request, False when it was closed."""
    pool = Pool()
    origin = Origin("http", "127.0.0.1", 9)
    pool._slots[origin] = asyncio.Semaphore(0)  # the slot this connection held
    pool.release(origin, conn)
    return conn in pool._idle.get(origin, [])


def state_of(conn: H1Connection) -> State:
    """The state now (a call, so a type checker does not narrow it across events)."""
    return conn.state


def reusable(conn: H1Connection) -> bool:
    """What Pool.release asks of a connection (H1Connection.recycle), without recycling
    it: DONE with nothing left unread."""
    return state_of(conn) is State.DONE and not conn.chunks


def closed(conn: H1Connection) -> bool:
    return state_of(conn) is State.CLOSED


def connect() -> tuple[Traced, FakeTransport]:
    conn = Traced()
    transport = FakeTransport()
    conn.connection_made(cast(asyncio.Transport, transport))
    return conn, transport


def sent() -> tuple[Traced, FakeTransport]:
    conn, transport = connect()
    conn.send(REQUEST)
    return conn, transport


def body_of(conn: H1Connection) -> bytes:
    parts = []
    while conn.chunks:
        parts.append(conn.take())
    return b"".join(parts)


def test_send_moves_idle_to_await_head_and_writes_the_request() -> None:
    conn, transport = connect()
    assert state_of(conn) is State.IDLE
    conn.send(REQUEST)
    assert state_of(conn) is State.AWAIT_HEAD
    assert transport.writes == [REQUEST]
    assert not reusable(conn)
    assert not conn.head_done


@pytest.mark.parametrize("interim", list(INTERIM.values()), ids=list(INTERIM))
def test_informational_heads_are_dropped_while_awaiting_the_final_one(
    interim: list[bytes],
) -> None:
    conn, _ = sent()
    for head in interim:
        conn.data_received(head)
        assert state_of(conn) is State.AWAIT_HEAD
        assert not conn.head_done
        assert conn.headers == []  # a 103's Link fields are not the answer's
        assert conn.error is None
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Final: 1\r\n\r\n")
    assert state_of(conn) is State.BODY
    assert conn.status == 200
    assert conn.headers == [(b"content-length", b"2"), (b"x-final", b"1")]
    conn.data_received(b"ok")
    assert state_of(conn) is State.DONE
    assert body_of(conn) == b"ok"
    assert conn.trail == [State.IDLE, State.AWAIT_HEAD, State.BODY, State.DONE]


def test_final_head_then_body_then_done_then_reused() -> None:
    conn, transport = sent()
    response = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 11\r\n\r\nhello world"
    )
    head_end = response.index(b"\r\n\r\n") + 4
    for i in range(head_end):  # the head one byte at a time
        assert state_of(conn) is State.AWAIT_HEAD
        conn.data_received(response[i : i + 1])
    assert state_of(conn) is State.BODY
    assert conn.head_done and conn.status == 200
    conn.data_received(response[head_end : head_end + 5])
    assert state_of(conn) is State.BODY
    assert not reusable(conn) and not conn.ended
    conn.data_received(response[head_end + 5 :])
    assert state_of(conn) is State.DONE and conn.ended
    assert not reusable(conn)  # body bytes still buffered
    assert body_of(conn) == b"hello world"
    assert reusable(conn)
    assert release_to_pool(conn)
    assert state_of(conn) is State.IDLE
    # The next request on the same connection starts clean.
    conn.send(REQUEST)
    assert conn.status == 0 and conn.headers == [] and not conn.ended and conn.error is None
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    conn.data_received(b"0\r\n\r\n")
    assert state_of(conn) is State.DONE
    assert body_of(conn) == b"abc"
    assert reusable(conn)
    assert conn.trail == [
        State.IDLE, State.AWAIT_HEAD, State.BODY, State.DONE,
        State.IDLE, State.AWAIT_HEAD, State.BODY, State.DONE,
    ]  # fmt: skip
    assert transport.writes == [REQUEST, REQUEST]
    assert not transport.closed and not transport.aborted


@pytest.mark.parametrize(
    "response",
    [
        OK.replace(b"HTTP/1.1", b"HTTP/1.0"),
        OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
    ],
    ids=["http-1.0", "connection-close"],
)
def test_response_that_closes_is_never_reusable(response: bytes) -> None:
    conn, _ = sent()
    conn.data_received(response)
    assert conn.ended
    assert state_of(conn) is State.MUST_CLOSE
    assert body_of(conn) == b"ok"
    assert not reusable(conn)


@pytest.mark.parametrize(
    "extra",
    [answer("LEAKED"), b"garbage", b"HTTP/1.1 100 Continue\r\n\r\n", b"x"],
    ids=["second-response", "garbage", "stray-100", "one-byte"],
)
@pytest.mark.parametrize("same_read", [True, False], ids=["same-read", "later-read"])
def test_bytes_after_the_end_mark_must_close(extra: bytes, same_read: bool) -> None:
    conn, transport = sent()
    if same_read:
        conn.data_received(OK + extra)
    else:
        conn.data_received(OK)
        assert state_of(conn) is State.DONE
        conn.data_received(extra)
    assert conn.ended  # the response itself ended at its framing...
    assert conn.error is None
    assert body_of(conn) == b"ok"  # ...with exactly its own body
    assert not reusable(conn)  # ...but the connection is never reused
    assert State.MUST_CLOSE in conn.trail
    assert state_of(conn) is State.CLOSED
    assert transport.closed or transport.aborted


@pytest.mark.parametrize("extra", [b"\r\n", b"\n"], ids=["crlf", "lf"])
def test_stray_line_end_after_the_end_in_the_same_read_must_close(extra: bytes) -> None:
    conn, _ = sent()
    conn.data_received(OK + extra)
    assert body_of(conn) == b"ok"
    assert not reusable(conn)


def test_bytes_while_idle_make_it_unusable() -> None:
    conn, transport = sent()
    conn.data_received(OK)
    assert body_of(conn) == b"ok"
    assert release_to_pool(conn)
    assert state_of(conn) is State.IDLE
    conn.data_received(answer("LEAKED"))
    assert not reusable(conn)
    assert closed(conn)
    assert State.ERROR in conn.trail
    assert transport.closed or transport.aborted
    assert not conn.chunks  # nothing of it is kept for a later request
    with pytest.raises(RuntimeError):
        conn.send(REQUEST)


def test_bytes_on_a_fresh_connection_make_it_unusable() -> None:
    conn, transport = connect()
    conn.data_received(OK)
    assert closed(conn) and not reusable(conn)
    assert transport.closed or transport.aborted
    assert not conn.chunks


def test_malformed_response_is_an_error() -> None:
    conn, transport = sent()
    conn.data_received(b"this is not http\r\n\r\n")
    assert isinstance(conn.error, ConnectionLost)
    assert "malformed" in str(conn.error)
    assert not conn.error.before_response  # bytes came: a retry could repeat the request
    assert conn.trail[-2:] == [State.ERROR, State.CLOSED]
    assert transport.closed or transport.aborted
    assert not conn.chunks and not conn.ended


def test_connection_lost_mid_body_is_an_error() -> None:
    conn, _ = sent()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.connection_lost(None)
    assert isinstance(conn.error, ConnectionLost)
    assert not conn.error.before_response
    assert not conn.ended
    assert conn.trail[-2:] == [State.ERROR, State.CLOSED]
    assert body_of(conn) == b"abc"  # what came is readable; then the reader gets the error


def test_connection_lost_before_any_byte_may_be_retried() -> None:
    conn, _ = sent()
    conn.connection_lost(None)
    assert isinstance(conn.error, ConnectionLost)
    assert conn.error.before_response
    assert conn.trail[-2:] == [State.ERROR, State.CLOSED]


def test_eof_framed_body_ends_at_connection_lost() -> None:
    conn, _ = sent()
    conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil ")
    assert state_of(conn) is State.BODY and not conn.ended
    conn.data_received(b"the end")
    conn.connection_lost(None)
    assert conn.ended
    assert conn.error is None
    assert body_of(conn) == b"until the end"
    assert closed(conn) and not reusable(conn)


def test_eof_framed_body_cut_by_a_reset_is_an_error() -> None:
    conn, _ = sent()
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\npartial")
    conn.connection_lost(ConnectionResetError())
    assert not conn.ended
    assert isinstance(conn.error, ConnectionLost)


def test_transitions_outside_the_table_raise() -> None:
    conn, _ = sent()
    with pytest.raises(RuntimeError):
        conn.send(REQUEST)  # AWAIT_HEAD -> AWAIT_HEAD: one request at a time
    assert state_of(conn) is State.AWAIT_HEAD
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    with pytest.raises(RuntimeError):
        conn.send(REQUEST)  # BODY -> AWAIT_HEAD: a new request before the answer's end
    assert state_of(conn) is State.BODY
    refused = 0
    for old in State:
        for new in State:
            if new in _ALLOWED[old]:
                continue
            probe = H1Connection()
            probe.state = old
            with pytest.raises(RuntimeError):
                probe._to(new)
            assert probe.state is old
            refused += 1
    assert refused > 0
    assert _ALLOWED[State.CLOSED] == set()
    assert _ALLOWED[State.ERROR] == {State.CLOSED}
    assert _ALLOWED[State.MUST_CLOSE] == {State.CLOSED}
    assert State.IDLE in _ALLOWED[State.DONE]
    assert all(State.IDLE not in _ALLOWED[s] for s in State if s is not State.DONE)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
    ],
    ids=["with-upgrade", "without-upgrade", "after-100"],
)
def test_switching_protocols_is_an_error(head: bytes) -> None:
    conn, transport = sent()
    conn.data_received(head + b"\x81\x05hello")
    assert isinstance(conn.error, ConnectionLost)
    assert "switched protocols" in str(conn.error)
    assert not conn.head_done and not conn.chunks and not conn.ended
    assert State.ERROR in conn.trail and closed(conn)
    assert transport.closed or transport.aborted


def test_too_many_head_fields_is_an_error() -> None:
    conn, _ = sent()
    conn.data_received(HEAD_START + fields(MAX_HEAD_FIELDS, 1) + b"content-length: 2\r\n\r\nok")
    assert isinstance(conn.error, ConnectionLost)
    assert "too many fields" in str(conn.error)
    assert not conn.head_done and not conn.chunks
    # The control: exactly MAX_HEAD_FIELDS fields are fine.
    conn, _ = sent()
    conn.data_received(HEAD_START + fields(MAX_HEAD_FIELDS - 2, 1) + b"content-length: 2\r\n\r\nok")
    assert conn.error is None and conn.ended and len(conn.headers) == MAX_HEAD_FIELDS


def test_head_over_the_limit_across_reads_is_an_error() -> None:
    conn, transport = sent()
    conn.data_received(HEAD_START)
    line = b"x-pad: " + b"p" * 1000 + b"\r\n"
    fed = len(HEAD_START)
    while conn.error is None:
        assert fed <= MAX_HEAD_BYTES, "still waiting for a head past the limit"
        conn.data_received(line)
        fed += len(line)
    assert "too large" in str(conn.error)
    assert fed > MAX_HEAD_BYTES
    assert transport.closed or transport.aborted


PROCESSING = b"HTTP/1.1 102 Processing\r\n\r\n"


def test_endless_informational_heads_are_bounded() -> None:
    conn, _ = sent()
    fed = 0
    while conn.error is None:
        assert fed <= MAX_HEAD_BYTES, "1xx heads accepted past the head limit"
        conn.data_received(PROCESSING)
        fed += len(PROCESSING)
    assert closed(conn) and not conn.head_done


def test_head_over_the_limit_in_one_read_is_an_error() -> None:
    conn, _ = sent()
    conn.data_received(HEAD_START + fields(80, 1000) + b"content-length: 2\r\n\r\nok")
    assert isinstance(conn.error, ConnectionLost)
    assert not conn.head_done


FRAMING = {
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "te-and-cl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\n",
    "duplicate-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 7\r\n\r\nokokoko",
    "duplicate-cl-same": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    "cl-list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    "cl-negative": b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    "cl-overflow": b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    "bare-lf-in-head": b"HTTP/1.1 200 OK\r\nContent-Length: 2\nX-A: b\r\n\r\nok",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n  folded\r\nContent-Length: 2\r\n\r\nok",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "no-status-line": b"Content-Length: 2\r\n\r\nok",
}


@pytest.mark.parametrize("response", list(FRAMING.values()), ids=list(FRAMING))
@pytest.mark.parametrize("split", [False, True], ids=["one-read", "byte-by-byte"])
def test_ambiguous_framing_is_an_error_and_delivers_no_body(response: bytes, split: bool) -> None:
    conn, transport = sent()
    pieces = [response[i : i + 1] for i in range(len(response))] if split else [response]
    for piece in pieces:
        if closed(conn):
            break
        conn.data_received(piece)
    assert isinstance(conn.error, ConnectionLost), (conn.state, list(conn.chunks))
    assert not conn.error.before_response
    assert not conn.ended
    assert not conn.chunks
    assert State.ERROR in conn.trail and closed(conn)
    assert transport.closed or transport.aborted


@pytest.mark.parametrize("response", list(FRAMING.values()), ids=list(FRAMING))
async def test_ambiguous_framing_fails_the_attempt_through_the_gateway(
    raw: MakeRaw,
    gateway: GatewayFactory,
    make_upstream: Callable[[], Awaitable[Upstream]],
    client: httpx.AsyncClient,
    response: bytes,
) -> None:
    up = await raw(answering(response))
    good = await make_upstream()
    gw = await gateway(routes(up.url, good.url))
    r = await chat(client, gw, "fallback")
    assert content(r) == "hi"  # the second provider's answer, nothing of the first's
    assert r.headers["x-gateway-provider"] == "p2"
    assert r.headers["x-gateway-attempts"] == "2"
    await up.wait_closed(1)


async def test_broken_framing_after_content_ends_the_stream_with_an_error_event(
    raw: MakeRaw, gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    async def handler(
        up: RawUpstream, r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int
    ) -> None:
        if await up.next_request(r, n) is None:
            return
        w.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        for event in (chunk("Hel"), chunk("lo")):
            w.write(b"%x\r\n%s\r\n" % (len(event), event))
            await w.drain()
            await asyncio.sleep(0.01)  # the script: paced events
        w.write(b"zz\r\n" + chunk("never") + b"\r\n0\r\n\r\n")  # not a chunk size
        await w.drain()
        await up.until_closed(r, n)

    up = await raw(handler)
    gw = await gateway(routes(up.url))
    status, _, data = await stream_chat(client, gw)
    assert status == 200
    assert data.startswith(chunk("Hel", model="m") + chunk("lo", model="m"))
    assert b"never" not in data
    assert final_error(data)["code"] == "upstream_disconnected"
    await up.wait_closed(1)


def test_reading_pauses_at_high_water_and_resumes_at_low_water() -> None:
    conn, transport = sent()
    size = HIGH_WATER + 64 * KiB
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
    piece = b"b" * (16 * KiB)
    for _ in range(size // len(piece)):
        conn.data_received(piece)
    assert transport.pauses == 1 and transport.resumes == 0
    assert conn.ended
    taken = 0
    while conn.buffered > LOW_WATER:
        taken += len(conn.take())
        assert transport.resumes == (1 if conn.buffered <= LOW_WATER else 0)
    assert transport.resumes == 1
    assert taken + len(body_of(conn)) == size
    assert reusable(conn)


def unread_body() -> Traced:
    conn, _ = sent()
    conn.data_received(OK)  # "ok" not taken yet
    return conn


def half_body() -> Traced:
    conn, _ = sent()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    body_of(conn)
    return conn


def extra_bytes() -> Traced:
    conn, _ = sent()
    conn.data_received(OK + b"garbage")
    body_of(conn)
    return conn


def connection_close() -> Traced:
    conn, _ = sent()
    conn.data_received(OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    body_of(conn)
    return conn


def broken() -> Traced:
    conn, _ = sent()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
    conn.connection_lost(None)
    body_of(conn)
    return conn


def unanswered() -> Traced:
    return sent()[0]


@pytest.mark.parametrize(
    "make",
    [unread_body, half_body, extra_bytes, connection_close, broken, unanswered],
    ids=lambda f: f.__name__,
)
def test_pool_never_keeps_a_connection_that_is_not_reusable(make: Callable[[], Traced]) -> None:
    conn = make()
    transport = cast(FakeTransport, conn.transport)
    assert not reusable(conn)
    assert not release_to_pool(conn)
    assert closed(conn)
    assert transport.closed or transport.aborted


async def test_pool_hands_a_clean_connection_to_the_next_request() -> None:
    pool = Pool()
    origin = Origin("http", "127.0.0.1", 9)
    pool._slots[origin] = asyncio.Semaphore(0)
    conn, transport = sent()
    conn.data_received(OK)
    assert body_of(conn) == b"ok"
    pool.release(origin, conn)
    assert state_of(conn) is State.IDLE
    assert not transport.closed and not transport.aborted
    again, reused = await pool.acquire(origin, 1)
    assert again is conn and reused
    again.send(REQUEST)
    again.data_received(answer("next"))
    assert b"next" in body_of(again)
    pool.release(origin, again)
    pool.close()
    assert transport.closed or transport.aborted
