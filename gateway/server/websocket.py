"""RFC 6455 for the server side, sans I/O (as wsproto and h11 are): the handshake check,
an incremental frame parser, frame encoding, and a connection's close handshake as a
state machine. Bytes in (split anywhere), events and bytes out; the asyncio and ASGI
side is server.websocket_cycle.

What a client is held to (SPEC §7): frames masked, no RSV bits (no extension is
negotiated), known opcodes, control frames of at most 125 bytes and never fragmented,
continuation frames only inside a fragmented message, text valid UTF-8 (checked as it
arrives, not at the message's end), and a frame or message over the size limit refused
from its length alone, before any of it is buffered.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import re
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

from gateway.errors import BadRequest, UpgradeRequired
from gateway.server.cycle import closing
from gateway.types import Headers

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_CONTROL = 125  # bytes of a control frame's payload

# Close codes (RFC 6455 §7.4.1).
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
NO_STATUS = 1005  # not sent: what the app is told when the close frame had no code
ABNORMAL = 1006  # not sent: the connection ended without a close frame
INVALID_DATA = 1007
TOO_BIG = 1009
INTERNAL_ERROR = 1011
# Codes a peer may send: registered ones (1004-1006 and 1015 never go on the wire) and
# the ranges for libraries and applications.
_RECEIVABLE = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}


def receivable(code: int) -> bool:
    return code in _RECEIVABLE or 3000 <= code <= 4999


class Opcode(IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


_OPCODES = {int(op): op for op in Opcode}


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


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


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


# --------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Received:
    """A whole message: str for text, bytes for binary."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    code: int | None  # None: the frame had no code
    reason: str


@dataclass(frozen=True, slots=True)
class Violation:
    """The peer broke the protocol: the connection closes with `code`."""

    code: int
    reason: str


Event = Received | Ping | Pong | CloseReceived | Violation


class ParseState(Enum):
    HEAD = "head"  # the first two bytes of a frame
    LENGTH = "length"  # the 16- or 64-bit extended payload length
    MASK = "mask"  # the 4-byte masking key
    PAYLOAD = "payload"
    DONE = "done"  # a close frame arrived: nothing after it is read
    FAILED = "failed"  # a violation was found: nothing after it is read


