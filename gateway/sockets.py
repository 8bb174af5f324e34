"""Codex's WebSocket mode (SPEC §14): `GET /v1/responses` upgraded to a WebSocket
(RFC 6455, spoken by server/websocket.py), each `response.create` frame served like a
`POST /v1/responses` with that body.

A frame goes through the very endpoint a POST does (ProxyEndpoint: the key's limits,
routing, affinity, usage, the ids map), over an in-memory ASGI exchange: its body is
the frame without `type`, with `stream: true`; the SSE events that come back are sent
as text frames, one event's data per frame; an error answer becomes an `error` event
and the socket stays open. The key is checked once, at the handshake.

A socket runs one response at a time (OpenAI's rule too): frames that arrive meanwhile
wait, bounded (MAX_WAITING), and reading stops while they do.

Over WebSocket a client continues a turn with only its new items and the previous
response's id, and with `store: false` (Codex) no upstream keeps that response: the
socket keeps the chain itself (Chains: the whole input and the output of its last
turns, bounded) and sends the whole input upstream in its place, as OpenAI's own
socket does from its connection-local cache. The same holds for a warm-up
(`generate: false`), which this gateway answers itself.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import time
from collections.abc import MutableMapping
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import orjson

from gateway.auth import authenticate
from gateway.config.keys import Key
from gateway.config.routes import Routes
from gateway.errors import GatewayError, NotFound, UpgradeRequired
from gateway.families import PREFIXES, RESPONSES
from gateway.families.socket_turns import Chains, FrameRelay, items
from gateway.incoming import Incoming
from gateway.respond import send_error, server_timing
from gateway.types import Message, Receive, Scope, Send

if TYPE_CHECKING:
    from gateway.endpoints import ProxyEndpoint
    from gateway.runtime import Runtime

# The paths the mode is served on: the responses path under every prefix.
PATHS = frozenset(prefix + "/responses" for prefix in PREFIXES)
# Frames queued behind the running response, then reading stops: with one, a socket
# holds at most two frames beside the running one (each up to --max-event-bytes).
MAX_WAITING = 1
# Headers of the handshake that are the socket's, not a turn's: never sent upstream.
_SOCKET_ONLY = frozenset({
    b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version",
    b"sec-websocket-extensions", b"sec-websocket-protocol", b"openai-beta",
    b"content-length", b"content-type", b"transfer-encoding", b"x-request-id",
})  # fmt: skip
_JSON = (b"content-type", b"application/json")
_ids = itertools.count()


class Turn(enum.Enum):
    """A socket's state: IDLE -> RUNNING (a frame is being answered) -> IDLE; either
    -> CLOSED when the client leaves (a running turn is then told its client left)."""

    IDLE = "idle"
    RUNNING = "running"
    CLOSED = "closed"


def serves_responses(routes: Routes, key: Key | None) -> bool:
    """Whether any slug this key may use has an entry serving the Responses API: if
    none does, the upgrade gets 426 at once (Codex falls back to HTTP after one try)."""
    for model in (*routes.models.values(), *routes.wildcards):
        if not any("responses" in t.provider.apis for t in model.targets):
            continue
        if key is None or key.models is None or key.allows(model.slug):
            return True
        if "*" in model.slug and any(fnmatchcase(g, model.slug) for g in key.models):
            return True  # a glob the wildcard's names can meet
    return False


def denial(send: Send) -> Send:
    """The handshake refused with an HTTP answer: the ASGI denial-response messages."""

    async def deny(message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if kind.startswith("http."):  # the rest (websocket.accept...) passes as it is
            message = {**message, "type": "websocket." + kind}
        await send(message)

    return deny


class ResponsesSocket:
    """The ASGI endpoint of every `websocket` scope (other paths: 404 at the handshake)."""

    def __init__(self, runtime: Runtime, endpoint: ProxyEndpoint) -> None:
        self.runtime = runtime
        self.endpoint = endpoint
        # serves_responses per allow-list, for one catalog snapshot: it walks every model
        # (100,000 of them is tens of ms), so once per snapshot and allow-list, not per
        # handshake.
        self._serving: tuple[Routes | None, dict[tuple[str, ...] | None, bool]] = (None, {})

    def serves(self, routes: Routes, key: Key | None) -> bool:
        known, answers = self._serving
        if known is not routes:
            answers = {}
            self._serving = (routes, answers)
        allowed = None if key is None else key.models
        answer = answers.get(allowed)
        if answer is None:
            if len(answers) >= 1024:
                answers.clear()
            answer = answers[allowed] = serves_responses(routes, key)
        return answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return  # gone before the handshake was answered
        t0 = time.perf_counter()
        runtime = self.runtime
        config = runtime.config
        rid = Incoming(scope["headers"]).request_id
        key: Key | None = None
        try:
            if scope["path"] not in PATHS:
                raise NotFound("WebSocket is served on /v1/responses only")
            key = authenticate(config.keys, Incoming(scope["headers"]).token())
            if not self.serves(config.routes, key):
                raise UpgradeRequired(
                    "no model this key may use serves the Responses API: use HTTP",
                    headers={"x-should-retry": "false"},
                )
        except GatewayError as exc:
            await send_error(denial(send), exc, rid, [server_timing(t0)], RESPONSES)
            runtime.refused(exc, key, rid, "GET " + scope["path"][:512], time.perf_counter() - t0)
            return
        await send({"type": "websocket.accept"})
        await Socket(self.endpoint, scope, receive, send).run()


class Socket:
    """One accepted socket: reads frames (a task of its own, so a running turn hears the
    client leave) and answers them in order."""

    def __init__(self, endpoint: ProxyEndpoint, scope: Scope, receive: Receive, send: Send) -> None:
        self.endpoint = endpoint
        self.receive = receive
        self.send = send
        self.headers_in = scope["headers"]  # the handshake's, as a turn's key is read
        self.headers = [(n, v) for n, v in scope["headers"] if n not in _SOCKET_ONLY]
        self.scope = {
            **{k: v for k, v in scope.items() if k not in ("subprotocols", "extensions")},
            "type": "http",
            "method": "POST",
            "scheme": "https" if scope.get("scheme") == "wss" else "http",
        }
        self.state = Turn.IDLE  # written by run() alone (through _move)
        # The server's word on this socket's idleness (server.websocket_cycle): a running
        # turn must not give way at the connection cap as an idle socket does.
        self.busy = scope.get("extensions", {}).get("gateway.busy")
        self.frames: asyncio.Queue[str | None] = asyncio.Queue(MAX_WAITING)
        self.closed = asyncio.Event()
        runtime = endpoint.runtime
        self.chains = Chains(runtime.settings.max_body_bytes)
        # Entries with `websocket: true` get the turns over links of this socket's own.
        # Imported with the first socket (see server.protocol's handshake import).
        from gateway.upstream.websocket import UpstreamSockets

        beta = [(n, v) for n, v in scope["headers"] if n == b"openai-beta"]
        self.links = UpstreamSockets(runtime.upstream, beta, runtime.settings.max_event_bytes)

    async def run(self) -> None:
        reader = asyncio.ensure_future(self._read())
        try:
            while True:
                frame = await self.frames.get()
                if frame is None:
                    return
                self._move(Turn.RUNNING)
                await self._turn(frame)
                if self.closed.is_set():
                    return
                self._move(Turn.IDLE)
        finally:
            self._move(Turn.CLOSED)
            reader.cancel()
            self.links.close()

    def _move(self, state: Turn) -> None:
        self.state = state
        if self.busy is not None:
            self.busy(state is Turn.RUNNING)

    async def _read(self) -> None:
        while True:
            message = await self.receive()
            kind = message["type"]
            if kind == "websocket.disconnect":
                self.closed.set()
                await self.frames.put(None)
                return
            if kind == "websocket.receive":
                text = message.get("text")
                if text is None:
                    raw = message.get("bytes") or b""
                    text = raw.decode("utf-8", "replace")
                await self.frames.put(text)  # waits (and so stops reading) when full

    async def _error(self, status: int, kind: str, code: str, text: str) -> None:
        error = {"type": kind, "code": code, "message": text, "param": None}
        await self._event({"type": "error", "status": status, "error": error})

    async def _event(self, event: dict[str, Any]) -> None:
        await self.send({"type": "websocket.send", "text": orjson.dumps(event).decode()})

    async def _turn(self, frame: str) -> None:
        try:
            data = orjson.loads(frame)
        except orjson.JSONDecodeError:
            await self._error(400, "invalid_request_error", "invalid_json", "the frame is not JSON")
            return
        if not isinstance(data, dict) or data.get("type") != "response.create":
            kind = data.get("type") if isinstance(data, dict) else None
            await self._error(400, "invalid_request_error", "unsupported_event",
                              f"unsupported event type {str(kind)[:64]!r}: send response.create")  # fmt: skip
            return
        del data["type"]
        if self._speaks_websocket(data.get("model")):
            # The upstream holds its own chains and warm-ups: the frame goes as sent.
            data["stream"] = True
            await self._serve(orjson.dumps(data), None)
            return
        data = self.chains.expand(data)
        if data.pop("generate", True) is False:
            refusal = self._refusal(data.get("model"))
            if refusal is not None:
                await self._error(*refusal)
                return
            await self._warm_up(data)
            return
        data["stream"] = True
        remember = data.get("store") is False
        await self._serve(orjson.dumps(data), data if remember else None)

    def _refusal(self, slug: Any) -> tuple[int, str, str, str] | None:
        """A warm-up's model checked as a turn's would be: known, allowed to the key,
        serving responses (it goes to no upstream, so admission never sees it)."""
        runtime = self.endpoint.runtime
        config = runtime.config
        model = config.routes.resolve(slug) if isinstance(slug, str) else None
        if model is None:
            return (
                400,
                "invalid_request_error",
                "model_not_found",
                "the model is not in the catalog",
            )
        try:  # the key as a turn would find it now (a reload may have changed it)
            key = authenticate(config.keys, Incoming(self.headers_in).token())
        except GatewayError as exc:
            return exc.status, exc.type, exc.code, exc.message
        if key is not None and not key.allows(slug):
            return 403, "permission_error", "model_not_allowed", "this key may not use the model"
        if not any("responses" in t.provider.apis for t in model.targets):
            return (
                400,
                "invalid_request_error",
                "api_not_supported",
                "the model does not serve responses",
            )
        return None

    def _speaks_websocket(self, slug: Any) -> bool:
        """Whether every entry of the frame's model has `websocket: true` (a frame goes
        as sent only where no failover can take it to an SSE entry)."""
        routes = self.endpoint.runtime.config.routes  # the snapshot the turn will read
        model = routes.resolve(slug) if isinstance(slug, str) else None
        return model is not None and all(t.websocket for t in model.targets)

    async def _warm_up(self, body: dict[str, Any]) -> None:
        """`generate: false` (Codex's warm-up) over SSE: answered here, nothing sent
        upstream; the turn that continues it gets its body (Chains.expand)."""
        rid = f"resp_gw{os.urandom(12).hex()}{next(_ids)}"
        fields = {k: v for k, v in body.items() if k != "input"}
        self.chains.keep(rid, fields, items(body.get("input")), 0)
        response: dict[str, Any] = {
            "id": rid,
            "object": "response",
            "created_at": int(time.time()),
            "status": "in_progress",
            "model": body.get("model"),
            "output": [],
            "usage": None,
        }
        await self._event({"type": "response.created", "sequence_number": 0,
                           "response": response})  # fmt: skip
        response = {**response, "status": "completed"}
        await self._event({"type": "response.completed", "sequence_number": 1,
                           "response": response})  # fmt: skip

    async def _serve(self, body: bytes, remember: dict[str, Any] | None) -> None:
        """One turn through the POST endpoint; `remember`: a store:false turn's body,
        whose whole input and output the socket keeps for the turn that continues it."""
        headers = [*self.headers, _JSON, (b"content-length", str(len(body)).encode())]
        scope = {**self.scope, "headers": headers}
        sent = False
        closed = self.closed

        async def receive() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await closed.wait()
            return {"type": "http.disconnect"}

        relay = FrameRelay(self._event, self.send, remember is not None)
        await self.endpoint(scope, receive, relay, socket=self.links)
        done = relay.completed
        if remember is not None and done is not None:
            rid, output = done.get("id"), done.get("output")
            if isinstance(rid, str) and isinstance(output, list):
                inputs = items(remember.get("input"))
                self.chains.keep(rid, {}, [*inputs, *output], len(body) + relay.size)
