"""A WebSocket connection once its handshake's request is read: ServerProtocol hands the
transport over to it (set_protocol), and it runs the app with an ASGI `websocket` scope.

The RFC's rules are server.websocket's (sans I/O); here is what a connection is held
to in time and memory (SPEC §7):
- inbound: messages wait for the app up to HIGH_WATER bytes, then reading pauses (a
  message in the making is bounded by the size limit, refused with 1009 from its
  length);
- outbound: `websocket.send` waits while the transport's buffer is over its high-water
  mark, as an HTTP response's body does (cycle.FlowControl); a client that reads nothing
  for `body_timeout` seconds meanwhile is cut off (the buffer dropped), and while
  writing is paused nothing more is read, so pings cannot pile up pongs;
- the close handshake: the transport closes once it is done, or `close_seconds` after
  the server's close frame if the peer never answers;
- a peer silent for `ping_seconds` is pinged; silent for as long again, it is gone.
At the connection cap a WebSocket gives way as an idle keep-alive connection does
(admission.give_way) while the app waits for a message and has sent nothing since,
with a close frame 1001.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import MutableMapping
from typing import Any

from gateway.errors import GatewayError
from gateway.server.admission import ServerLimits
from gateway.server.cycle import Cycle, FlowControl, closing
from gateway.server.websocket import (
    Closed,
    Handshake,
    State,
    WebSocket,
    build_accept,
)
from gateway.types import App, Message
from gateway.wire.websocket import (
    GOING_AWAY,
    INTERNAL_ERROR,
    NORMAL,
)

HIGH_WATER = 64 * 1024  # queued inbound message bytes at which reading pauses
CLOSE_SECONDS = 2.0  # the longest wait for the peer's close frame, or for a flush after it
PING_SECONDS = 20.0  # silence before a ping; as long again without a byte: gone
logger = logging.getLogger("gateway.server")


class ClientDisconnected(OSError):
    """`websocket.send` on a connection that is closing or closed (ASGI: an IOError)."""


class HandshakeRefused(GatewayError):
    """The app sent `websocket.close` before accepting: 403, as the ASGI spec says."""

    status = 403
    type = "permission_error"
    code = "websocket_refused"


class WebSocketCycle(asyncio.Protocol):
    # What admission.give_way reads: never a request in flight or a head arriving.
    cycle = None
    head_since = 0.0
    close_seconds = CLOSE_SECONDS
    ping_seconds = PING_SECONDS

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        app: App,
        scope: Message,
        handshake: Handshake,
        limits: ServerLimits,
        server_state: Any,
    ) -> None:
        self.transport = transport
        self.loop = loop
        self.app = app
        self.scope = scope
        self.handshake = handshake
        self.limits = limits
        self.state = server_state  # uvicorn's: its connections and tasks (as ServerProtocol)
        self.ws = WebSocket(limits.max_message_bytes)
        self.flow = FlowControl(transport, loop)
        self.early = bytearray()  # bytes read before the handshake's answer
        self.inbound: deque[tuple[Message, int]] = deque()  # messages and their sizes
        self.queued = 0  # bytes in `inbound`
        self.waiter: asyncio.Future[None] | None = None  # the app's receive(), waiting
        self.connected = False  # websocket.connect was handed to the app
        self.denial: Cycle | None = None  # an HTTP answer instead of the handshake's
        self.draining = False  # uvicorn's shutdown came during the handshake
        # > 0 while the app waits for a message and has sent nothing since (give_way).
        self.idle_since = 0.0
        # The app says it is answering (an app that reads in a task of its own, beside
        # its work, is never idle then): scope["extensions"]["gateway.busy"](bool).
        self.busy = False
        scope.setdefault("extensions", {})["gateway.busy"] = self.set_busy
        # One timer for every deadline (see _expire).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_due = math.inf
        self.closing_since = 0.0  # > 0 once the server's close frame, or the close, is out
        self.stalled_since = 0.0  # > 0 while writing is paused
        self.tick_at = math.inf  # the next look at the peer's silence
        self.heard = False  # bytes arrived since the last look
        self.pinged = False

    def start(self, early: bytes) -> None:
        """Run the app; `early`: what followed the head in its read (frames a client
        should not have sent yet, kept for after the accept)."""
        self.early += early
        self.flow.pause_reading()  # nothing more until the app answers the handshake
        task = self.loop.create_task(self.run())
        tasks = self.state.tasks
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    # asyncio.Protocol, once ServerProtocol handed the transport over

    def data_received(self, data: bytes) -> None:
        self.heard = True
        ws = self.ws
        if ws.state is State.CONNECTING:
            self.early += data  # reading is paused: at most the read under way
            return
        events = ws.receive_data(data)
        outgoing = ws.outgoing
        if outgoing:
            self.transport.write(bytes(outgoing))
            outgoing.clear()
        for event in events:
            if isinstance(event, Closed):
                # The close handshake is done (or failed): the server closes TCP first.
                self._closing()
                self.transport.close()
                break
            data_ = event.data
            if isinstance(data_, str):
                self.inbound.append(({"type": "websocket.receive", "text": data_}, len(data_)))
            else:
                self.inbound.append(({"type": "websocket.receive", "bytes": data_}, len(data_)))
            self.queued += len(data_)
        if events:
            self._wake()
        self._regulate()

    def eof_received(self) -> None:
        pass  # the transport closes itself: a peer gone without a close frame is 1006

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.ws.lost()
        self.flow.resume_writing()  # a send waiting for the drain wakes, and hears of it
        denial = self.denial
        if denial is not None and not denial.complete:
            denial.disconnected = True
            denial.wake()
        self._wake()

    def pause_writing(self) -> None:
        self.flow.pause_writing()
        self.stalled_since = now = self.loop.time()
        self._arm(now + self.limits.body_timeout)
        self._regulate()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self.stalled_since = 0.0
        self._regulate()

    def _regulate(self) -> None:
        """Read while the connection is open, the app keeps up and the peer reads."""
        state = self.ws.state
        if (
            (state is State.OPEN or state is State.CLOSING)
            and self.queued < HIGH_WATER
            and self.flow.drain is None
        ):
            self.flow.resume_reading()
        else:
            self.flow.pause_reading()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # the ASGI app

    async def run(self) -> None:
        try:
            await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass  # the app let the client's leaving end it: nothing wrong
        except asyncio.CancelledError:
            self._end_for_app(GOING_AWAY)
            raise
        except BaseException:
            logger.exception("exception in the ASGI application")
            self._end_for_app(INTERNAL_ERROR)
        else:
            if self.ws.state is State.CONNECTING or self._denying:
                logger.error("the ASGI application returned without answering the handshake")
            self._end_for_app(NORMAL)

    @property
    def _denying(self) -> bool:
        return self.denial is not None and not self.denial.complete

    def _end_for_app(self, code: int) -> None:
        """The app is done: whatever it left open is ended for it."""
        ws = self.ws
        if ws.state is State.CONNECTING:
            ws.deny()
            self.transport.write(
                closing(b"500 Internal Server Error", GatewayError("internal error"))
            )
            self.transport.close()
        elif self.denial is not None:
            if not self.denial.complete:
                self.denial.fail()
        elif ws.state is State.OPEN:
            self.transport.write(ws.close(code))
            self._closing()

    async def receive(self) -> MutableMapping[str, Any]:
        if not self.connected:
            self.connected = True
            return {"type": "websocket.connect"}
        while True:
            if self.inbound:
                message, size = self.inbound.popleft()
                self.queued -= size
                if self.flow.reading_paused:
                    self._regulate()
                return message
            closed = self.ws.closed
            if closed is not None:
                return {
                    "type": "websocket.disconnect",
                    "code": closed.code,
                    "reason": closed.reason,
                }
            if not self.busy:
                self.idle_since = self.loop.time()
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
                self.idle_since = 0.0

    def set_busy(self, busy: bool) -> None:
        """The app's own word (see `busy`): while busy, never idle at the cap."""
        self.busy = busy
        self.idle_since = 0.0 if busy or self.waiter is None else self.loop.time()

    async def send(self, message: MutableMapping[str, Any]) -> None:
        kind = message["type"]
        ws = self.ws
        if self.denial is not None:
            if kind != "websocket.http.response.body":
                raise RuntimeError(f"expected websocket.http.response.body, got {kind}")
            await self.denial.send({**message, "type": "http.response.body"})
            return
        if ws.state is State.CONNECTING:
            denial = self._answer_handshake(kind, message)
            if denial is not None:
                await denial.send({**message, "type": "http.response.start"})
            return
        if kind == "websocket.send":
            drain = self.flow.drain
            if drain is not None and ws.state is State.OPEN:
                await drain
            if ws.state is not State.OPEN:
                raise ClientDisconnected("the WebSocket is closing or closed")
            text = message.get("text")
            frame = ws.send(text if text is not None else message.get("bytes") or b"")
            self.transport.write(frame)
            if self.waiter is not None and not self.busy:  # a receive() waiting: idle
                self.idle_since = self.loop.time()
        elif kind == "websocket.close":
            if ws.state is State.OPEN:  # else it is closing or closed already
                self.transport.write(
                    ws.close(message.get("code", NORMAL), message.get("reason") or "")
                )
                self._closing()
        else:
            raise RuntimeError(f"expected websocket.send or websocket.close, got {kind}")

    def _answer_handshake(self, kind: str, message: MutableMapping[str, Any]) -> Cycle | None:
        """The app's answer to the handshake; the Cycle of an HTTP answer instead."""
        ws = self.ws
        if kind == "websocket.accept":
            head = build_accept(
                self.handshake, message.get("subprotocol"), list(message.get("headers") or ())
            )
            ws.accept()
            self.transport.write(head)
            self._opened()
        elif kind == "websocket.close":
            ws.deny()
            error = HandshakeRefused("the WebSocket handshake was refused")
            self.transport.write(closing(b"403 Forbidden", error))
            self.transport.close()
        elif kind == "websocket.http.response.start":
            # The denial response extension: an HTTP answer, then the connection ends.
            ws.deny()
            self.denial = Cycle(
                self.transport, self.flow, self._denied, {"method": "GET"}, False, False
            )
            return self.denial
        else:
            raise RuntimeError(
                "expected websocket.accept, websocket.close or "
                f"websocket.http.response.start, got {kind}"
            )
        return None

    def _denied(self, cycle: Cycle) -> None:
        self.transport.close()

    def _opened(self) -> None:
        self.tick_at = now = self.loop.time() + self.ping_seconds
        self._arm(now)
        if self.draining:
            self.shutdown()
        early = bytes(self.early)
        self.early.clear()
        if early:
            self.data_received(early)
        self._regulate()

    # closing, deadlines

    def _closing(self) -> None:
        if not self.closing_since:
            self.closing_since = now = self.loop.time()
            self._arm(now + self.close_seconds)

    def shutdown(self) -> None:
        """uvicorn's drain: a close frame 1001; the handshake or its deadline ends it."""
        if self.ws.state is State.OPEN:
            self.transport.write(self.ws.close(GOING_AWAY, "the gateway is shutting down"))
            self._closing()
        elif self.ws.state is State.CONNECTING:
            self.draining = True

    def close_idle(self) -> None:
        """At the connection cap (admission.give_way): the slot is needed now, so the
        close frame goes out and the connection ends without waiting for the answer."""
        if self.ws.state is State.OPEN:
            self.transport.write(
                self.ws.close(GOING_AWAY, "the gateway is at its connection limit")
            )
        self._closing()
        self.transport.close()

    def _arm(self, due: float) -> None:
        if self.timer is not None:
            if self.timer_due <= due:
                return
            self.timer.cancel()
        self.timer, self.timer_due = self.loop.call_at(due, self._expire), due

    def _expire(self) -> None:
        """Every deadline of the connection, looked at when the timer fires."""
        self.timer, self.timer_due = None, math.inf
        now = self.loop.time()
        due = math.inf
        if self.closing_since:
            at = self.closing_since + self.close_seconds
            if now >= at:
                self.transport.abort()  # no answer to the close, or its flush stalled
                return
            due = at
        if self.stalled_since:
            at = self.stalled_since + self.limits.body_timeout
            if now >= at:
                self.transport.abort()  # the peer stopped reading: its buffer is dropped
                return
            due = min(due, at)
        if self.ws.state is State.OPEN and not self.closing_since:
            if now >= self.tick_at:
                if self.heard:
                    self.heard = self.pinged = False
                elif not self.pinged:
                    self.pinged = True
                    self.transport.write(self.ws.ping())
                else:
                    self.transport.abort()  # silent through a ping and its wait
                    return
                self.tick_at = now + self.ping_seconds
            due = min(due, self.tick_at)
        if due < math.inf:
            self._arm(due)
