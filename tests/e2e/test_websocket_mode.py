"""Codex's WebSocket mode over real sockets (SPEC §14): the `websockets` library as the
client, the gateway's own server, a real loopback upstream speaking SSE."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.conftest import GatewayFactory
from tests.e2e.test_routing import MakeUpstream, until, urls
from tests.test_sockets import answer, routes


async def events(ws: Any, **body: Any) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "response.create", **body}))
    out = []
    while True:
        out.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        if out[-1]["type"] in ("response.completed", "error"):
            return out


async def test_turns_over_one_socket_then_http_continues_the_chain(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up = await make_upstream()
    up.script(answer("resp_1", "one"), answer("resp_2", "two"), answer("resp_3", "three"))
    gw = await gateway(routes(urls({"a": up})))
    url = f"ws://127.0.0.1:{gw.port}/v1/responses"
    beta = {"OpenAI-Beta": "responses_websockets=2026-02-06"}
    async with websockets.connect(url, additional_headers=beta) as ws:
        first = await events(ws, model="m", input="hi")
        assert [e["type"] for e in first] == [
            "response.created", "response.output_text.delta", "response.completed"]  # fmt: skip
        second = await events(ws, model="m", input="more", previous_response_id="resp_1")
        assert second[1]["delta"] == "two"
        [refused] = await events(ws, model="unknown", input="x")
        assert refused["type"] == "error" and refused["status"] == 400
        assert ws.state.name == "OPEN"
    r = await client.post(f"{gw.base_url}/responses",
                          json={"input": "x", "previous_response_id": "resp_2"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert [q.json().get("previous_response_id") for q in up.requests] == [
        None, "resp_1", "resp_2"]  # fmt: skip


async def test_a_frame_over_max_event_bytes_closes_with_1009(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    up = await make_upstream()
    gw = await gateway(routes(urls({"a": up})), max_event_bytes=4096)
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/v1/responses") as ws:
        await ws.send(json.dumps({"type": "response.create", "model": "m", "input": "x" * 5000}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert up.requests == []


@pytest.mark.parametrize(("path", "apis", "status"),
                         [("/v1/responses", "chat", 426), ("/v1/chat/completions", "chat", 404)])  # fmt: skip
async def test_the_upgrade_is_refused_at_once_where_nothing_serves_it(
    gateway: GatewayFactory, make_upstream: MakeUpstream, path: str, apis: str, status: int
) -> None:
    up = await make_upstream()
    gw = await gateway(routes(urls({"a": up}), apis=apis))
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(f"ws://127.0.0.1:{gw.port}{path}", open_timeout=5)
    assert refused.value.response.status_code == status
    assert json.loads(refused.value.response.body)["error"]["code"] in (
        "upgrade_required", "not_found")  # fmt: skip


async def test_the_sidecar_refuses_a_web_page_of_another_origin(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    up = await make_upstream()
    gw = await gateway(routes(urls({"a": up})))
    url = f"ws://127.0.0.1:{gw.port}/v1/responses"
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url, origin="http://evil.example", open_timeout=5)  # type: ignore[arg-type]
    assert refused.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as misdirected:
        # A rebound name: the socket reaches the gateway, the Host names another site.
        await websockets.connect(f"ws://evil.example:{gw.port}/v1/responses",
                                 host="127.0.0.1", port=gw.port, open_timeout=5)  # fmt: skip
    assert misdirected.value.response.status_code == 421


async def test_a_client_that_leaves_mid_turn_ends_the_turn_quietly(
    gateway: GatewayFactory, make_upstream: MakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    up = await make_upstream()
    slow = answer("resp_1", "first")
    slow.delay = 0.3  # between events: the client leaves after the first
    up.script(slow)
    gw = await gateway(routes(urls({"a": up})))
    ws = await websockets.connect(f"ws://127.0.0.1:{gw.port}/v1/responses")
    await ws.send(json.dumps({"type": "response.create", "model": "m", "input": "hi"}))
    first = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert first["type"] == "response.created"
    ws.transport.abort()  # gone without a close frame
    await until(lambda: gw.runtime.metrics.in_flight.value == 0)
    await until(lambda: len(up.closed) == 1)  # the upstream stream was closed too
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_a_socket_in_a_turn_never_gives_way_at_the_connection_cap(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    """Only idle connections give way (the socket's reader always waits in receive(): the
    app tells the server when a turn runs)."""
    up = await make_upstream()
    slow = answer("resp_1", "first")
    slow.first_delay = 0.5  # the upstream thinks: nothing is sent meanwhile
    up.script(slow)
    gw = await gateway(routes(urls({"a": up})), max_connections=1)
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/v1/responses") as ws:
        await ws.send(json.dumps({"type": "response.create", "model": "m", "input": "hi"}))
        await until(lambda: len(up.requests) == 1)
        r = await client.get(f"{gw.url}/healthz")
        assert r.status_code == 503  # nothing idle to give way
        events = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
        assert events[-1]["type"] == "response.completed"
    # Idle again: it gives way to a newcomer (closed with 1001).
    async with websockets.connect(f"ws://127.0.0.1:{gw.port}/v1/responses") as idle:
        await asyncio.sleep(0)
        r = await client.get(f"{gw.url}/healthz")
        assert r.status_code == 200
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(idle.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
