"""gateway/upstream/websocket.py: a WebSocket turn to an entry with `websocket: true`
goes over an upstream WebSocket of the client socket's own (SPEC §14). The upstream is
a real WebSocket server on loopback (the `websockets` library); the client the
in-memory ASGI side of tests/test_sockets.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tests.conftest import GatewayFactory
from tests.e2e.test_routing import MakeUpstream, urls
from tests.test_sockets import Client, answer


@dataclass
class WsUpstream:
    """Answers each response.create with created, a delta and completed (or, with
    generate: false, created and completed); records handshakes and frames."""

    refuse: int | None = None  # answer the upgrade with this status
    cut_after: int | None = None  # close the socket after this many frames
    close_after_turn: bool = False  # close the socket once a turn is answered (idle close)
    delta: str = "turn {n}"
    handshakes: list[dict[str, str]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    def check(self, conn: ServerConnection, request: Request) -> Response | None:
        self.handshakes.append({k.lower(): v for k, v in request.headers.raw_items()})
        if self.refuse is not None:
            body = json.dumps({"error": {"message": "no", "type": "x", "code": "denied"}})
            headers = Headers([("content-type", "application/json")])
            return Response(self.refuse, "Refused", headers, body.encode())
        return None

    async def handler(self, conn: ServerConnection) -> None:
        async for message in conn:
            frame = json.loads(message)
            self.frames.append(frame)
            if self.cut_after is not None and len(self.frames) >= self.cut_after:
                await conn.close()
                return
            n = len(self.frames)
            response = {"id": f"resp_ws{n}", "object": "response", "model": frame.get("model")}
            await conn.send(json.dumps({"type": "response.created", "response": response}))
            if frame.get("generate") is not False:
                await conn.send(json.dumps({"type": "response.output_text.delta",
                                            "delta": self.delta.format(n=n)}))  # fmt: skip
            usage = {"input_tokens": 7, "output_tokens": 2, "total_tokens": 9}
            await conn.send(json.dumps({"type": "response.completed",
                                        "response": {**response, "usage": usage}}))  # fmt: skip
            if self.close_after_turn:
                await asyncio.sleep(0.02)  # after the turn, while the link idles
                await conn.close()
                return


@pytest.fixture
async def ws_upstream() -> AsyncIterator[WsUpstream]:
    up = WsUpstream()
    async with serve(up.handler, "127.0.0.1", 0, process_request=up.check) as server:
        up.port = server.sockets[0].getsockname()[1]
        yield up


def routes(ws: WsUpstream, sse: dict[str, str] | None = None) -> str:
    providers: dict[str, Any] = {
        "ws": {"base_url": f"http://127.0.0.1:{ws.port}/v1", "apis": ["responses"],
               "websocket": True, "api_key": "sk-provider"},
    }  # fmt: skip
    entries = [{"provider": "ws", "model": "up-ws"}]
    for name, url in (sse or {}).items():
        providers[name] = {"base_url": url, "apis": ["responses"]}
        entries.append({"provider": name, "model": f"up-{name}"})
    return yaml.safe_dump({"providers": providers, "models": {"m": {"providers": entries}}})


async def test_turns_and_the_warm_up_go_over_one_upstream_socket(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    gw = await gateway(routes(ws_upstream))
    ws = Client(gw, **{"openai-beta": "responses_websockets=2026-02-06"})
    await ws.next()
    warm = await ws.turn(model="m", input="one", generate=False)
    assert [e["type"] for e in warm] == ["response.created", "response.completed"]
    first = await ws.turn(model="m", input="two", previous_response_id="resp_ws1", store=False)
    second = await ws.turn(model="m", input="three", previous_response_id="resp_ws2")
    assert first[1]["delta"] == "turn 2" and second[1]["delta"] == "turn 3"
    assert first[0]["response"]["model"] == "m"  # rewritten back to the client's name
    assert len(ws_upstream.handshakes) == 1
    hs = ws_upstream.handshakes[0]
    assert hs["authorization"] == "Bearer sk-provider"
    assert hs["openai-beta"] == "responses_websockets=2026-02-06"
    assert ws_upstream.frames == [
        {"type": "response.create", "model": "up-ws", "input": "one", "generate": False},
        {"type": "response.create", "model": "up-ws", "input": "two",
         "previous_response_id": "resp_ws1", "store": False},
        {"type": "response.create", "model": "up-ws", "input": "three",
         "previous_response_id": "resp_ws2"},
    ]  # fmt: skip
    await ws.close()
    await asyncio.sleep(0)  # the link closes with the client's socket
    assert gw.runtime.metrics.in_flight.value == 0


async def test_a_refused_upgrade_falls_back_to_the_next_entry(
    gateway: GatewayFactory, ws_upstream: WsUpstream, make_upstream: MakeUpstream
) -> None:
    ws_upstream.refuse = 503
    sse = await make_upstream()
    sse.script(answer("resp_sse", "over sse", model="up-b"))
    gw = await gateway(routes(ws_upstream, urls({"b": sse})))
    ws = Client(gw)
    await ws.next()
    events = await ws.turn(model="m", input="hi")
    assert events[1]["delta"] == "over sse"
    assert len(ws_upstream.handshakes) == 1 and len(sse.requests) == 1
    await ws.close()


async def test_a_refusal_that_is_the_clients_is_an_error_event(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    ws_upstream.refuse = 401
    gw = await gateway(routes(ws_upstream))
    ws = Client(gw)
    await ws.next()
    [error] = await ws.turn(model="m", input="hi")
    assert error["type"] == "error" and error["status"] == 401
    assert error["error"]["code"] == "denied"
    await ws.close()


async def test_an_upstream_socket_cut_mid_turn_is_an_error_then_a_new_link(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    ws_upstream.cut_after = 1
    gw = await gateway(routes(ws_upstream))
    ws = Client(gw)
    await ws.next()
    [error] = await ws.turn(model="m", input="hi")
    assert error["type"] == "error" and error["status"] == 502
    ws_upstream.cut_after = None
    events = await ws.turn(model="m", input="again")
    assert events[-1]["type"] == "response.completed"
    assert len(ws_upstream.handshakes) == 2  # the broken link was not reused
    await ws.close()


async def test_a_link_the_upstream_closed_while_idle_is_replaced_not_failed(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    ws_upstream.close_after_turn = True
    gw = await gateway(routes(ws_upstream))
    ws = Client(gw)
    await ws.next()
    for n in (1, 2, 3):
        events = await ws.turn(model="m", input=f"turn {n}")
        assert events[-1]["type"] == "response.completed", (n, events[-1])
        await asyncio.sleep(0.05)  # the upstream's close lands while the link is idle
    assert len(ws_upstream.handshakes) == 3
    assert gw.runtime.health.state(("ws", "up-ws", "")).failures == 0
    await ws.close()


async def test_a_turn_ends_at_its_terminal_event_type_not_at_a_word_in_it(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    ws_upstream.delta = 'error "response.completed" {n}'
    gw = await gateway(routes(ws_upstream))
    ws = Client(gw)
    await ws.next()
    first = await ws.turn(model="m", input="one")
    assert [e["type"] for e in first] == [
        "response.created", "response.output_text.delta", "response.completed"]  # fmt: skip
    second = await ws.turn(model="m", input="two")
    assert second[1]["delta"] == 'error "response.completed" 2'
    assert len(ws_upstream.handshakes) == 1
    await ws.close()


async def test_an_open_link_holds_one_of_the_providers_connection_slots(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    """`max_connections` bounds a provider's WebSockets as its HTTP connections: a link
    holds a slot while open, another socket's turn waits at most the connect timeout for
    one, and a closed link gives its slot back."""
    config = yaml.safe_load(routes(ws_upstream))
    config["providers"]["ws"] |= {"max_connections": 1, "timeout": {"connect": 0.3}}
    gw = await gateway(yaml.safe_dump(config))
    first, second = Client(gw), Client(gw)
    await first.next()
    await second.next()
    assert (await first.turn(model="m", input="one"))[-1]["type"] == "response.completed"
    [error] = await second.turn(model="m", input="two")  # the one slot is first's link
    assert error["type"] == "error" and error["error"]["code"] == "upstream_timeout", error
    assert len(ws_upstream.handshakes) == 1
    await first.close()  # its link closes, and the slot is free again
    events = await second.turn(model="m", input="three")
    assert events[-1]["type"] == "response.completed", events[-1]
    assert len(ws_upstream.handshakes) == 2
    await second.close()


async def test_a_refused_or_broken_link_gives_its_slot_back(
    gateway: GatewayFactory, ws_upstream: WsUpstream
) -> None:
    config = yaml.safe_load(routes(ws_upstream))
    config["providers"]["ws"] |= {"max_connections": 1, "timeout": {"connect": 0.3}}
    gw = await gateway(yaml.safe_dump(config))
    ws = Client(gw)
    await ws.next()
    ws_upstream.refuse = 401
    [error] = await ws.turn(model="m", input="refused")
    assert error["status"] == 401
    ws_upstream.refuse, ws_upstream.cut_after = None, 1
    [error] = await ws.turn(model="m", input="cut")  # its first frame: the socket is cut
    assert error["status"] == 502
    ws_upstream.cut_after = None
    events = await ws.turn(model="m", input="again")  # a slot is free for a third link
    assert events[-1]["type"] == "response.completed", events[-1]
    assert len(ws_upstream.handshakes) == 3
    await ws.close()
