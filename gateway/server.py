"""The client-facing HTTP/1.1 side: one asyncio protocol per connection, parsed by
httptools, running the ASGI app once per request.

uvicorn still runs the process (sockets, lifespan, signals, drain, workers); this
replaces only its httptools protocol, handed over as `uvicorn.Config(http=...)`. The
differences are what a proxy's hot path pays for on every request:
- a response head goes out together with the first body bytes, so a whole small
  answer is one write syscall where uvicorn makes two;
- one keep-alive timer per connection, re-armed only when it fires early, instead of a
  timer created and cancelled per request;
- the head is checked for stray control characters in one scan, not two regexes per
  header;
- no access logging, WebSocket upgrade or concurrency-limit branches (the gateway has
  its own access log and uses none of the others).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import urllib.parse
from collections import deque
from typing import Any, cast

import httptools

from gateway.errors import BadRequest, GatewayError

Message = dict[str, Any]

HIGH_WATER = 64 * 1024  # buffered request body bytes at which reading pauses
_BAD_NAME = re.compile(rb"[\x00-\x20\x7f()<>@,;:\[\]={}\\\"/?]")
_GOOD_NAMES: set[bytes] = set()  # header names already checked (a bounded handful)
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_DISCONNECT: Message = {"type": "http.disconnect"}
_EMPTY_BODY: Message = {"type": "http.request", "body": b"", "more_body": False}


def _closing(status: bytes, error: GatewayError) -> bytes:
    """A whole answer the protocol gives itself, ending the connection; the SPEC's
    envelope and a fresh request id, as on every other response."""
    body = error.body()
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"x-request-id: %s\r\nconnection: close\r\n\r\n%s"
        % (status, len(body), os.urandom(12).hex().encode(), body)
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
        "conn",
        "continue_due",
        "delivered",
        "disconnected",
        "head",
        "head_only",
        "keep_alive",
        "left",
        "more_body",
        "scope",
        "started",
        "waiter",
    )

    def __init__(
        self, conn: ServerProtocol, scope: Message, keep_alive: bool, expect: bool
    ) -> None:
        self.conn = conn
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

    def fail(self) -> None:
        """The app broke off: a 500 if none of its answer is out yet, else the connection
        ends and the client sees the response cut short."""
        conn = self.conn
        # The head waits for the first body bytes, so a started response whose head is
        # still here has sent nothing: closing silently would read as a dead keep-alive
        # connection, which clients may take as a reason to send the request again.
        if not self.disconnected and (not self.started or self.head is not None):
            self.started = self.complete = True
            self.head = None
            conn.transport.write(
                _closing(b"500 Internal Server Error", GatewayError("internal error"))
            )
        conn.transport.close()

    async def receive(self) -> Message:
        conn = self.conn
        if self.continue_due:
            self.continue_due = False
            if not conn.transport.is_closing():
                conn.transport.write(_CONTINUE)
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
                    conn.resume_reading()
                    return {"type": "http.request", "body": body, "more_body": True}
            conn.resume_reading()
            # After the whole body, this waits for the client to leave or the response
            # to end: how an app watches for a disconnect.
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return _DISCONNECT

    async def send(self, message: Message) -> None:
        conn = self.conn
        if conn.drain is not None and not self.disconnected:
            await conn.drain
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
            conn.transport.write(out)
        if not more:
            if self.left and not self.head_only:
                raise RuntimeError("response content shorter than content-length")
            self.complete = True
            self.wake()
            conn.finished(self)

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


class ServerProtocol(asyncio.Protocol):
    """Constructed by uvicorn's server for each accepted connection."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.state = server_state
        self.app_state = app_state
        self.root_path: str = config.root_path
        self.keep_alive_for: float = config.timeout_keep_alive
        self.parser = httptools.HttpRequestParser(self)
        # Answer the first of pipelined requests sent after a `connection: close` one.
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.cycle: Cycle | None = None  # the request being answered
        self.queued: deque[Cycle] = deque()  # pipelined requests waiting their turn
        self.reading_paused = False
        self.drain: asyncio.Future[None] | None = None  # set while writing is paused
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        # The request being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.expect = False
        self.parsing: Cycle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.state.connections.add(self)
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self._idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for cycle in (self.cycle, *self.queued):
            if cycle is not None and not cycle.complete:
                cycle.disconnected = True
                cycle.wake()
        self.queued.clear()
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)
        self.drain = None

    def data_received(self, data: bytes) -> None:
        self.idle_since = 0.0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # No upgrades here: the request is answered as plain HTTP, and the bytes
            # after its head are not HTTP, so the connection ends with the answer. The
            # parser stops after the request's end, so it is the last one begun.
            cycle = self.parsing or (self.queued[-1] if self.queued else self.cycle)
            if cycle is not None:
                cycle.keep_alive = False
        except (httptools.HttpParserError, UnicodeDecodeError):
            self._reject()

    def eof_received(self) -> None:
        pass

    def pause_writing(self) -> None:
        if self.drain is None:
            self.drain = self.loop.create_future()

    def resume_writing(self) -> None:
        drain, self.drain = self.drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.expect = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        url = self.url
        if url[:1] == b"/":
            # A fragment (which clients should not send) belongs to neither part.
            raw_path, _, query = url.partition(b"#")[0].partition(b"?")
        else:  # absolute form (a client talking to a proxy) or `*`
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        version = parser.get_http_version()
        scope: Message = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "method": parser.get_method().decode("ascii"),
            "root_path": self.root_path,
            "path": self.root_path + path if self.root_path else path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "state": self.app_state.copy(),
        }
        keep_alive = version != "1.0" and parser.should_keep_alive()
        cycle = self.parsing = Cycle(self, scope, keep_alive, self.expect)
        if self.cycle is None:
            self._begin(cycle)
        else:
            # Pipelined: answered in order, one at a time; read no further meanwhile.
            self.queued.append(cycle)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is None or cycle.complete:
            return
        cycle.chunks.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > HIGH_WATER:
            self.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        cycle = self.parsing
        self.parsing = None
        if cycle is None or cycle.complete:
            return
        cycle.more_body = False
        cycle.wake()

    # flow and lifecycle

    def pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.queued:
            self.reading_paused = False
            self.transport.resume_reading()

    def _begin(self, cycle: Cycle) -> None:
        self.cycle = cycle
        task = self.loop.create_task(cycle.run(self.app))
        tasks = self.state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def finished(self, cycle: Cycle) -> None:
        """The response to `cycle` is complete: close, or serve what is queued, or idle."""
        self.state.total_requests += 1
        if cycle is not self.cycle:
            return
        self.cycle = None
        if not cycle.keep_alive:
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        if self.queued:
            self._begin(self.queued.popleft())
            if not self.queued:
                self.resume_reading()
            return
        self.resume_reading()
        self._idle()

    def _idle(self) -> None:
        self.idle_since = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_at(self.idle_since + self.keep_alive_for, self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.cycle is not None or self.idle_since == 0.0:
            return  # busy: the next idle spell arms it again
        due = self.idle_since + self.keep_alive_for
        if self.loop.time() >= due:
            self.transport.close()
        else:
            self.timer = self.loop.call_at(due, self._expire)

    def _reject(self) -> None:
        cycle = self.cycle
        if cycle is None or not cycle.started or cycle.head is not None:
            # None of an answer is out yet (a bad chunk in a body the app is reading, say):
            # the client gets the 400, and the app is told the client left.
            if cycle is not None:
                cycle.disconnected = True
                cycle.wake()
            self.transport.write(_closing(b"400 Bad Request", BadRequest("malformed HTTP request")))
        self.transport.close()

    def shutdown(self) -> None:
        """uvicorn's drain: close when idle, else once the current response ends."""
        if self.cycle is None:
            self.transport.close()
        else:
            self.cycle.keep_alive = False


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple | list) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None
