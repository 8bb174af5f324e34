"""RFC 6455's frames, sans I/O (gateway/wire/websocket.py): the parser (bytes split
anywhere give the same events; each violation its close code), frame encoding for both
ends (the `websockets` library's parser as the oracle), and the client end's reading of
a server's unmasked frames."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode
from websockets.streams import StreamReader

from gateway.wire.websocket import (
    CloseReceived,
    FrameParser,
    Opcode,
    ParseState,
    Ping,
    Pong,
    Received,
    Violation,
    encode_close,
    encode_frame,
    unmask,
)

LIMIT = 1024


def frame(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """A client frame, masked, built by hand (violations included)."""
    mask = b"\x37\xfa\x21\x3d"
    size = len(payload)
    if size < 126:
        length = bytes((0x80 | size,))
    elif size < 65536:
        length = struct.pack("!BH", 0x80 | 126, size)
    else:
        length = struct.pack("!BQ", 0x80 | 127, size)
    b0 = (0x80 if fin else 0) | rsv | opcode
    return bytes((b0,)) + length + mask + unmask(payload, mask)


def feed_all(data: bytes, limit: int = LIMIT) -> list[object]:
    return list(FrameParser(limit).feed(data))


# --------------------------------------------------------------------------- encoding


def oracle_parse(data: bytes) -> list[Frame]:
    """Server frames read by the `websockets` library (mask=False: server to client)."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames = []
    while reader.buffer:
        parser = Frame.parse(reader.read_exact, mask=False)
        try:
            while True:
                next(parser)
        except StopIteration as done:
            frames.append(done.value)
    return frames


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frames_encode_with_the_shortest_length(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    data = encode_frame(Opcode.BINARY, payload)
    header = 2 if size < 126 else 4 if size < 65536 else 10
    assert len(data) == header + size
    [parsed] = oracle_parse(data)
    assert (parsed.opcode, parsed.data, parsed.fin) == (WsOpcode.BINARY, payload, True)


def test_a_close_reason_is_cut_to_fit_never_inside_a_character() -> None:
    [parsed] = oracle_parse(encode_close(1001, "é" * 100))
    assert parsed.opcode == WsOpcode.CLOSE
    assert len(parsed.data) <= 125
    assert parsed.data[:2] == b"\x03\xe9"
    assert parsed.data[2:].decode("utf-8") == "é" * 61
    assert oracle_parse(encode_close(None))[0].data == b""


@given(st.binary(max_size=64), st.binary(min_size=4, max_size=4), st.integers(0, 7))
def test_unmask_is_a_bytewise_xor_from_any_offset(data: bytes, mask: bytes, offset: int) -> None:
    assert unmask(data, mask, offset) == bytes(
        b ^ mask[(i + offset) % 4] for i, b in enumerate(data)
    )


# --------------------------------------------------------------------------- parsing

Message = tuple[str, bytes | str]  # ("text" | "binary", data)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bytes, list[object]]:
    """Client bytes for several messages, each maybe fragmented, pings and pongs between
    fragments; built with the `websockets` library's serializer; the events expected."""
    out: list[bytes] = []
    expected: list[object] = []
    for _ in range(draw(st.integers(1, 4))):
        text = draw(st.booleans())
        data: bytes | str = draw(st.text(max_size=300)) if text else draw(st.binary(max_size=300))
        raw = data.encode("utf-8") if isinstance(data, str) else data
        cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=3)))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        for i, piece in enumerate(pieces):
            opcode = (WsOpcode.TEXT if text else WsOpcode.BINARY) if i == 0 else WsOpcode.CONT
            last = i == len(pieces) - 1
            out.append(Frame(opcode, piece, fin=last).serialize(mask=True))
            if last:
                expected.append(Received(data))
            if draw(st.booleans()):  # between fragments too: control frames interleave
                payload = draw(st.binary(max_size=125))
                ping = draw(st.booleans())
                op = WsOpcode.PING if ping else WsOpcode.PONG
                out.append(Frame(op, payload).serialize(mask=True))
                expected.append(Ping(payload) if ping else Pong(payload))
    out.append(Frame(WsOpcode.CLOSE, b"\x03\xe8bye").serialize(mask=True))
    expected.append(CloseReceived(1000, "bye"))
    return b"".join(out), expected


@settings(max_examples=200)
@given(streams(), st.data())
def test_any_split_of_a_stream_gives_the_same_events(
    stream: tuple[bytes, list[object]], data: st.DataObject
) -> None:
    raw, expected = stream
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=12)))
    parser = FrameParser(LIMIT)
    events: list[object] = []
    for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True):
        events += parser.feed(raw[a:b])
    assert events == expected
    assert parser.state is ParseState.DONE
    assert parser.feed(frame(Opcode.TEXT, b"after the close")) == []


