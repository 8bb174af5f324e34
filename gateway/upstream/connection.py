"""A small HTTP/1.1 client connection on asyncio protocols, parsed by httptools.

The gateway owns its upstream hop the way uvicorn owns the server side: one request at
a time per connection, the body handed over as it arrives, reading paused while the
client is slower than the upstream (so memory stays bounded), and the connection
returned to its pool only when the response was read to its end.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

import httptools

HIGH_WATER = 256 * 1024  # buffered body bytes at which reading the upstream pauses
LOW_WATER = 64 * 1024


class ConnectionLost(Exception):
    """The upstream closed, reset or sent something unparseable."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        # Nothing of a response arrived: a reused keep-alive connection may be retried.
        self.before_response = before_response


class H1Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        # The response in progress.
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.keep_alive = False
        self.eof_body = False  # neither content-length nor chunked: the body ends at close
        self.got_bytes = False
        self.head_done = False
        self.done = False
        self.error: ConnectionLost | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        # One watchdog timer per connection, re-armed only when it fires early: arming
        # and cancelling a timer for every chunk of a stream costs more than the chunk.
        self.wait_due = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"malformed response from upstream: {exc}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watchdog()
        self.closed = True
        if self.head_done and not self.done and self.eof_body and exc is None:
            self.done = True
            self._wake()
        elif not self.done:
            self._fail("upstream closed the connection")

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        # Lowercased once here: every later look at the head compares lowercase names.
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        framed = False
        for name, value in self.headers:
            if name == b"content-length" or (
                name == b"transfer-encoding" and b"chunked" in value.lower()
            ):
                framed = True
        self.eof_body = not framed and self.status not in (204, 304) and self.status >= 200
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if not body:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered >= HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.done = True
        self._wake()

    # used by the response

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, message: str) -> None:
        if self.error is None:
            self.error = ConnectionLost(message, before_response=not self.got_bytes)
        self._wake()

    def send(self, data: bytes) -> None:
        """Start a request; the previous response on this connection must be complete."""
        self.status = 0
        self.headers = []
        self.keep_alive = False
        self.eof_body = False
        self.got_bytes = self.head_done = self.done = False
        self.error = None
        self.chunks.clear()
        self.buffered = 0
        assert self.transport is not None
        self.transport.write(data)

    async def wait(self, seconds: float) -> None:
        """Until something new happened (head, body, end, error); TimeoutError when
        nothing did for `seconds`."""
        loop = asyncio.get_running_loop()
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
        loop = asyncio.get_running_loop()
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

    def reusable(self) -> bool:
        return self.done and self.keep_alive and not self.closed and not self.chunks

    def _stop_watchdog(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self._stop_watchdog()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self._stop_watchdog()
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
