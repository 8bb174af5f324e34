"""The Responses API's WebSocket mode as bytes and turns (SPEC §14), apart from any socket:
how one turn's answer becomes frames (FrameRelay: an SSE answer's events, each event's
data as one text frame; any other answer as one `error` event), and what a socket keeps
for an SSE upstream that cannot hold it (Chains: a `store: false` turn's whole input and
output, or a warm-up, for the turn that continues it). gateway/sockets.py runs them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from gateway.types import Send
from gateway.wire.sse import EventSplitter, event_spans, payload_of

MAX_CHAINS = 4  # turns a socket remembers for the next to continue (Codex: the last)


class Chains:
    """The turns a socket may be asked to continue: id -> (fields a warm-up set, the
    whole input and output so far). Bounded in turns and in bytes (a chain over the
    request body limit is dropped: its next turn goes upstream as the client sent it)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held: OrderedDict[str, tuple[dict[str, Any], list[Any]]] = OrderedDict()

    def keep(self, rid: str, fields: dict[str, Any], chain: list[Any], size: int) -> None:
        if size > self.max_bytes:
            return
        self.held[rid] = (fields, chain)
        while len(self.held) > MAX_CHAINS:
            self.held.popitem(last=False)

    def expand(self, turn: dict[str, Any]) -> dict[str, Any]:
        """A turn continuing one this socket holds: the held fields the turn does not
        set, the whole chain before its input, and no previous_response_id (no upstream
        holds that response)."""
        previous = turn.get("previous_response_id")
        held = self.held.get(previous) if isinstance(previous, str) else None
        if held is None:
            return turn
        fields, chain = held
        merged = {**fields, **turn}
        del merged["previous_response_id"]
        merged["input"] = [*chain, *items(turn.get("input"))]
        return merged


def items(value: Any) -> list[Any]:
    """A Responses `input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return list(value) if isinstance(value, list) else []


class FrameRelay:
    """The ASGI send of one turn: an SSE answer's events out as text frames (each
    event's data, unchanged), any other answer as one `error` event."""

    def __init__(
        self,
        event: Callable[[dict[str, Any]], Awaitable[None]],
        send: Send,
        keep: bool = False,
        limit: int = 1 << 20,
    ) -> None:
        self.keep = keep  # read the completed response (a chain the socket keeps)
        self.completed: dict[str, Any] | None = None
        self.size = 0  # bytes relayed, when kept
        self.event = event
        self.send = send
        self.status = 0
        self.stream = False
        self.splitter = EventSplitter(1 << 62)  # the relay bounded each event already
        self.body = bytearray()
        self.limit = limit  # an error answer's bytes kept (the gateway's own are small)

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message["status"]
            content = next((v for n, v in message.get("headers", ()) if n == b"content-type"), b"")
            self.stream = self.status == 200 and content.startswith(b"text/event-stream")
            return
        if kind != "http.response.body":
            return
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if self.stream:
            block = self.splitter.feed_block(chunk) if chunk else b""
            if not more:
                block += self.splitter.rest()
            for start, end in event_spans(block):
                payload = payload_of(block[start:end])
                if payload and payload != b"[DONE]":
                    if self.keep:
                        self._read(payload)
                    text = payload.decode("utf-8", "replace")
                    await self.send({"type": "websocket.send", "text": text})
            return
        if len(self.body) < self.limit:
            self.body += chunk[: self.limit - len(self.body)]
        if not more:
            await self.event(_answer_event(self.status, bytes(self.body)))

    def _read(self, payload: bytes) -> None:
        self.size += len(payload)
        completed = _completed(payload)
        if completed is not None:
            self.completed = completed


def _completed(payload: bytes) -> dict[str, Any] | None:
    """The response of a `response.completed` event; None for any other event."""
    if b'"response.completed"' not in payload[:80]:
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    response = data.get("response") if isinstance(data, dict) else None
    return response if isinstance(response, dict) else None


def _answer_event(status: int, body: bytes) -> dict[str, Any]:
    """A whole answer as an event: 200 JSON as response.completed, else `error`."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if status == 200 and isinstance(data, dict):
        return {"type": "response.completed", "response": data}
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        error = {"type": "api_error", "code": None, "param": None,
                 "message": f"the upstream answered {status}"}  # fmt: skip
    return {"type": "error", "status": status, "error": error}
