"""A scriptable upstream: a real HTTP/1.1 server on 127.0.0.1, port 0, on asyncio streams.

Tests queue replies (JSON, paced SSE, error statuses, hangs, drops, raw bytes); the
server records every request it got and notices when the gateway closes a connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Recorded:
    method: str
    path: str  # without the query string
    query: str
    headers: list[tuple[str, str]]  # names lower-cased, in the order received
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Json:
    body: Any = None  # bytes are sent as they are; anything else is json.dumps'ed
    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    delay: float = 0.0  # before the status line
    # Held until the test sets it (bounded by the test's own wait), before the status
    # line: a reply that must still be pending while other requests are answered.
    gate: asyncio.Event | None = None

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        body = self.body if self.body is not None else chat_completion()
        return json.dumps(body).encode()


@dataclass
class Sse:
    events: Sequence[bytes | str]  # each written as one chunk, exactly as given
    delay: float = 0.0  # between events
    first_delay: float = 0.0  # before the first event (after the headers)
    status: int = 200
    headers: Sequence[tuple[str, str]] = ()
    drop_after: int | None = None  # close the socket after this many events
    hang_after: int | None = None  # stop sending (but keep the socket) after this many


@dataclass
class Hang:
    """Accept the request and never answer."""


@dataclass
class Drop:
    """Close the connection without sending a status line."""


@dataclass
class Raw:
    data: bytes


Reply = Json | Sse | Hang | Drop | Raw


def chat_completion(model: str = "upstream-model", content: str = "hi") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }


def chunk(content: str | None = None, model: str = "upstream-model", **extra: Any) -> bytes:
    """One `data:` event of a chat completion stream."""
    delta: dict[str, Any] = {} if content is None else {"content": content}
    obj: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    obj.update(extra)
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


@dataclass
class Upstream:
    replies: list[Reply] = field(default_factory=list)
    default: Reply = field(default_factory=Json)
    requests: list[Recorded] = field(default_factory=list)
    closed: list[float] = field(
        default_factory=list
    )  # monotonic times the peer went away mid-reply
    port: int = 0
    _server: asyncio.Server | None = None
    _closed_event: asyncio.Event = field(default_factory=asyncio.Event)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        """Replies for the next requests, in order; after them, `default`."""
        self.replies.extend(replies)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()

    async def wait_closed(self, timeout: float = 2.0) -> float:  # noqa: ASYNC109 (a bound, by design)
        """Wait (bounded) until the gateway closes a connection mid-reply; its time."""
        await asyncio.wait_for(self._closed_event.wait(), timeout)
        return self.closed[-1]

    async def _read_request(self, reader: asyncio.StreamReader) -> Recorded | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = []
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers.append((k.strip().lower(), v.strip()))
        hdrs = dict(headers)
        body = b""
        if "content-length" in hdrs:
            body = await reader.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            body = b"".join(parts)
        path, _, query = target.partition("?")
        return Recorded(method, path, query, headers, body)

    def _mark_closed(self) -> None:
        self.closed.append(time.monotonic())
        self._closed_event.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                req = await self._read_request(reader)
                if req is None:
                    return
                self.requests.append(req)
                reply = self.replies.pop(0) if self.replies else self.default
                if not await self._reply(reply, reader, writer):
                    return
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _peer_gone(self, reader: asyncio.StreamReader, seconds: float | None) -> bool:
        """Wait up to `seconds` (None: forever) for the peer to close; True if it did."""
        try:
            data = await asyncio.wait_for(reader.read(1), seconds)
        except TimeoutError:
            return False
        except ConnectionError:
            data = b""
        if not data:
            self._mark_closed()
            return True
        return False

    async def _reply(
        self, reply: Reply, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Send one reply; False when the connection must end."""
        if isinstance(reply, Hang):
            await self._peer_gone(reader, None)
            return False
        if isinstance(reply, Drop):
            return False
        if isinstance(reply, Raw):
            writer.write(reply.data)
            await writer.drain()
            return False
        if isinstance(reply, Json):
            if reply.gate is not None:
                await asyncio.wait_for(reply.gate.wait(), 30)
            if reply.delay and await self._peer_gone(reader, reply.delay):
                return False
            body = reply.payload()
            head = f"HTTP/1.1 {reply.status} X\r\ncontent-type: application/json\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in reply.headers)
            head += f"content-length: {len(body)}\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
            return True
        head = f"HTTP/1.1 {reply.status} X\r\ncontent-type: text/event-stream\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in reply.headers)
        head += "transfer-encoding: chunked\r\n\r\n"
        writer.write(head.encode())
        await writer.drain()
        if reply.first_delay and await self._peer_gone(reader, reply.first_delay):
            return False
        for i, event in enumerate(reply.events):
            if reply.drop_after is not None and i == reply.drop_after:
                writer.transport.abort()
                return False
            if reply.hang_after is not None and i == reply.hang_after:
                await self._peer_gone(reader, None)
                return False
            if i and reply.delay and await self._peer_gone(reader, reply.delay):
                return False
            data = event.encode() if isinstance(event, str) else event
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
        if reply.drop_after is not None and reply.drop_after >= len(reply.events):
            writer.transport.abort()
            return False
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True
