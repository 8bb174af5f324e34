"""gateway/sockets.py, Codex's WebSocket mode on the app side (SPEC §14): the ASGI
`websocket` scope driven in memory (the RFC 6455 framing is tests/server/'s), the
upstream a real loopback server, so each frame runs the same endpoint a POST does."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.e2e.test_routing import FAIL_500, MakeUpstream, urls
from tests.scripted_upstream import Sse, Upstream


def event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def answer(rid: str = "resp_up1", text: str = "hello", model: str = "up-a") -> Sse:
    response = {"id": rid, "object": "response", "model": model, "output": []}
    usage = {"input_tokens": 10, "output_tokens": 2, "total_tokens": 12}
    return Sse([
        event("response.created", response={**response, "status": "in_progress"}),
        event("response.output_text.delta", delta=text),
        event("response.completed", response={**response, "status": "completed",
                                               "usage": usage}),
    ])  # fmt: skip


def routes(ups: dict[str, str], apis: str = "responses", **opts: Any) -> str:
    doc = {
        "providers": {n: {"base_url": u, "apis": [apis]} for n, u in ups.items()},
        "models": {
            "m": {"providers": [{"provider": n, "model": f"up-{n}"} for n in ups], **opts},
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


class Client:
    """The ASGI side a WebSocket server presents to the app, in memory."""

    def __init__(self, gw: RunningGateway, path: str = "/v1/responses", **headers: str) -> None:
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        scope = {
            "type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "scheme": "ws", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "server": ("127.0.0.1", gw.port), "client": ("127.0.0.1", 1),
            "headers": [(b"host", f"127.0.0.1:{gw.port}".encode()),
                        *((k.replace("_", "-").encode(), v.encode()) for k, v in headers.items())],
            "subprotocols": [], "state": {}, "extensions": {"websocket.http.response": {}},
        }  # fmt: skip
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.task = asyncio.ensure_future(gw.app(scope, self.inbox.get, self.sent.put))

    async def next(self) -> dict[str, Any]:
        return await asyncio.wait_for(self.sent.get(), 5)

    async def frame(self) -> dict[str, Any]:
        message = await self.next()
        assert message["type"] == "websocket.send", message
        return json.loads(message["text"])

    async def turn(self, **body: Any) -> list[dict[str, Any]]:
        """Send response.create; the events up to response.completed or an error."""
        self.inbox.put_nowait(
            {"type": "websocket.receive", "text": json.dumps({"type": "response.create", **body})}
        )
        events = []
        while True:
            events.append(await self.frame())
            if events[-1]["type"] in ("response.completed", "error"):
                return events

    async def close(self) -> None:
        self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        await asyncio.wait_for(self.task, 5)


async def upstreams(make: MakeUpstream, *names: str) -> dict[str, Upstream]:
    return {n: await make() for n in names}


async def test_each_frame_is_served_like_a_post_and_its_events_come_back_as_frames(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    ups = await upstreams(make_upstream, "a")
    ups["a"].script(answer("resp_1", "hello"), answer("resp_2", "again"))
    gw = await gateway(routes(urls(ups)))
    ws = Client(gw, **{"openai-beta": "responses_websockets=2026-02-06", "session_id": "s1"})
    assert (await ws.next())["type"] == "websocket.accept"
    events = await ws.turn(model="m", input="hi", tools=[])
    assert [e["type"] for e in events] == [
        "response.created", "response.output_text.delta", "response.completed"]  # fmt: skip
    assert events[1]["delta"] == "hello"
    assert events[0]["response"]["model"] == "m"  # the client's name, as over SSE
    sent = ups["a"].requests[0]
    assert sent.path == "/v1/responses" and sent.method == "POST"
    assert sent.json() == {"model": "up-a", "input": "hi", "tools": [], "stream": True}
    assert sent.header("openai-beta") is None  # the socket's own header stays here
    assert sent.header("upgrade") is None and sent.header("sec-websocket-key") is None
    events = await ws.turn(model="m", input="more", previous_response_id="resp_1")
    assert events[1]["delta"] == "again"
    assert ups["a"].requests[1].json()["previous_response_id"] == "resp_1"
    await ws.close()


async def test_a_refused_frame_is_an_error_event_and_the_socket_stays_open(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    ups = await upstreams(make_upstream, "a")
    ups["a"].script(answer())
    gw = await gateway(routes(urls(ups)))
    ws = Client(gw)
    await ws.next()
    [error] = await ws.turn(model="nope", input="hi")
    assert error["status"] == 400 and error["error"]["code"] == "model_not_found"
    ws.inbox.put_nowait({"type": "websocket.receive", "text": "not json"})
    assert (await ws.frame())["error"]["code"] == "invalid_json"
    ws.inbox.put_nowait({"type": "websocket.receive", "text": '{"type": "session.update"}'})
    assert (await ws.frame())["error"]["code"] == "unsupported_event"
    events = await ws.turn(model="m", input="hi")
    assert events[-1]["type"] == "response.completed"
    assert len(ups["a"].requests) == 1
    await ws.close()


async def test_a_failing_entry_falls_back_before_any_frame(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    ups["a"].script(FAIL_500)
    ups["b"].script(answer(model="up-b"))
    gw = await gateway(routes(urls(ups)))
    ws = Client(gw)
    await ws.next()
    events = await ws.turn(model="m", input="hi")
    assert [e["type"] for e in events][-1] == "response.completed"
    assert len(ups["a"].requests) == 1 and len(ups["b"].requests) == 1
    await ws.close()


async def test_the_warm_up_is_answered_here_and_the_next_turn_carries_its_body(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    ups = await upstreams(make_upstream, "a")
    ups["a"].script(answer())
    gw = await gateway(routes(urls(ups)))
    ws = Client(gw)
    await ws.next()
    warm = await ws.turn(model="m", instructions="be brief", tools=[{"type": "x"}],
                         input=[{"role": "user", "content": "one"}], generate=False)  # fmt: skip
    assert [e["type"] for e in warm] == ["response.created", "response.completed"]
    assert warm[1]["response"]["output"] == [] and warm[1]["response"]["status"] == "completed"
    assert ups["a"].requests == []
    rid = warm[0]["response"]["id"]
    await ws.turn(model="m", input=[{"role": "user", "content": "two"}], previous_response_id=rid)
    assert ups["a"].requests[0].json() == {
        "model": "up-a", "instructions": "be brief", "tools": [{"type": "x"}],
        "input": [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
        "stream": True,
    }  # fmt: skip
    await ws.close()


async def test_previous_response_id_chains_from_a_socket_turn_to_an_http_one(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    ups = await upstreams(make_upstream, "a", "b")
    ups["a"].script(answer("resp_from_a"))
    gw = await gateway(routes(urls(ups), strategy="round_robin"))
    ws = Client(gw)
    await ws.next()
    await ws.turn(model="m", input="hi")
    await ws.close()
    # Round robin would send this one to b: the id's creator, a, serves it.
    ups["a"].script(answer("resp_next"))
    r = await client.post(
        f"{gw.base_url}/responses",
        json={"model": "m", "input": "more", "previous_response_id": "resp_from_a"},
    )
    assert r.status_code == 200, r.text
    assert len(ups["a"].requests) == 2 and ups["b"].requests == []


@pytest.mark.parametrize(
    ("path", "keys", "token", "apis", "status"),
    [
        ("/v1/chat", None, None, "responses", 404),
        ("/v1/responses", "sk-good", "sk-bad", "responses", 401),
        ("/v1/responses", None, None, "chat", 426),
        ("/responses", None, None, "responses", 0),
        ("/openai/v1/responses", None, None, "responses", 0),
    ],
)
async def test_the_handshake(
    gateway: GatewayFactory, make_upstream: MakeUpstream,
    path: str, keys: str | None, token: str | None, apis: str, status: int,
) -> None:  # fmt: skip
    ups = await upstreams(make_upstream, "a")
    doc = None if keys is None else yaml.safe_dump({"keys": [{"name": "k", "key": keys}]})
    gw = await gateway(routes(urls(ups), apis=apis), doc)
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    ws = Client(gw, path, **headers)
    first = await ws.next()
    if status == 0:
        assert first["type"] == "websocket.accept"
        await ws.close()
        return
    assert first["type"] == "websocket.http.response.start", first
    assert first["status"] == status
    body = await ws.next()
    assert body["type"] == "websocket.http.response.body"
    assert "error" in json.loads(body["body"])
    await asyncio.wait_for(ws.task, 5)


async def test_a_store_false_chain_goes_upstream_whole(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    """Codex over WebSocket: store:false, then only new items with previous_response_id.
    No upstream holds that response: the socket sends the whole input instead."""
    ups = await upstreams(make_upstream, "a")
    call = {"type": "function_call", "call_id": "c1", "name": "shell", "arguments": "{}"}
    response = {"id": "resp_1", "object": "response", "model": "up-a", "output": [call]}
    ups["a"].script(
        Sse([event("response.created", response=response),
             event("response.completed", response={**response, "status": "completed"})]),
        answer("resp_2"), answer("resp_3"), answer("resp_4"),
    )  # fmt: skip
    gw = await gateway(routes(urls(ups)))
    ws = Client(gw)
    await ws.next()
    await ws.turn(model="m", input="run it", store=False)
    result = {"type": "function_call_output", "call_id": "c1", "output": "ran-42"}
    await ws.turn(model="m", input=[result], previous_response_id="resp_1", store=False)
    sent = ups["a"].requests[1].json()
    assert "previous_response_id" not in sent
    assert sent["input"] == [{"role": "user", "content": "run it"}, call, result]
    # The chain goes on from the whole input of the turn before.
    await ws.turn(model="m", input="next", previous_response_id="resp_2", store=False)
    third = ups["a"].requests[2].json()["input"]
    assert third[:3] == sent["input"] and third[-1] == {"role": "user", "content": "next"}
    # A response this socket does not hold is the upstream's to resolve: the id goes on.
    await ws.turn(model="m", input="x", previous_response_id="resp_elsewhere")
    assert ups["a"].requests[3].json()["previous_response_id"] == "resp_elsewhere"
    await ws.close()


async def test_426_counts_the_keys_allow_list(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    """The upgrade is refused at once when no slug this key may use serves responses,
    though other keys' slugs do."""
    up = await make_upstream()
    doc = {
        "providers": {"r": {"base_url": up.url, "apis": ["responses"]},
                      "c": {"base_url": up.url, "apis": ["chat"]}},
        "models": {"resp-m": {"providers": [{"provider": "r"}]},
                   "chat-m": {"providers": [{"provider": "c"}]},
                   "team/*": {"providers": [{"provider": "r"}]}},
    }  # fmt: skip
    keys = {"keys": [{"name": "chat", "key": "sk-chat", "models": ["chat-m"]},
                     {"name": "wild", "key": "sk-wild", "models": ["team/a*"]},
                     {"name": "all", "key": "sk-all"}]}  # fmt: skip
    gw = await gateway(yaml.safe_dump(doc), yaml.safe_dump(keys))
    for token, first in (("sk-chat", "websocket.http.response.start"),
                         ("sk-wild", "websocket.accept"), ("sk-all", "websocket.accept")):  # fmt: skip
        ws = Client(gw, authorization=f"Bearer {token}")
        message = await ws.next()
        assert message["type"] == first, token
        if first == "websocket.accept":
            await ws.close()
        else:
            assert message["status"] == 426
            body = json.loads((await ws.next())["body"])
            assert body["error"]["code"] == "upgrade_required"
            await asyncio.wait_for(ws.task, 5)


