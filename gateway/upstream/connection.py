"""One HTTP/1.1 client connection to an upstream, on asyncio protocols, parsed by httptools.

One request at a time. The connection's lifecycle is the `State` enum below, and every
change of state goes through `_to`, which holds the table of allowed transitions (the
way h11 and httpcore keep theirs in one place):

    IDLE --send--> AWAIT_HEAD --final head--> BODY --end of message--> DONE --pool--> IDLE
    (any) --error, extra bytes, close--> MUST_CLOSE / ERROR / CLOSED

A response can only reach the request that was sent on its connection: informational
heads (1xx) are read and dropped while waiting for the final one, a 101 fails, any
byte after the response's end marks the connection MUST_CLOSE, and only DONE with
nothing left unread goes back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
from collections import deque
from collections.abc import Callable
from typing import cast

import httptools

HIGH_WATER = 256 * 1024  # buffered body bytes at which reading the upstream pauses
LOW_WATER = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024  # an upstream response head (1xx heads before it included)
MAX_HEAD_FIELDS = 256
_LINE_END = (10, 13)  # LF, CR


class State(enum.IntEnum):
    IDLE = 0  # no request on it: fresh, or back from the pool
    AWAIT_HEAD = 1  # request sent; 1xx heads are skipped until the final one
    BODY = 2  # the final head is in; the body is arriving
    DONE = 3  # the response ended exactly at its framing; may be reused
    MUST_CLOSE = 4  # the response ended, but the connection cannot be reused
    ERROR = 5  # broken: `error` says why
    CLOSED = 6  # closed by us


# Module names for the members: `State.BODY` goes through the enum's metaclass on every
# use (64 ns on 3.11, a global 7 ns), and the hot path compares states per read.
IDLE, AWAIT_HEAD, BODY, DONE = State.IDLE, State.AWAIT_HEAD, State.BODY, State.DONE
MUST_CLOSE, ERROR, CLOSED = State.MUST_CLOSE, State.ERROR, State.CLOSED


_ALLOWED = {
    IDLE: {AWAIT_HEAD, ERROR, CLOSED},
    AWAIT_HEAD: {BODY, ERROR, CLOSED},
    BODY: {DONE, MUST_CLOSE, ERROR, CLOSED},
    DONE: {IDLE, MUST_CLOSE, CLOSED},
    MUST_CLOSE: {CLOSED},
    ERROR: {CLOSED},
    CLOSED: set(),
}


def _head_size(headers: list[tuple[bytes, bytes]]) -> int:
    return sum(len(name) + len(value) + 4 for name, value in headers)


class ConnectionLost(Exception):
    """The upstream closed, reset or sent something the gateway will not relay."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        # Nothing of a response arrived: a reused keep-alive connection may be retried.
        self.before_response = before_response


class RelayFault(Exception):
    """The gateway's own code failed on a read it was handed (H1Connection.sink): a bug.
    Not a transport error, so no provider is blamed for it; its cause is the original."""


class _Refused(Exception):
    """Raised inside a parser callback to stop parsing; the reason is already recorded."""