class FrameParser:
    """Client frames to events. HEAD -> (LENGTH ->) MASK -> PAYLOAD -> HEAD; an empty
    payload goes from MASK straight back to HEAD; a close frame ends in DONE, a
    violation in FAILED. Unconsumed input is at most one frame header (14 bytes) plus
    the read being parsed: a payload is taken as it comes."""

    def __init__(self, max_message_bytes: int, client: bool = False) -> None:
        self.max_message = max_message_bytes
        # The client's end (upstream/websocket.py): a server's frames are never masked.
        self.client = client
        self.state = ParseState.HEAD
        self.buffer = bytearray()
        # The frame being read.
        self.fin = False
        self.opcode = Opcode.CONTINUATION
        self.length_size = 0  # 2 or 8 in LENGTH
        self.remaining = 0  # payload bytes still to come
        self.mask = b""
        self.offset = 0  # payload bytes unmasked so far (where the key's cycle stands)
        self.control = bytearray()  # a control frame's payload (<= 125 bytes)
        # The data message being assembled (possibly across fragments).
        self.message: Opcode | None = None  # TEXT or BINARY while one is open
        self.size = 0  # its bytes so far, counted from frame lengths
        self.parts: list[bytes] | list[str] = []
        self.decoder: codecs.IncrementalDecoder | None = None

    def feed(self, data: bytes) -> list[Event]:
        if self.state is ParseState.DONE or self.state is ParseState.FAILED:
            return []
        buf = self.buffer
        buf += data
        events: list[Event] = []
        pos = 0
        while True:
            state = self.state
            available = len(buf) - pos
            if state is ParseState.PAYLOAD:
                if not self.remaining:  # a client's empty frame (the server's end in MASK)
                    self._frame_done(events)
                    continue
                take = min(self.remaining, available)
                if not take:
                    break
                chunk = bytes(buf[pos : pos + take])
                if self.mask:
                    chunk = unmask(chunk, self.mask, self.offset)
                pos += take
                self.offset += take
                self.remaining -= take
                violation = self._payload(chunk)
                if violation is None and not self.remaining:
                    self._frame_done(events)
                elif violation is not None:
                    events.append(self._fail(violation))
            elif state is ParseState.HEAD:
                if available < 2:
                    break
                violation = self._head(buf[pos], buf[pos + 1])
                pos += 2
                if violation is not None:
                    events.append(self._fail(violation))
            elif state is ParseState.LENGTH:
                if available < self.length_size:
                    break
                size = self.length_size
                (length,) = struct.unpack("!H" if size == 2 else "!Q", buf[pos : pos + size])
                pos += size
                violation = self._length(length)
                if violation is not None:
                    events.append(self._fail(violation))
            elif state is ParseState.MASK:
                if available < 4:
                    break
                self.mask = bytes(buf[pos : pos + 4])
                pos += 4
                self.offset = 0
                self.state = ParseState.PAYLOAD
                if not self.remaining:
                    self._frame_done(events)
            else:  # DONE or FAILED
                break
        del buf[:pos]
        if self.state is ParseState.DONE or self.state is ParseState.FAILED:
            buf.clear()
        return events

    def _head(self, b0: int, b1: int) -> Violation | None:
        if b0 & 0x70:
            return Violation(PROTOCOL_ERROR, "RSV bits set without an extension")
        opcode = _OPCODES.get(b0 & 0x0F)
        if opcode is None:
            return Violation(PROTOCOL_ERROR, "unknown opcode")
        if self.client:
            if b1 & 0x80:
                return Violation(PROTOCOL_ERROR, "a server frame must not be masked")
        elif not b1 & 0x80:
            return Violation(PROTOCOL_ERROR, "a client frame must be masked")
        self.fin = bool(b0 & 0x80)
        self.opcode = opcode
        if opcode >= Opcode.CLOSE:
            if not self.fin:
                return Violation(PROTOCOL_ERROR, "a control frame cannot be fragmented")
        elif opcode is Opcode.CONTINUATION:
            if self.message is None:
                return Violation(PROTOCOL_ERROR, "a continuation frame with no message begun")
        elif self.message is not None:
            return Violation(PROTOCOL_ERROR, "a new message inside a fragmented one")
        length = b1 & 0x7F
        if length == 126 or length == 127:
            self.length_size = 2 if length == 126 else 8
            self.state = ParseState.LENGTH
            return None
        return self._length(length)

    def _length(self, length: int) -> Violation | None:
        opcode = self.opcode
        if opcode >= Opcode.CLOSE:
            if length > MAX_CONTROL:
                return Violation(PROTOCOL_ERROR, "a control frame's payload is at most 125 bytes")
            self.control.clear()
        else:
            if length >> 63:
                return Violation(PROTOCOL_ERROR, "a payload length's top bit is set")
            # Refused from the length alone, before any byte of it is held.
            if self.size + length > self.max_message:
                return Violation(TOO_BIG, f"a message is at most {self.max_message} bytes")
            if opcode is not Opcode.CONTINUATION:
                self.message = opcode
                self.size = 0
                self.parts = []
                self.decoder = _utf8() if opcode is Opcode.TEXT else None
            self.size += length
        self.remaining = length
        if self.client:  # no masking key follows
            self.mask = b""
            self.offset = 0
            self.state = ParseState.PAYLOAD  # an empty payload ends in feed's next turn
            return None
        self.state = ParseState.MASK
        return None

    def _payload(self, chunk: bytes) -> Violation | None:
        if self.opcode >= Opcode.CLOSE:
            self.control += chunk
            return None
        decoder = self.decoder
        if decoder is None:
            self.parts.append(chunk)  # type: ignore[arg-type]
            return None
        try:
            # Checked as it arrives: a bad byte fails the connection at once.
            self.parts.append(decoder.decode(chunk))  # type: ignore[arg-type]
        except UnicodeDecodeError:
            return Violation(INVALID_DATA, "a text message is not valid UTF-8")
        return None

    def _frame_done(self, events: list[Event]) -> None:
        self.state = ParseState.HEAD
        opcode = self.opcode
        if opcode < Opcode.CLOSE:
            if self.fin:
                event = self._message_done()
                events.append(event)
                if isinstance(event, Violation):
                    self.state = ParseState.FAILED
            return
        payload = bytes(self.control)
        if opcode is Opcode.PING:
            events.append(Ping(payload))
        elif opcode is Opcode.PONG:
            events.append(Pong(payload))
        else:
            close = parse_close(payload)
            self.state = ParseState.FAILED if isinstance(close, Violation) else ParseState.DONE
            events.append(close)

    def _message_done(self) -> Received | Violation:
        parts, decoder = self.parts, self.decoder
        self.message, self.parts, self.decoder, self.size = None, [], None, 0
        if decoder is None:
            return Received(b"".join(parts))  # type: ignore[arg-type]
        try:
            tail = decoder.decode(b"", final=True)  # a sequence cut off at the end
        except UnicodeDecodeError:
            return Violation(INVALID_DATA, "a text message is not valid UTF-8")
        return Received("".join(parts) + tail)  # type: ignore[arg-type]

    def _fail(self, violation: Violation) -> Violation:
        self.state = ParseState.FAILED
        self.parts, self.decoder = [], None
        return violation


def _utf8() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")("strict")


def parse_close(payload: bytes) -> CloseReceived | Violation:
    if not payload:
        return CloseReceived(None, "")
    if len(payload) == 1:
        return Violation(PROTOCOL_ERROR, "a close frame's code is two bytes")
    code = int.from_bytes(payload[:2], "big")
    if not receivable(code):
        return Violation(PROTOCOL_ERROR, "not a close code a peer may send")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return Violation(INVALID_DATA, "a close reason is not valid UTF-8")
    return CloseReceived(code, reason)


def unmask(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    """XOR with the masking key, the key's cycle starting `offset` bytes in (a payload
    split across reads); one pass as big integers, in C."""
    size = len(data)
    if not size:
        return data
    turn = offset & 3
    if turn:
        mask = mask[turn:] + mask[:turn]
    key = (mask * (size // 4 + 1))[:size]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(size, "little")


def encode_frame(opcode: Opcode, payload: bytes, fin: bool = True, mask: bytes = b"") -> bytes:
    """A frame with the shortest length encoding: a server's unmasked, a client's
    (upstream/websocket.py) masked with `mask`, four random bytes."""
    b0 = (0x80 if fin else 0) | opcode
    size = len(payload)
    bit = 0x80 if mask else 0
    if size < 126:
        head = bytes((b0, bit | size))
    elif size < 65536:
        head = struct.pack("!BBH", b0, bit | 126, size)
    else:
        head = struct.pack("!BBQ", b0, bit | 127, size)
    if mask:
        return head + mask + unmask(payload, mask)
    return head + payload


def encode_close(code: int | None, reason: str = "", mask: bytes = b"") -> bytes:
    if code is None:
        return encode_frame(Opcode.CLOSE, b"", mask=mask)
    # A reason cut to fit the control frame's 125 bytes, never inside a character.
    data = reason.encode("utf-8")[: MAX_CONTROL - 2].decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(Opcode.CLOSE, code.to_bytes(2, "big") + data, mask=mask)


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
