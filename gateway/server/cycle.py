"""One request and its response on a client connection: the ASGI `receive` and
`send` that ServerProtocol hands the app.

A cycle gets only what it needs from its connection, as uvicorn's does: the transport,
the connection's FlowControl, and a callback for when its response is complete. It
never reaches back into the protocol.

The response head is held until the first body message and written with it, so a whole
small answer is one write syscall (uvicorn's protocol makes two).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from gateway.errors import GatewayError
from gateway.types import Message

_BAD_NAME = re.compile(rb"[\x00-\x20\x7f()<>@,;:\[\]={}\\\"/?]")
_GOOD_NAMES: set[bytes] = set()  # header names already checked (a bounded handful)
_DISCONNECT: Message = {"type": "http.disconnect"}
_EMPTY_BODY: Message = {"type": "http.request", "body": b"", "more_body": False}


def closing(status: bytes, error: GatewayError, extra: bytes = b"") -> bytes:
    """A whole answer the protocol gives itself, ending the connection; the SPEC's
    envelope and a fresh request id, as on every other response. `extra`: more header
    lines, each ending in CRLF."""
    body = error.body()
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"x-request-id: %s\r\n%sconnection: close\r\n\r\n%s"
        % (status, len(body), os.urandom(12).hex().encode(), extra, body)
    )


_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
logger = logging.getLogger("gateway.server")


def _status_line(status: int) -> bytes:
    from http import HTTPStatus

    try:
        phrase = HTTPStatus(status).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (status, phrase)


STATUS_LINE = {status: _status_line(status) for status in range(100, 600)}


class FlowControl:
    """A connection's read and write flow, shared by its protocol and its cycles.

    Writing: the protocol's pause/resume_writing set and clear `drain`, which a cycle
    awaits before writing. Reading: a cycle that has taken the buffered body asks for
    more with resume_reading, which does nothing while `hold` (pipelined requests
    queued, or a refusal pending) keeps the protocol from reading further."""

    __slots__ = ("drain", "hold", "loop", "reading_paused", "transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.drain: asyncio.Future[None] | None = None  # set while writing is paused
        self.reading_paused = False
        self.hold = False

    def pause_writing(self) -> None:
        if self.drain is None:
            self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self.drain = self.drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.hold:
            self.reading_paused = False
            self.transport.resume_reading()


def _check_name(name: bytes) -> None:
    if not name or _BAD_NAME.search(name):
        raise RuntimeError(f"invalid response header name {name!r}")
    if len(_GOOD_NAMES) < 1024:
        _GOOD_NAMES.add(name)


class Cycle:
    """One request and its response on a connection."""

    __slots__ = (
        "buffered",
        "chunked",
        "chunks",
        "complete",
        "continue_due",
        "delivered",
        "disconnected",
        "flow",
        "head",
        "head_only",
        "keep_alive",
        "left",
        "more_body",
        "on_complete",
        "scope",
        "started",
        "transport",
        "waiter",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        flow: FlowControl,
        on_complete: Callable[[Cycle], None],
        scope: Message,
        keep_alive: bool,
        expect: bool,
    ) -> None:
        self.transport = transport
        self.flow = flow
        self.on_complete = on_complete
        self.scope = scope
        self.keep_alive = keep_alive
        self.continue_due = expect
        self.chunks: list[bytes] = []
        self.buffered = 0  # bytes in `chunks`
        self.more_body = True  # the request body has more to arrive
        self.delivered = False  # the request's last body message was handed to the app
        self.disconnected = False
        self.started = False
        self.complete = False
        self.head: bytes | None = None  # written with the first body message
        self.head_only = scope["method"] == "HEAD"
        self.chunked = False
        self.left = 0  # content-length bytes still to send
        self.waiter: asyncio.Future[None] | None = None

    def write_now(self, body: bytes) -> None:
        """More of a chunked body, from outside the app's task (the relay, from an
        upstream's data_received), where a `send` would wake the task first; only when
        ServerProtocol.writable says so."""
        if body:
            self.transport.write(b"%x\r\n%s\r\n" % (len(body), body))

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException:
            logger.exception("exception in the ASGI application")
            self.fail()
        else:
            if not self.complete and not self.disconnected:
                logger.error("the ASGI application returned without completing its response")
                self.fail()

    @property
    def nothing_sent(self) -> bool:
        """No byte of the answer is on the wire yet: the head waits for the first body
        bytes, so a started response whose head is still here has sent nothing."""
        return not self.started or self.head is not None

    def fail(self) -> None:
        """The app broke off: a 500 if none of its answer is out yet, else the connection
        ends and the client sees the response cut short."""
        # Closing silently before any byte would read as a dead keep-alive connection,
        # which clients may take as a reason to send the request again.
        if not self.disconnected and self.nothing_sent:
            self.started = self.complete = True
            self.head = None
            self.transport.write(
                closing(b"500 Internal Server Error", GatewayError("internal error"))
            )
        self.transport.close()

    async def receive(self) -> Message:
        flow = self.flow
        if self.continue_due:
            self.continue_due = False
            if not self.transport.is_closing():
                self.transport.write(_CONTINUE)
        while not (self.disconnected or self.complete):
            if not self.delivered:
                chunks = self.chunks
                if not self.more_body:
                    self.delivered = True
                    if not chunks:
                        return _EMPTY_BODY
                    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    chunks.clear()
                    self.buffered = 0
                    return {"type": "http.request", "body": body, "more_body": False}
                if chunks:
                    body = b"".join(chunks)
                    chunks.clear()
                    self.buffered = 0
                    flow.resume_reading()
                    return {"type": "http.request", "body": body, "more_body": True}
            flow.resume_reading()
            # After the whole body, this waits for the client to leave or the response
            # to end: how an app watches for a disconnect.
            self.waiter = flow.loop.create_future()  # (get_running_loop: a getpid on 3.11)
            try:
                await self.waiter
            finally:
                self.waiter = None
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        drain = self.flow.drain
        if drain is not None and not self.disconnected:
            await drain
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {kind}")
            self._start(message["status"], message.get("headers", ()))
            return
        if kind != "http.response.body":
            raise RuntimeError(f"expected http.response.body, got {kind}")
        if self.complete:
            raise RuntimeError("response already complete")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.head_only:
            out = b""
        elif self.chunked:
            out = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            if not more:
                out += b"0\r\n\r\n"
        else:
            if len(body) > self.left:
                raise RuntimeError("response content longer than content-length")
            self.left -= len(body)
            out = body
        head = self.head
        if head is not None:
            self.head = None
            out = head + out
        if out:
            self.transport.write(out)
        if not more:
            if self.left and not self.head_only:
                raise RuntimeError("response content shorter than content-length")
            self.complete = True
            self.wake()
            self.on_complete(self)

    def _start(self, status: int, headers: Any) -> None:
        parts = [STATUS_LINE.get(status) or _status_line(status)]
        length: int | None = None
        chunked = close_sent = False
        for name, value in headers:
            if name not in _GOOD_NAMES:
                _check_name(name)
            lower = name.lower()
            if lower == b"content-length" and length is None and not chunked:
                length = int(value)
            elif lower == b"transfer-encoding" and value.lower() == b"chunked":
                chunked, length = True, None
            elif lower == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                close_sent = True
            parts += (name, b": ", value, b"\r\n")
        lines = 1 + (len(parts) - 1) // 4  # the status line and one per header
        if not self.keep_alive and not close_sent:
            parts.append(b"connection: close\r\n")
            lines += 1
        if length is None and not chunked and not self.head_only and status not in (204, 304):
            chunked = True
            parts.append(b"transfer-encoding: chunked\r\n")
            lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        # A header value carrying CR or LF would split the response, so the head must
        # break exactly where its lines do. Two C scans; a regex per value cost more
        # than building the head.
        if head.count(b"\n") != lines + 1 or head.count(b"\r") != lines + 1:
            raise RuntimeError("invalid response header value")
        self.started = True
        self.continue_due = False
        self.head = head
        self.chunked = chunked
        self.left = length or 0
