"""RFC 6455's frames, sans I/O (as wsproto is): an incremental parser as a state machine,
frame encoding for either end, the close codes and the handshake's accept key. Pure
bytes, shared by the server (server/websocket.py, the client's frames) and the upstream
client (upstream/websocket.py, a server's frames).

What a client is held to (SPEC §7): frames masked, no RSV bits (no extension is
negotiated), known opcodes, control frames of at most 125 bytes and never fragmented,
continuation frames only inside a fragmented message, text valid UTF-8 (checked as it
arrives, not at the message's end), and a frame or message over the size limit refused
from its length alone, before any of it is buffered. A server's frames are read the same
way, unmasked.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

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


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


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