async def test_a_warm_up_is_refused_like_a_turn(
    gateway: GatewayFactory, make_upstream: MakeUpstream
) -> None:
    """Answered here, it still names a model the key may use and that serves responses."""
    ups = await upstreams(make_upstream, "a")
    doc = yaml.safe_load(routes(urls(ups)))
    doc["providers"]["c"] = {"base_url": ups["a"].url, "apis": ["chat"]}
    doc["models"]["chat-only"] = {"providers": [{"provider": "c"}]}
    keys = {"keys": [{"name": "k", "key": "sk-k", "models": ["m", "chat-only"]}]}
    gw = await gateway(yaml.safe_dump(doc), yaml.safe_dump(keys))
    ws = Client(gw, authorization="Bearer sk-k")
    await ws.next()
    for model, code in (("nope", "model_not_found"), ("chat-only", "api_not_supported")):
        [error] = await ws.turn(model=model, input="x", generate=False)
        assert error["type"] == "error" and error["error"]["code"] == code
    warm = await ws.turn(model="m", input="x", generate=False)
    assert warm[-1]["type"] == "response.completed"
    assert ups["a"].requests == []
    await ws.close()


async def test_turns_go_through_the_keys_limits_usage_log_and_affinity(
    gateway: GatewayFactory, make_upstream: MakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    """Same keys, limits, routing, affinity and usage as a POST: an rpm-1 key's second
    turn is a 429 error event on an open socket; the turns are logged with Codex's
    session id and pin the session to the entry that served it."""
    ups = await upstreams(make_upstream, "a", "b")
    for up in ups.values():
        up.script(*(answer() for _ in range(5)))
    keys = {"keys": [{"name": "k", "key": "sk-k", "rpm": 1}, {"name": "free", "key": "sk-f"}]}
    gw = await gateway(routes(urls(ups), strategy="round_robin"), yaml.safe_dump(keys))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        ws = Client(gw, authorization="Bearer sk-k", session_id="codex-thread-1")
        await ws.next()
        first = await ws.turn(model="m", input="one")
        assert first[-1]["type"] == "response.completed"
        [limited] = await ws.turn(model="m", input="two")
        assert limited["status"] == 429 and limited["error"]["code"] == "rate_limited"
        await ws.close()
        free = Client(gw, authorization="Bearer sk-f", session_id="codex-thread-2")
        await free.next()
        served = set()
        for _ in range(4):
            await free.turn(model="m", input="again")
            served = {n for n, up in ups.items() if up.requests}
        await free.close()
    # The free key's session stayed on one entry: with the rpm key's turn, two in all.
    assert sum(len(up.requests) for up in ups.values()) == 5
    assert len(served) <= 2
    pinned = {up: len(ups[up].requests) for up in ups}
    assert sorted(pinned.values()) in ([1, 4], [0, 5])
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    turns = [line for line in lines if line.get("path") == "/responses" and "slug" in line]
    assert len(turns) == 5
    assert {line["session_id"] for line in turns} == {"codex-thread-1", "codex-thread-2"}
    assert all(line["prompt_tokens"] == 10 for line in turns)
    refused = [line for line in lines if line.get("status") == 429]
    assert len(refused) == 1 and refused[0]["key"] == "k"