def test_a_payload_split_byte_by_byte_keeps_the_mask_in_step() -> None:
    parser = FrameParser(LIMIT)
    data = frame(Opcode.BINARY, bytes(range(200)))
    events = [e for i in range(len(data)) for e in parser.feed(data[i : i + 1])]
    assert events == [Received(bytes(range(200)))]
    assert parser.buffer == bytearray()  # nothing held between frames


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(frame(Opcode.TEXT, b"hi")[:1] + bytes((2,)) + b"hi", 1002, id="unmasked"),
        pytest.param(frame(Opcode.TEXT, b"hi", rsv=0x40), 1002, id="rsv1"),
        pytest.param(frame(Opcode.TEXT, b"hi", rsv=0x10), 1002, id="rsv3"),
        pytest.param(frame(0x3, b"hi"), 1002, id="reserved-data-opcode"),
        pytest.param(frame(0xB, b"hi"), 1002, id="reserved-control-opcode"),
        pytest.param(frame(Opcode.PING, b"x" * 126), 1002, id="control-over-125"),
        pytest.param(frame(Opcode.PING, b"x", fin=False), 1002, id="fragmented-control"),
        pytest.param(frame(Opcode.CONTINUATION, b"x"), 1002, id="continuation-first"),
        pytest.param(
            frame(Opcode.TEXT, b"a", fin=False) + frame(Opcode.BINARY, b"b"),
            1002,
            id="new-message-inside-fragmented",
        ),
        pytest.param(frame(Opcode.TEXT, b"\xff"), 1007, id="bad-utf8"),
        pytest.param(frame(Opcode.TEXT, b"\xe2\x82"), 1007, id="utf8-cut-at-the-end"),
        pytest.param(
            frame(Opcode.TEXT, b"\xe2", fin=False) + frame(Opcode.CONTINUATION, b"\x82"),
            1007,
            id="utf8-cut-at-the-last-fragment",
        ),
        pytest.param(frame(Opcode.CLOSE, b"\x03"), 1002, id="close-one-byte"),
        pytest.param(frame(Opcode.CLOSE, b"\x03\xed"), 1002, id="close-1005"),
        pytest.param(frame(Opcode.CLOSE, b"\x03\xe4"), 1002, id="close-1004"),
        pytest.param(frame(Opcode.CLOSE, b"\x07\xd0"), 1002, id="close-2000"),
        pytest.param(frame(Opcode.CLOSE, b"\x00\x01"), 1002, id="close-1"),
        pytest.param(frame(Opcode.CLOSE, b"\x03\xe8\xff"), 1007, id="close-reason-bad-utf8"),
        pytest.param(bytes((0x82, 0xFF)) + b"\x80" + bytes(7) + b"mask", 1002, id="length-top-bit"),
    ],
)
def test_each_violation_gives_its_close_code(data: bytes, code: int) -> None:
    parser = FrameParser(LIMIT)
    events = parser.feed(data)
    assert isinstance(events[-1], Violation)
    assert events[-1].code == code
    assert parser.state is ParseState.FAILED
    assert parser.feed(frame(Opcode.TEXT, b"more")) == []


def test_bad_utf8_fails_before_the_message_ends() -> None:
    parser = FrameParser(LIMIT)
    [violation] = parser.feed(frame(Opcode.TEXT, b"ok \xff", fin=False))
    assert violation == Violation(1007, "a text message is not valid UTF-8")


def test_a_frame_over_the_limit_is_refused_from_its_header_alone() -> None:
    parser = FrameParser(LIMIT)
    header = frame(Opcode.BINARY, bytes(LIMIT + 1))[:8]  # 2 + 2 (length) + 4 (mask)
    [violation] = parser.feed(header[:4])
    assert violation.code == 1009  # type: ignore[union-attr]
    huge = bytes((0x82, 0xFF)) + (2**40).to_bytes(8, "big")  # a terabyte, announced
    [violation] = FrameParser(LIMIT).feed(huge)
    assert violation.code == 1009  # type: ignore[union-attr]


def test_a_message_over_the_limit_across_fragments_is_1009() -> None:
    half = bytes(LIMIT // 2 + 1)
    parser = FrameParser(LIMIT)
    assert parser.feed(frame(Opcode.BINARY, half, fin=False)) == []
    [violation] = parser.feed(frame(Opcode.CONTINUATION, half)[:4])
    assert violation.code == 1009  # type: ignore[union-attr]


def test_a_message_at_the_limit_is_received() -> None:
    assert feed_all(frame(Opcode.BINARY, bytes(LIMIT))) == [Received(bytes(LIMIT))]


def test_the_limit_counts_a_new_message_afresh() -> None:
    parser = FrameParser(LIMIT)
    for _ in range(3):
        assert parser.feed(frame(Opcode.TEXT, b"a" * LIMIT)) == [Received("a" * LIMIT)]


def test_close_without_code_and_with_reason() -> None:
    assert feed_all(frame(Opcode.CLOSE)) == [CloseReceived(None, "")]
    assert feed_all(frame(Opcode.CLOSE, b"\x0f\xa0r\xc3\xa9")) == [CloseReceived(4000, "ré")]


# --------------------------------------------------------------------------- client end
# (upstream/websocket.py: the gateway as a client of an upstream's WebSocket)


@given(st.binary(max_size=70_000), st.binary(min_size=4, max_size=4))
def test_a_client_frame_is_masked_and_a_server_parser_reads_it_back(
    payload: bytes, mask: bytes
) -> None:
    frame = encode_frame(Opcode.BINARY, payload, mask=mask)
    assert frame[1] & 0x80
    assert FrameParser(1 << 20).feed(frame) == [Received(payload)]


def test_the_client_end_reads_unmasked_frames_and_refuses_masked_ones() -> None:
    parser = FrameParser(1 << 20, client=True)
    stream = encode_frame(Opcode.TEXT, b"") + encode_frame(Opcode.PING, b"p")
    stream += encode_frame(Opcode.TEXT, b'{"type": "x"}')
    assert parser.feed(stream) == [Received(""), Ping(b"p"), Received('{"type": "x"}')]
    masked = encode_frame(Opcode.TEXT, b"hi", mask=b"abcd")
    [violation] = FrameParser(1 << 20, client=True).feed(masked)
    assert isinstance(violation, Violation) and violation.code == 1002
    too_big = encode_frame(Opcode.TEXT, b"x" * 200)
    [violation] = FrameParser(100, client=True).feed(too_big)
    assert isinstance(violation, Violation) and violation.code == 1009
