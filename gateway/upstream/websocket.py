"""The client end of the Responses API's WebSocket mode, for entries with
`websocket: true` (SPEC §14): a client socket's turns go over one upstream WebSocket
per entry, opened at its first turn and kept for the next (the upstream's
connection-local state, a warm-up's or a store:false chain's, lives on it), closed with
the client's socket.

A turn is presented to the attempt as an SSE answer (TurnResponse): each text message
becomes one `data:` event, so the relay's model rewrite, usage reading, ids and limits
run unchanged; after a terminal event (completed, failed, incomplete, error) the body
ends and the link is free for the next turn. Frames: server/websocket.py's codec on
its client end (masked out, unmasked in).
"""

from __future__ import annotations

import asyncio
import base64
import enum
import math
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from gateway.errors import GatewayError, UpstreamResponseTooLarge, UpstreamUnavailable
from gateway.types import Headers
from gateway.upstream.client import TRANSPORT_ERRORS, translate
from gateway.upstream.connection import ConnectionLost
from gateway.upstream.head import request_head
from gateway.wire.websocket import (
    CloseReceived,
    FrameParser,
    Opcode,
    Ping,
    Received,
    Violation,
    accept_key,
    encode_close,
    encode_frame,
)

if TYPE_CHECKING:
    from gateway.config.providers import Provider
    from gateway.upstream.client import Upstream