class H1Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.state = IDLE
        self.idle_since = 0.0
        # The response in progress.
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # bytes received while waiting for the final head
        self.trailer_bytes = 0
        self.keep_alive = False
        self.eof_body = False  # neither content-length nor chunked: the body ends at close
        self.chunked = False
        self.got_bytes = False
        self.head_done = False  # the final head is in
        self.ended = False  # the response was read to its framed end
        self.error: ConnectionLost | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        # Set by the response a relay reads (H1Response.relay_inline): body bytes go to it
        # straight from data_received while the reader waits with nothing buffered.
        self.sink: Callable[[bytes], bool] | None = None
        self.taken: list[bytes] = []  # this read's pieces for the sink, once it is parsed
        # A fault of the gateway's own while the sink relayed (a bug): the reader raises it
        # as it is, never as the upstream's failure (no health penalty for the provider).
        self.fault: RelayFault | None = None
        # One watchdog timer per connection, re-armed only when it fires early: arming
        # and cancelling a timer for every chunk of a stream costs more than the chunk.
        self.wait_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0

    # the state machine

    def _to(self, new: State) -> None:
        # Every transition is in _ALLOWED. The four a request always makes assign `state`
        # directly where the state before is known (a call each cost ~0.8k instructions,
        # 3.3k a request); tests check those too, through a `state` property.
        # IntEnum: the table lookup hashes in C (Enum's __hash__ is Python code).
        if new not in _ALLOWED[self.state]:
            raise RuntimeError(f"connection state {self.state.name} -> {new.name}")
        self.state = new

    def _fail(self, message: str) -> None:
        """The connection cannot be reused, and an unfinished response cannot finish:
        the reader gets `error` once it has read the body bytes already buffered."""
        state = self.state
        if state is DONE:
            self._to(MUST_CLOSE)
        elif state is AWAIT_HEAD or state is BODY or state is IDLE:
            self.error = ConnectionLost(message, before_response=not self.got_bytes)
            self._to(ERROR)
        self._wake()

    def _enter_closed(self) -> None:
        if self.state is not CLOSED:
            if self.state is DONE:
                self._to(MUST_CLOSE)
            self._to(CLOSED)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        # Kept: on 3.11 asyncio.get_running_loop() makes a getpid() syscall per call.
        with contextlib.suppress(RuntimeError):  # driven by hand in protocol tests
            self.loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        if self.state is not BODY:
            if self.state is not AWAIT_HEAD:
                # Nothing was asked for: bytes after a response's end, or on an idle
                # connection, belong to no request. Never reuse it.
                self._fail("upstream sent bytes after its response")
                self.close()
                return
            self.got_bytes = True
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("upstream switched protocols")
            self.close()
        except httptools.HttpParserError as exc:
            if self.error is None:
                self._fail(f"malformed response from upstream: {exc}")
            self.close()
        if self.taken:
            self._hand_on()
        if self.state is AWAIT_HEAD and self.head_bytes > MAX_HEAD_BYTES:
            self._fail("upstream response head too large")
            self.close()
        elif self.state is DONE and data[-1] in _LINE_END and not self._ends_message(data):
            # llhttp skips CR/LF between messages without a callback: a read that ended
            # with the response and then such bytes leaves a connection nobody may reuse.
            self._fail("upstream sent bytes after its response")

    def _ends_message(self, data: bytes) -> bool:
        """Whether the read that completed the response ends exactly where it does (it
        ends in CR or LF). When that cannot be told, False: one connection fewer reused."""
        if self.chunked:  # ... last chunk `0`, no trailers
            return data.endswith(b"0\r\n\r\n") and (len(data) == 5 or data[-6] == 10)
        if self.chunks:  # a length-framed body: its last bytes end the read
            # Exact only when the last piece holds a byte other than CR/LF (stray bytes
            # are CR/LF alone, so they cannot shift such a piece to the read's end).
            last = self.chunks[-1]
            return data.endswith(last) and bool(last.strip(b"\r\n"))
        # no body: the head's blank line, after a status or header line
        return data.endswith(b"\r\n\r\n") and len(data) > 4 and data[-5] not in _LINE_END

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watchdog()
        if self.state is BODY and self.eof_body and exc is None:
            self.ended = True  # the body ended at the close, as it was framed
        elif self.state is AWAIT_HEAD or self.state is BODY:
            self._fail("upstream closed the connection")
        self._enter_closed()
        self._wake()

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self.state is not AWAIT_HEAD:
            # A second message on one request: never this request's, never reused.
            self._fail("upstream sent bytes after its response")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            # A trailer field (after a chunked body): dropped, never promoted to a header
            # (SPEC §13), and bounded like a head.
            self.trailer_bytes += len(name) + len(value) + 4
            if self.trailer_bytes > MAX_HEAD_BYTES:
                self._fail("upstream trailer fields too large")
                raise _Refused
            return
        # Lowercased once here: every later look at the head compares lowercase names.
        # (Count and size are checked once the head is complete: what one read holds is
        # bounded, and data_received bounds what several reads hold.)
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        headers = self.headers
        if len(headers) > MAX_HEAD_FIELDS:
            self._fail("upstream response head has too many fields")
            raise _Refused
        # A head is within what arrived while waiting for it: measured only when that
        # was more than the limit (a whole large head in one read).
        if self.head_bytes > MAX_HEAD_BYTES and _head_size(headers) > MAX_HEAD_BYTES:
            self._fail("upstream response head too large")
            raise _Refused
        chunked = framed = False
        for name, value in headers:
            if name == b"content-length":
                framed = True
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                framed = chunked = True
        status = self.parser.get_status_code()
        if status < 200:
            if status == 101:
                self._fail("upstream switched protocols")
                raise _Refused
            # 100 Continue, 102 Processing, 103 Early Hints: read and dropped; the
            # final head follows on the same request.
            self.headers = []
            return
        self.status = status
        self.keep_alive = self.parser.should_keep_alive()
        self.chunked = chunked
        self.eof_body = not framed and status not in (204, 304)
        self.head_done = True
        self.state = BODY  # hot: from AWAIT_HEAD, the only state that parses a head
        self._wake()

    def on_body(self, body: bytes) -> None:
        if not body:
            return
        if self.sink is not None and not self.chunks:
            waiter = self.waiter
            # Only while the reader waits: nothing it holds can be ahead of these bytes.
            if waiter is not None and not waiter.done():
                self.taken.append(body)  # handed on when the whole read is parsed
                return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered >= HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def _hand_on(self) -> None:
        """This read's pieces to the sink, together: one write for the client. If the
        response ended or failed within the read, or the sink declines, they go to the
        reader instead, ahead of anything buffered after them: the end of a stream then
        leaves with its last events, as it would have without the sink."""
        taken = self.taken
        body = taken[0] if len(taken) == 1 else b"".join(taken)
        taken.clear()
        waiter, sink = self.waiter, self.sink
        if self.state is BODY and waiter is not None and not waiter.done() and sink is not None:
            try:
                if sink(body):
                    return
            except Exception as exc:
                # Nothing of this read may reach the reader too (the sink may have relayed
                # part of it): the reader stops with the fault; the connection is not reused.
                fault = RelayFault("relaying an upstream read failed inside the gateway")
                fault.__cause__ = exc
                self.fault, self.sink = fault, None
                self._wake()
                return
        self.chunks.appendleft(body)
        self.buffered += len(body)
        if self.buffered >= HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.state is not BODY:
            return  # the end of an informational head
        self.ended = True
        self.state = DONE if self.keep_alive else MUST_CLOSE  # hot: from BODY, checked above
        self._wake()

    # used by the response

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def send(self, data: bytes | tuple[bytes, bytes]) -> None:
        """Start a request on an IDLE connection: its bytes, or (head, body)."""
        if self.state is not IDLE:
            self._to(AWAIT_HEAD)  # raises: not a transition
        self.state = AWAIT_HEAD
        self.status = 0
        self.headers = []
        self.head_bytes = 0
        self.trailer_bytes = 0
        self.keep_alive = False
        self.eof_body = False
        self.got_bytes = False
        self.head_done = self.ended = False
        self.error = None
        self.sink = None
        assert self.transport is not None
        if isinstance(data, tuple):
            self.transport.writelines(data)
        else:
            self.transport.write(data)

    async def wait(self, seconds: float) -> None:
        """Until something new happened (head, body, end, error); TimeoutError when
        nothing did for `seconds`."""
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        due = self.wait_due = loop.time() + max(seconds, 0.0)
        if self.timer is None or self.timer_due > due:
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.timer_due = loop.call_at(due, self._watchdog), due
        try:
            await waiter
        finally:
            self.waiter = None

    def _watchdog(self) -> None:
        self.timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        loop = self.loop or asyncio.get_running_loop()
        if loop.time() >= self.wait_due:
            waiter.set_exception(TimeoutError())
        else:
            self.timer, self.timer_due = loop.call_at(self.wait_due, self._watchdog), self.wait_due

    def take(self) -> bytes:
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused and self.buffered <= LOW_WATER and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunk

    def recycle(self) -> bool:
        """DONE -> IDLE when reusable: True when the connection may serve a next request."""
        if self.state is DONE and not self.chunks:
            self.state = IDLE
            return True
        return False

    def _stop_watchdog(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self._shut(abort=False)

    def abort(self) -> None:
        self._shut(abort=True)

    def _shut(self, abort: bool) -> None:
        self._stop_watchdog()
        if self.state is AWAIT_HEAD or self.state is BODY:
            self._fail("connection closed by the gateway")
        self._enter_closed()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
