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
This module reads requests off the connection; gateway/server/cycle.py answers each one.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections import deque
from typing import Any, cast

import httptools

from gateway.errors import BadRequest
from gateway.server.cycle import Cycle, Message, closing

HIGH_WATER = 64 * 1024  # buffered request body bytes at which reading pauses
_ASGI = {"version": "3.0", "spec_version": "2.3"}


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
        if cycle is None or cycle.nothing_sent:
            # None of an answer is out yet (a bad chunk in a body the app is reading, say):
            # the client gets the 400, and the app is told the client left.
            if cycle is not None:
                cycle.disconnected = True
                cycle.wake()
            self.transport.write(closing(b"400 Bad Request", BadRequest("malformed HTTP request")))
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
