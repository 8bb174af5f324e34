"""RFC 6455 for the server side, sans I/O (as h11 is): the handshake check and a
connection's close handshake as a state machine; the frames are wire/websocket.py's.
The asyncio and ASGI side is server.websocket_cycle.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from enum import Enum

from gateway.errors import BadRequest, UpgradeRequired
from gateway.server.cycle import closing
from gateway.types import Headers
from gateway.wire.websocket import (
    ABNORMAL,
    NO_STATUS,
    NORMAL,
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

# --------------------------------------------------------------------------- handshake


@dataclass(frozen=True, slots=True)
class Handshake:
    accept: bytes  # the Sec-WebSocket-Accept value
    subprotocols: tuple[str, ...]


def check_handshake(method: str, version: str, headers: Headers) -> Handshake | bytes:
    """The opening handshake's request (RFC 6455 §4.2.1), or the whole answer refusing it
    (cycle.closing). `headers` have lower-case names."""
    if method != "GET":
        return _bad("a WebSocket handshake is a GET request")
    if version != "1.1":
        return _bad("a WebSocket handshake is an HTTP/1.1 request")
    connection = b",".join(value for name, value in headers if name == b"connection")
    if b"upgrade" not in {token.strip() for token in connection.lower().split(b",")}:
        return _bad("a WebSocket handshake carries `Connection: Upgrade`")
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return _bad("a WebSocket handshake has no body")
    versions = [value.strip() for name, value in headers if name == b"sec-websocket-version"]
    if versions != [b"13"]:
        error = UpgradeRequired("the WebSocket version served is 13")
        return closing(b"426 Upgrade Required", error, b"sec-websocket-version: 13\r\n")
    keys = [value.strip() for name, value in headers if name == b"sec-websocket-key"]
    if len(keys) != 1 or not _is_key(keys[0]):
        return _bad("Sec-WebSocket-Key is 16 bytes in base64, once")
    offered = b",".join(value for name, value in headers if name == b"sec-websocket-protocol")
    subprotocols = tuple(
        token.strip().decode("latin-1") for token in offered.split(b",") if token.strip()
    )
    return Handshake(accept_key(keys[0]), subprotocols)


def _is_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def _bad(message: str) -> bytes:
    return closing(b"400 Bad Request", BadRequest(message))


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


def build_accept(handshake: Handshake, subprotocol: str | None, headers: Headers) -> bytes:
    """The 101 answer; the app's extra headers are checked as a response's are (a name is
    a token, a value holds no CR, LF or NUL). Raises RuntimeError on a bad one."""
    lines = [
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: %s\r\n" % handshake.accept
    ]
    if subprotocol is not None:
        lines.append(b"sec-websocket-protocol: %s\r\n" % subprotocol.encode("latin-1"))
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or not _VALUE.fullmatch(value):
            raise RuntimeError(f"invalid response header {name!r}")
        if name.lower() in _OURS:
            continue  # the handshake's own fields are the server's to write
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"\r\n")
    return b"".join(lines)


_OURS = {b"upgrade", b"connection", b"sec-websocket-accept", b"sec-websocket-protocol"}


# --------------------------------------------------------------------------- connection


class State(Enum):
    CONNECTING = "connecting"  # the handshake's request read, no answer yet
    OPEN = "open"
    CLOSING = "closing"  # the server's close frame sent, the peer's awaited
    CLOSED = "closed"  # the close handshake done, failed, or the transport gone


class Trigger(Enum):
    ACCEPT = "accept"  # the 101 written
    DENY = "deny"  # an HTTP answer written instead
    CLOSE_SENT = "close sent"
    CLOSE_RECEIVED = "close received"
    VIOLATION = "violation"
    LOST = "lost"  # the transport ended


TRANSITIONS: dict[tuple[State, Trigger], State] = {
    (State.CONNECTING, Trigger.ACCEPT): State.OPEN,
    (State.CONNECTING, Trigger.DENY): State.CLOSED,
    (State.CONNECTING, Trigger.LOST): State.CLOSED,
    (State.OPEN, Trigger.CLOSE_SENT): State.CLOSING,
    (State.OPEN, Trigger.CLOSE_RECEIVED): State.CLOSED,  # the close is echoed at once
    (State.OPEN, Trigger.VIOLATION): State.CLOSED,
    (State.OPEN, Trigger.LOST): State.CLOSED,
    (State.CLOSING, Trigger.CLOSE_RECEIVED): State.CLOSED,
    (State.CLOSING, Trigger.VIOLATION): State.CLOSED,
    (State.CLOSING, Trigger.LOST): State.CLOSED,
    (State.CLOSED, Trigger.LOST): State.CLOSED,
}


class StateError(RuntimeError):
    """A step the connection's state does not allow (a bug in the caller)."""


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection is over: what the app's websocket.disconnect says."""

    code: int
    reason: str


