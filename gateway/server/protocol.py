"""The client-facing HTTP/1.1 side: one asyncio protocol per connection, parsed by
httptools, running the ASGI app once per request (a Cycle).

uvicorn still runs the process (sockets, lifespan, signals, drain, workers); this
replaces only its httptools protocol, handed over as `uvicorn.Config(http=...)`. The
differences are what a proxy's hot path pays for on every request:
- a response head goes out together with the first body bytes, so a whole small
  answer is one write syscall where uvicorn makes two;
- one timer per connection, re-armed only when it fires early, serves the keep-alive,
  head and body timeouts, instead of a timer created and cancelled per request;
- the head is checked for stray control characters in one scan, not two regexes per
  header.
And what a server facing hostile clients must hold to (SPEC §7, §13): heads bounded in
size and fields (431/414), head and body deadlines (408; CRLFs that begin no request
start a head's deadline too), a cap on connections (idle ones closed first, then 503),
no upgrade but WebSocket's (RFC 6455: the transport is handed to a WebSocketCycle
once the handshake's request is read; any other upgrade is served as plain HTTP), nginx's framing refusals (505, 501, 400 for Host and Transfer-Encoding, 404 for
`%2F`), and a malformed request answered only after the pipelined ones before it.
"""

from __future__ import annotations

import asyncio
import math
import urllib.parse
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import httptools

from gateway.errors import (
    BadRequest,
    HeaderTooLarge,
    RequestTimeout,
    UriTooLong,
)
from gateway.server.admission import (
    encoded_slash,
    framing_refusal,
    give_way,
    limits_of,
    overloaded,
)
from gateway.server.cycle import Cycle, FlowControl, closing
from gateway.server.upgrade import BodyOnly, is_websocket, resume_head
from gateway.types import WRITER, Message

if TYPE_CHECKING:
    from gateway.server.websocket_cycle import WebSocketCycle

HIGH_WATER = 64 * 1024  # buffered request body bytes at which reading pauses
_ASGI = {"version": "3.0", "spec_version": "2.3"}
# 2.4: websocket.http.response (the denial response), reason in websocket.disconnect.
_ASGI_WEBSOCKET = {"version": "3.0", "spec_version": "2.4"}
LINGER_SECONDS = 2.0  # after a refusal: the longest the client's bytes are drained
# on_header adds 1 per Host field and this per Transfer-Encoding field: a head whose sum
# is not 1 (one Host, no Transfer-Encoding) is judged by admission.framing_refusal.
_CODING = 1 << 16