MAX_HEAD = 16 * 1024  # the upgrade answer's head
MAX_REFUSAL = 64 * 1024  # a refused upgrade's body, kept for the client
READ_SIZE = 64 * 1024
SSE = [(b"content-type", b"text/event-stream")]
# A turn's last event types: after one the link carries the next turn.
TERMINAL = frozenset({"response.completed", "response.failed", "response.incomplete", "error"})
_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([^"\\]*)"')


def event_type(message: bytes) -> str | None:
    """A message's `type`: read from its start where it leads (as OpenAI's do), else
    parsed; None for a message that is no JSON object."""
    match = _TYPE.match(message)
    if match is not None:
        return match.group(1).decode("utf-8", "replace")
    try:
        data = orjson.loads(message)
    except orjson.JSONDecodeError:
        return None
    kind = data.get("type") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


class LinkState(enum.Enum):
    """OPEN -> BUSY (a turn's events are being read) -> OPEN after its terminal event;
    any -> CLOSED (the upstream closed, broke the protocol, or a turn was cut short:
    its next event could belong to no one)."""

    OPEN = "open"
    BUSY = "busy"
    CLOSED = "closed"


class Refused:
    """The upstream answered the upgrade with something other than 101: relayed (or
    failed over) like any HTTP answer of that status."""

    is_sse = False

    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    async def read(self) -> bytes:
        return self.body

    async def next_chunk(self) -> bytes:
        body, self.body = self.body, b""
        return body

    def ready(self) -> bool:
        return True

    def relax(self) -> None:
        pass

    def relay_inline(self, sink: Callable[[bytes], bool] | None) -> None:
        pass  # a whole answer, already here

    def close(self) -> None:
        pass


class Link:
    """One upstream WebSocket."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        max_message: int,
        read_timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = FrameParser(max_message, client=True)
        self.read_timeout = read_timeout
        # Written by UpstreamSockets.send (BUSY), TurnResponse (OPEN after a turn's end)
        # and close() (CLOSED): the turn that holds the link is the one writer at a time.
        self.state = LinkState.OPEN
        self.messages: list[bytes] = []  # parsed, not yet handed to the turn
        self.gone = False  # the upstream's close frame came: nothing more will
        # Gives back the provider's connection slot (max_connections) the link holds
        # while open; called once, by close().
        self.release: Callable[[], None] | None = None

    def send(self, payload: bytes) -> None:
        self.writer.write(encode_frame(Opcode.TEXT, payload, mask=os.urandom(4)))

    def idle_and_alive(self) -> bool:
        """Nothing arrived for no turn: not the end of the stream, no stray message."""
        return not (self.gone or self.messages or self.reader.at_eof() or self.writer.is_closing())

    async def next_message(self, deadline: float) -> bytes:
        """The next text (or binary) message; pings answered on the way."""
        loop = asyncio.get_running_loop()
        while not self.messages:
            if self.gone:
                raise ConnectionLost("the upstream closed its WebSocket", before_response=False)
            wait = min(self.read_timeout, deadline - loop.time())
            async with asyncio.timeout(max(0.0, wait)):
                data = await self.reader.read(READ_SIZE)
            if not data:
                raise ConnectionLost("the upstream closed its WebSocket", before_response=False)
            for event in self.parser.feed(data):
                if isinstance(event, Received):
                    raw = event.data
                    self.messages.append(raw.encode() if isinstance(raw, str) else raw)
                elif isinstance(event, Ping):
                    self.writer.write(encode_frame(Opcode.PONG, event.payload, mask=os.urandom(4)))
                elif isinstance(event, CloseReceived):
                    # The messages before it are still the turn's; the link ends after them.
                    self.writer.write(encode_close(event.code, mask=os.urandom(4)))
                    self.gone = True
                    break
                elif isinstance(event, Violation):
                    if event.code == 1009:
                        raise UpstreamResponseTooLarge(
                            "an upstream WebSocket message is over the limit",
                            {"cause": "event_too_large"},
                        )
                    raise ConnectionLost(f"the upstream broke WebSocket: {event.reason}", False)
        return self.messages.pop(0)

    def close(self) -> None:
        if self.state is not LinkState.CLOSED:
            self.state = LinkState.CLOSED
            if not self.writer.is_closing():
                self.writer.write(encode_close(1000, mask=os.urandom(4)))
            self.writer.close()
            release, self.release = self.release, None
            if release is not None:
                release()


class TurnResponse:
    """One turn's events as an SSE body (see the module's note)."""

    is_sse = True
    status = 200

    def __init__(self, link: Link, deadline: float) -> None:
        self.link = link
        self.headers: Headers = list(SSE)
        self.deadline = deadline  # the attempts' deadline, until the answer starts
        self.done = False

    async def next_chunk(self) -> bytes:
        if self.done:
            return b""
        try:
            message = await self.link.next_message(self.deadline)
        except GatewayError:
            self.link.close()
            raise
        except TRANSPORT_ERRORS as exc:
            self.link.close()
            raise translate(exc, started=True) from None
        if event_type(message) in TERMINAL:
            self.done = True
            if self.link.messages or self.link.gone:
                self.link.close()  # bytes past a turn's end, or closed: no one's now
            else:
                self.link.state = LinkState.OPEN
        if b"\n" in message or b"\r" in message:  # one data line each: SSE's own framing
            return b"".join(b"data: " + line + b"\n" for line in message.splitlines()) + b"\n"
        return b"data: " + message + b"\n\n"

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def ready(self) -> bool:
        return self.done or bool(self.link.messages)

    def relax(self) -> None:
        self.deadline = math.inf  # from here the read timeout alone bounds each message

    def relay_inline(self, sink: Callable[[bytes], bool] | None) -> None:
        pass  # messages come through the link's reader task; next_chunk takes them

    def close(self) -> None:
        if not self.done:
            self.link.close()  # cut short: what the upstream sends next is no one's


class UpstreamSockets:
    """A client socket's upstream WebSockets, one per provider entry."""

    def __init__(self, upstream: Upstream, handshake: Headers, max_message: int) -> None:
        self.upstream = upstream
        self.handshake = handshake  # the client's own handshake headers (OpenAI-Beta)
        self.max_message = max_message
        self.links: dict[str, Link] = {}
        self.spare: list[Link] = []  # a second link to an entry whose own is busy (hedging)

    async def send(
        self, provider: Provider, body: bytes, headers: Headers, deadline: float
    ) -> TurnResponse | Refused:
        """The turn whose POST body is `body`, sent as a `response.create` frame; returns
        once the link is open (and, on a link kept from an earlier turn, once its first
        message is in: an upstream may have closed it while it was idle)."""
        fields = orjson.loads(body)
        fields.pop("stream", None)
        frame = orjson.dumps({"type": "response.create", **fields})
        name = provider.name + "\n" + provider.base_url
        link = self.links.get(name)
        if link is not None and link.state is LinkState.BUSY:
            # Another attempt of this turn (a hedge) reads it: this one gets its own.
            opened = await self._open(provider, headers, deadline)
            if isinstance(opened, Refused):
                return opened
            self.spare = [spare for spare in self.spare if spare.state is not LinkState.CLOSED]
            self.spare.append(opened)
            opened.state = LinkState.BUSY
            opened.send(frame)
            return TurnResponse(opened, deadline)
        if link is not None and link.state is LinkState.OPEN and not link.idle_and_alive():
            link.close()
        if link is not None and link.state is LinkState.OPEN:
            link.state = LinkState.BUSY
            link.send(frame)
            try:
                first = await link.next_message(deadline)
            except TimeoutError:
                link.close()  # slow, not gone: the frame may be at work, never sent twice
                raise translate(TimeoutError(), started=False) from None
            except GatewayError:
                link.close()
                raise
            except (ConnectionLost, OSError):
                link.close()  # closed while idle: the frame reached no turn; a new link
            else:
                link.messages.insert(0, first)
                return TurnResponse(link, deadline)
        opened = await self._open(provider, headers, deadline)
        if isinstance(opened, Refused):
            return opened
        link = self.links[name] = opened
        link.state = LinkState.BUSY
        link.send(frame)
        return TurnResponse(link, deadline)

    async def _open(self, provider: Provider, headers: Headers, deadline: float) -> Link | Refused:
        """A new link, holding one of the provider's connection slots (max_connections)
        while it is open, as a pooled HTTP connection does while in use: a slot that does
        not free up within the connect timeout fails the attempt like a connect timeout."""
        pool, origin = self.upstream.pool, self.upstream.target(provider).origin
        loop = asyncio.get_running_loop()
        wait = max(0.0, min(provider.timeout.connect, deadline - loop.time()))
        try:
            await pool.take_slot(origin, wait)
        except TimeoutError as exc:
            raise translate(exc, started=False) from None
        try:
            opened = await self._connect(provider, headers, deadline)
        except BaseException:
            pool.drop(origin)
            raise
        if isinstance(opened, Refused):
            pool.drop(origin)
        else:
            opened.release = lambda: pool.drop(origin)
        return opened

    async def _connect(
        self, provider: Provider, headers: Headers, deadline: float
    ) -> Link | Refused:
        upstream = self.upstream
        target = upstream.target(provider)
        auth = provider.auth
        creds = b""
        if auth is not None and auth.per_request:
            if auth.aws is not None:
                raise UpstreamUnavailable(
                    "a WebSocket upstream cannot be signed with AWS credentials",
                    {"cause": "websocket_with_aws"},
                )
            creds = await upstream.credentials.header(provider)
        key = base64.b64encode(os.urandom(16))
        own = [(n, v) for n, v in headers if n != b"content-type"]  # a GET has no body
        head = request_head(target, "/responses", [*own, *self.handshake], 0, b"GET", creds)
        head = head[: -len(b"content-length: 0\r\n\r\n")] + (
            b"upgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\n"
            b"sec-websocket-key: " + key + b"\r\n\r\n"
        )
        origin = target.origin
        loop = asyncio.get_running_loop()
        t = provider.timeout
        first = t.first_byte if t.first_byte is not None else t.read
        try:
            async with asyncio.timeout(max(0.0, min(t.connect, deadline - loop.time()))):
                reader, writer = await asyncio.open_connection(
                    origin.host,
                    origin.port,
                    ssl=upstream.pool.tls_context() if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                    limit=MAX_HEAD,
                )
        except TRANSPORT_ERRORS as exc:
            raise translate(exc, started=False) from None
        try:
            writer.write(head)
            async with asyncio.timeout(max(0.0, min(first, deadline - loop.time()))):
                raw = await reader.readuntil(b"\r\n\r\n")
                status, answer = _head(raw)
                if status != 101:
                    body = await _refusal_body(reader, dict(answer))
                    writer.close()
                    if status < 300:
                        raise UpstreamUnavailable(
                            "the upstream answered the WebSocket upgrade without upgrading",
                            {"cause": "not_upgraded"},
                        )
                    kept = [(n, v) for n, v in answer if n in (b"content-type", b"retry-after")]
                    return Refused(status, kept, body)
        except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError):
            writer.close()
            raise UpstreamUnavailable(
                "the upstream's WebSocket upgrade answer is malformed", {"cause": "bad_upgrade"}
            ) from None
        except TRANSPORT_ERRORS as exc:
            writer.close()
            raise translate(exc, started=False) from None
        fields = dict(answer)
        if (
            fields.get(b"sec-websocket-accept") != accept_key(key)
            or fields.get(b"upgrade", b"").lower() != b"websocket"
            or b"upgrade" not in fields.get(b"connection", b"").lower()
        ):
            writer.close()
            raise UpstreamUnavailable(
                "the upstream's WebSocket upgrade is not RFC 6455's (accept key, headers)",
                {"cause": "bad_accept"},
            )
        return Link(reader, writer, self.max_message, t.read)

    def close(self) -> None:
        for link in (*self.links.values(), *self.spare):
            link.close()
        self.links.clear()
        self.spare.clear()


async def _refusal_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
    """A refused upgrade's body, up to MAX_REFUSAL: its Content-Length, else to the end."""
    length = headers.get(b"content-length")
    if length is not None:
        return await reader.readexactly(min(int(length), MAX_REFUSAL))
    body = b""
    while len(body) < MAX_REFUSAL and (data := await reader.read(MAX_REFUSAL - len(body))):
        body += data
    return body


def _head(raw: bytes) -> tuple[int, Headers]:
    """Status and lower-cased headers of an HTTP/1.1 answer head; ValueError if bad."""
    lines = raw.split(b"\r\n")
    version, status, _ = (lines[0] + b" ").split(b" ", 2)
    if not version.startswith(b"HTTP/1."):
        raise ValueError("not an HTTP/1.x answer")
    headers: Headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
    return int(status), headers