class WebSocket:
    """One server-side connection after its handshake's request: events from the peer's
    bytes, the bytes of the server's answers (pong, the close echo, a violation's close)
    gathered for the caller to write (`outgoing`)."""

    def __init__(self, max_message_bytes: int) -> None:
        self.state = State.CONNECTING
        self.parser = FrameParser(max_message_bytes)
        self.outgoing = bytearray()
        self.closed: Closed | None = None  # set on the move to CLOSED

    def _move(self, trigger: Trigger) -> None:
        after = TRANSITIONS.get((self.state, trigger))
        if after is None:
            raise StateError(f"{trigger.value} while {self.state.value}")
        self.state = after

    def accept(self) -> None:
        self._move(Trigger.ACCEPT)

    def deny(self) -> None:
        self._move(Trigger.DENY)
        self.closed = Closed(ABNORMAL, "")

    def receive_data(self, data: bytes) -> list[Received | Closed]:
        """The peer's bytes: whole messages, then Closed once the connection ended
        (the replies are in `outgoing`). Messages after the server's own close are
        dropped (the app asked to end)."""
        state = self.state
        if state is not State.OPEN and state is not State.CLOSING:
            return []
        out: list[Received | Closed] = []
        for event in self.parser.feed(data):
            if isinstance(event, Received):
                if self.state is State.OPEN:
                    out.append(event)
            elif isinstance(event, Ping):
                if self.state is State.OPEN:
                    self.outgoing += encode_frame(Opcode.PONG, event.payload)
            elif isinstance(event, CloseReceived):
                if self.state is State.OPEN:
                    self.outgoing += encode_close(event.code)
                self._move(Trigger.CLOSE_RECEIVED)
                code = NO_STATUS if event.code is None else event.code
                self.closed = Closed(code, event.reason)
                out.append(self.closed)
            elif isinstance(event, Violation):
                if self.state is State.OPEN:
                    self.outgoing += encode_close(event.code, event.reason)
                self._move(Trigger.VIOLATION)
                self.closed = Closed(event.code, event.reason)
                out.append(self.closed)
            # an unsolicited (or answering) Pong: nothing to do
        return out

    def send(self, data: str | bytes) -> bytes:
        if self.state is not State.OPEN:
            raise StateError(f"send while {self.state.value}")
        if isinstance(data, str):
            return encode_frame(Opcode.TEXT, data.encode("utf-8"))
        return encode_frame(Opcode.BINARY, data)

    def ping(self, payload: bytes = b"") -> bytes:
        if self.state is not State.OPEN:
            raise StateError(f"ping while {self.state.value}")
        return encode_frame(Opcode.PING, payload)

    def close(self, code: int = NORMAL, reason: str = "") -> bytes:
        """The server's close frame (OPEN -> CLOSING); the peer's answer ends it."""
        self._move(Trigger.CLOSE_SENT)
        return encode_close(code, reason)

    def lost(self) -> Closed:
        self._move(Trigger.LOST)
        if self.closed is None:
            self.closed = Closed(ABNORMAL, "")
        return self.closed