class _Refused(Exception):
    """Raised in a parser callback to stop parsing; the refusal is already queued."""


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
        self.limits = limits_of(self.app)
        self.keep_alive_for: float = config.timeout_keep_alive
        self.first_due = min(self.limits.header_timeout, self.keep_alive_for)
        self.loop = _loop or asyncio.get_event_loop()
        self.state = server_state
        self.app_state = app_state
        self.root_path: str = config.root_path
        self.parser = self._new_parser()
        self.transport: asyncio.Transport = cast(asyncio.Transport, None)
        self.flow: FlowControl = cast(FlowControl, None)
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.cycle: Cycle | None = None  # the request being answered
        # The scope's extensions: this protocol as the types.Writer of its streams.
        self.extensions: dict[str, Any] = {}
        self.queued: deque[Cycle] = deque()  # pipelined requests waiting their turn
        self.refusal: bytes | None = None  # the last answer, after those queued
        # One timer for every deadline of the connection (see _expire).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0
        # > 0 while no request has begun since the last answer (or since connecting):
        # idle, or holding only CRLFs, which llhttp skips (then head_since is set too).
        self.idle_since = 0.0
        self.head_since = 0.0  # > 0 while a request head is arriving
        self.body_at = 0.0  # > 0 while a request body is arriving: its last bytes' time
        # The request being parsed.
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.read_size = 0  # bytes of the read being parsed
        self.head_reads = 0  # bytes of reads that began inside the head
        self.expect = False
        self.framing = 0  # Host and Transfer-Encoding fields seen (see _CODING)
        self.parsing: Cycle | None = None
        self.upgrading = False  # the head asked for an upgrade (honoured for WebSocket)
        self.websocket: WebSocketCycle | None = None  # the transport's next protocol

    def _new_parser(self) -> httptools.HttpRequestParser:
        parser = httptools.HttpRequestParser(self)
        # Answer the first of pipelined requests sent after a `connection: close` one.
        # Any version digits reach on_headers_complete, where one that is not 1.x gets
        # 505 as from nginx (llhttp alone would fail HTTP/3.0 as malformed: 400).
        parser.set_dangerous_leniencies(lenient_data_after_close=True, lenient_version=True)
        return parser

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.flow = FlowControl(self.transport, self.loop)
        self.extensions = {WRITER: self}
        connections = self.state.connections
        connections.add(self)
        self.server = _address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        if len(connections) > self.limits.max_connections and not self._make_room():
            # Nothing was read from it, and no lingering: the fd goes back at once.
            self.refusal = overloaded()
            self.transport.write(self.refusal)
            self.transport.close()
            return
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
        if self.flow is not None:
            self.flow.resume_writing()

    def data_received(self, data: bytes) -> None:
        self.read_size = len(data)
        if self.refusal is not None:
            return  # the connection ends once the refusal is out; nothing more is read
        if self.head_since:
            if self.idle_since:
                self._after_stray(data)
                return
            # A head spanning reads: httptools keeps the unfinished field itself, so the
            # bytes are counted here, and a read is cut where the limit would be passed.
            limit = self.limits.max_header_bytes
            if self.head_reads + len(data) > limit:
                room = max(0, limit - self.head_reads) + 1
                head = self.headers  # a new list per head: tells this head from the next
                self._feed(data[:room])
                if self.websocket is not None:  # a handshake ended in it: the rest is its
                    self.websocket.data_received(data[room:])
                    return
                if self.head_since and self.headers is head and self.refusal is None:
                    self._refuse_head(431)
                    return
                data = data[room:]
                if not data or self.refusal is not None:
                    return
            self.head_reads += len(data)
        self._feed(data)
        if self.idle_since:  # on_message_begin clears it: no request began
            self._stray()
        if self.body_at:  # a body still arriving: this read was progress
            self.body_at = self.loop.time()

    def _stray(self) -> None:
        """An idle connection read only CRLFs, which llhttp skips before a request line.
        They count as a head's start (SPEC §13): the head deadline runs from them, and
        at the cap the connection still gives way as an idle one (idle_since is kept)."""
        if self.head_since or self.transport.is_closing():
            return
        now = self.head_since = self.loop.time()
        self.head_reads = 0
        due = now + self.limits.header_timeout
        if self.timer is None or self.timer_due > due:
            self._arm(due)

    def _after_stray(self, data: bytes) -> None:
        """A read after stray CRLFs: more of them, or a request beginning. Its head's
        deadline still runs from the first CRLF, as nginx's does; its bytes count toward
        the head's size as a first read's do (on_headers_complete)."""
        began = self.head_since
        self._feed(data)
        if self.idle_since:
            return  # CRLFs again
        if self.head_since and self.cycle is None and self.refusal is None:
            self.head_since = began  # the head that began here is still arriving
        if self.body_at:
            self.body_at = self.loop.time()

    def _feed(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self._upgrade(data[offset:])
        except (httptools.HttpParserError, UnicodeDecodeError):
            if self.refusal is None:
                self._reject()

    def eof_received(self) -> None:
        pass  # the transport closes itself (and a lingering close ends here)

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    # types.Writer, for the response being written: `cycle` (the one answered now; a
    # pipelined request's app does not run before it is).

    def writable(self) -> bool:
        cycle = self.cycle
        # Chunked and past its head (Cycle.send wrote it with the first body bytes): a
        # stream under way, its client reading.
        return (
            cycle is not None
            and cycle.chunked
            and cycle.head is None
            and self.flow.drain is None
            and not cycle.disconnected
            and not cycle.complete
            and not cycle.head_only
        )

    def write_now(self, body: bytes) -> None:
        cycle = self.cycle
        if cycle is not None:
            cycle.write_now(body)

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []
        self.expect = False
        self.framing = 0
        self.head_reads = 0
        self.idle_since = 0.0
        since = self.head_since = self.loop.time()
        # The shortest of the deadlines: any later one re-arms when it fires early. The
        # timer is almost always armed already (keep-alive): one compare, no call.
        due = since + self.first_due
        if self.timer is None or self.timer_due > due:
            self._arm(due)

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_header_bytes:
            self._refuse_head(414)
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        # Sizes are checked once the head is complete: within one read httptools holds
        # at most that read, and across reads data_received counts and cuts.
        name = name.lower()
        if name == b"host":
            self.framing += 1
        elif name == b"transfer-encoding":
            self.framing += _CODING
        elif name == b"expect" and value.lower() == b"100-continue":
            self.expect = True
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        since, self.head_since = self.head_since, 0.0
        limits = self.limits
        headers = self.headers
        if len(headers) > limits.max_header_fields or (
            # A head is within the reads it came in: measured only when those were larger
            # than the limit.
            (self.read_size > limits.max_header_bytes or self.head_reads)
            and _head_size(self.url, headers) > limits.max_header_bytes
        ):
            self._refuse_head(431)
            raise _Refused
        parser = self.parser
        version = parser.get_http_version()
        if self.framing != 1 or version != "1.1":  # HTTP/1.0, chunked, or to be refused
            refusal = framing_refusal(version, headers)
            if refusal is not None:
                self._refuse(refusal)
                raise _Refused
        self.upgrading = parser.should_upgrade()
        url = self.url
        if url[:1] == b"/":
            # A fragment (which clients should not send) belongs to neither part.
            raw_path, _, query = url.partition(b"#")[0].partition(b"?")
        else:  # absolute form (a client talking to a proxy) or `*`
            parsed = httptools.parse_url(url)
            raw_path, query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("ascii")
        if "%" in path:
            if "%2f" in path.lower():
                self._refuse(encoded_slash())
                raise _Refused
            path = urllib.parse.unquote(path)
        if self.upgrading and is_websocket(headers):
            self._open_websocket(version, raw_path, query, path)
            return
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
            "headers": headers,
            "state": self.app_state.copy(),
            # The same dict for every request of the connection: one per request, with
            # the scope's resize, cost 2 % of a JSON request (gc, make bench-instructions).
            "extensions": self.extensions,
        }
        # An upgrade request is answered as plain HTTP, then the connection ends.
        keep_alive = version != "1.0" and parser.should_keep_alive() and not self.upgrading
        cycle = self.parsing = Cycle(
            self.transport, self.flow, self.finished, scope, keep_alive, self.expect
        )
        # The body's deadline runs from here; data_received moves it on after each read
        # that leaves the body unfinished (no clock call per body callback).
        self.body_at = since
        if self.cycle is None:
            self._begin(cycle)
        else:
            # Pipelined: answered in order, one at a time; read no further meanwhile.
            self.queued.append(cycle)
            self.hold_reading()

    def on_body(self, body: bytes) -> None:
        cycle = self.parsing
        if cycle is None or cycle.complete:
            return
        cycle.chunks.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > HIGH_WATER:
            self.flow.pause_reading()
        cycle.wake()

    def on_message_complete(self) -> None:
        if self.upgrading:
            return  # llhttp skips an upgrade's body: _upgrade delivers it
        self.body_at = 0.0
        cycle = self.parsing
        self.parsing = None
        if cycle is None or cycle.complete:
            return
        cycle.more_body = False
        cycle.wake()

    # upgrades: WebSocket's, and others served as plain HTTP

    def _open_websocket(self, version: str, raw_path: bytes, query: bytes, path: str) -> None:
        """A WebSocket handshake's request: checked here (a refusal ends the connection
        as any other does); the app answers it once llhttp stops after the head."""
        # Imported at the first handshake: the two modules cost start-up ~7 ms (-X
        # importtime) that a gateway never asked for WebSockets never pays.
        from gateway.server.websocket import check_handshake
        from gateway.server.websocket_cycle import WebSocketCycle

        handshake = check_handshake(self.parser.get_method().decode("ascii"), version, self.headers)
        if isinstance(handshake, bytes):
            self._refuse(handshake)
            raise _Refused
        if self.cycle is not None:
            error = BadRequest("a WebSocket handshake waits for the answers before it")
            self._refuse(closing(b"400 Bad Request", error))
            raise _Refused
        scope: Message = {
            "type": "websocket",
            "asgi": _ASGI_WEBSOCKET,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": "wss" if self.scheme == "https" else "ws",
            "root_path": self.root_path,
            "path": self.root_path + path if self.root_path else path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": self.headers,
            "subprotocols": list(handshake.subprotocols),
            "state": self.app_state.copy(),
            "extensions": {"websocket.http.response": {}},
        }
        self.websocket = WebSocketCycle(
            self.transport, self.loop, self.app, scope, handshake, self.limits, self.state
        )

    def _upgrade(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request's head: a WebSocket handshake's goes
        to its WebSocketCycle; any other is served as plain HTTP with its body
        (server.upgrade's BodyOnly)."""
        if self.websocket is not None:
            self._hand_over(self.websocket, rest)
            return
        head = resume_head(self.headers)
        self.upgrading = False
        if head is None or self.parsing is None:
            self.on_message_complete()
            self.parser = self._new_parser()
            return  # nothing after the head is read: the connection ends with the answer
        self.parser = httptools.HttpRequestParser(BodyOnly(self))
        self._feed(head + rest)

    def _hand_over(self, websocket: WebSocketCycle, rest: bytes) -> None:
        """The transport is the WebSocket's from here: its reads, flow and end go to it,
        and it stands for the connection in the server's count (--max-connections)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.head_since = self.body_at = self.idle_since = 0.0
        connections = self.state.connections
        connections.discard(self)
        connections.add(websocket)
        self.transport.set_protocol(websocket)
        if self.flow.drain is not None:  # an earlier answer still over the high-water mark
            websocket.pause_writing()
        websocket.start(rest)

    def hold_reading(self) -> None:
        """Stop reading until finished() lets go (a cycle reading its body cannot)."""
        self.flow.hold = True
        self.flow.pause_reading()

    # refusals

    def _refuse_head(self, status: int) -> None:
        if status == 414:
            self._refuse(closing(b"414 URI Too Long", UriTooLong("the request line is too long")))
        else:
            limits = {
                "max_bytes": self.limits.max_header_bytes,
                "max_fields": self.limits.max_header_fields,
            }
            error = HeaderTooLarge("the request head is too large", limits)
            self._refuse(closing(b"431 Request Header Fields Too Large", error))

    def _refuse(self, answer: bytes) -> None:
        """End the connection with this answer (cycle.closing), after the answers to the
        requests before it: nothing more is read, and no upstream sees the refused
        request."""
        self.head_since = self.body_at = 0.0
        self.refusal = answer
        self.hold_reading()
        if self.cycle is None:
            self._send_refusal()

    def _send_refusal(self) -> None:
        transport = self.transport
        if self.refusal is None or transport.is_closing():
            transport.close()
            return
        transport.write(self.refusal)
        if not transport.can_write_eof():
            transport.close()
            return
        # Lingering close, as nginx's: closing with the client's bytes unread would
        # reset the connection and drop the answers still in the send buffer. The
        # write side ends after them; what arrives meanwhile is read and dropped
        # (data_received), until the client closes or LINGER_SECONDS pass.
        transport.write_eof()
        self.flow.hold = False
        self.flow.resume_reading()
        self.loop.call_later(LINGER_SECONDS, transport.close)

    def _reject(self) -> None:
        cycle = self.parsing
        if cycle is not None and cycle is self.cycle and not cycle.complete:
            # The request being answered has a broken body: the client gets the 400 if
            # none of an answer is out yet, and the app is told the client left.
            cycle.disconnected = True
            cycle.wake()
            if cycle.nothing_sent:
                self.transport.write(
                    closing(b"400 Bad Request", BadRequest("malformed HTTP request"))
                )
            self.transport.close()
            return
        if cycle is not None:
            # A queued request's body broke: it is never answered.
            self.queued.remove(cycle)
            self.parsing = None
        self._refuse(closing(b"400 Bad Request", BadRequest("malformed HTTP request")))

    # lifecycle

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
            if not self.queued and self.refusal is None:
                self.flow.hold = False
                self.flow.resume_reading()
            return
        if self.refusal is not None:
            self._send_refusal()
            return
        flow = self.flow
        if flow.reading_paused:  # (held implies paused: no call when neither)
            flow.hold = False
            flow.resume_reading()
        if not self.head_since:  # a head already arriving runs on its own deadline
            self._idle()

    def _idle(self) -> None:
        self.idle_since = now = self.loop.time()
        due = now + self.keep_alive_for
        if self.timer is None or self.timer_due > due:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.timer_due = self.loop.call_at(due, self._expire), due

    def _expire(self) -> None:
        """Every deadline of the connection, checked when the timer fires; it is re-armed
        for the next one due, never per request."""
        self.timer = None
        now = self.loop.time()
        limits = self.limits
        due = math.inf
        if self.idle_since and self.cycle is None and not self.head_since:
            at = self.idle_since + self.keep_alive_for
            if now >= at:
                self.transport.close()
                return
            due = at
        if self.head_since or self.body_at:
            if self.flow.reading_paused:
                # The gateway stopped reading, not the client: not the client's delay.
                if self.head_since:
                    self.head_since = now
                if self.body_at:
                    self.body_at = now
            if self.head_since:
                at = self.head_since + limits.header_timeout
                if now >= at:
                    if self.idle_since:
                        # Only CRLFs: no request began, so none is answered; closed as
                        # an idle one is, as nginx does (a 408 here would be read as the
                        # answer to the client's next request).
                        self.transport.close()
                    else:
                        self._timed_out("the request head did not arrive in time")
                    return
                due = min(due, at)
            if self.body_at:
                at = self.body_at + limits.body_timeout
                if now >= at:
                    self._timed_out("the request body stalled")
                    return
                due = min(due, at)
        if due < math.inf:
            self._arm(due)  # the timer has just fired: nothing to cancel

    def _timed_out(self, message: str) -> None:
        cycle = self.parsing
        if cycle is not None and cycle is self.cycle:
            # The app is waiting for this body: it hears that the client left.
            cycle.disconnected = True
            cycle.wake()
            if cycle.nothing_sent:
                self.transport.write(closing(b"408 Request Timeout", RequestTimeout(message)))
            self.transport.close()
            return
        if cycle is not None:
            self.queued.remove(cycle)
            self.parsing = None
        self._refuse(closing(b"408 Request Timeout", RequestTimeout(message)))

    def _make_room(self) -> bool:
        """At the connection cap: let one connection go (admission.give_way); False when
        none may."""
        other, idle = give_way(self.state.connections, self, self.loop.time())
        if other is None:
            return False
        if idle:
            other.close_idle()
        else:
            other._refuse(overloaded())
        other.state.connections.discard(other)
        return True

    def close_idle(self) -> None:
        self.transport.close()

    def shutdown(self) -> None:
        """uvicorn's drain: close when idle, else once the current response ends."""
        if self.cycle is None:
            self.transport.close()
        else:
            self.cycle.keep_alive = False


def _head_size(url: bytes, headers: list[tuple[bytes, bytes]]) -> int:
    return len(url) + sum(len(name) + len(value) + 4 for name, value in headers)


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple | list) and len(value) >= 2:
        return str(value[0]), int(value[1])
    return None
