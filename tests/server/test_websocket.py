"""RFC 6455's server side, sans I/O (gateway/server/websocket.py): the handshake check,
the frame parser (bytes split anywhere give the same events; each violation its close
code), frame encoding (the `websockets` library's parser as the oracle) and the
connection's state machine."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame
from websockets.frames import Opcode as WsOpcode
from websockets.streams import StreamReader

from gateway.server.websocket import (
    TRANSITIONS,
    Closed,
    Handshake,
    State,
    StateError,
    Trigger,
    WebSocket,
    build_accept,
    check_handshake,
)
from gateway.wire.websocket import (
    CloseReceived,
    FrameParser,
    Opcode,
    ParseState,
    Ping,
    Pong,
    Received,
    Violation,
    accept_key,
    encode_close,
    encode_frame,
    unmask,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
HANDSHAKE = [
    (b"host", b"t"),
    (b"connection", b"keep-alive, Upgrade"),
    (b"upgrade", b"websocket"),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-key", KEY),
]
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


# --------------------------------------------------------------------------- handshake


def test_accept_key_is_the_rfc_example() -> None:
    assert accept_key(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_a_handshake_is_accepted_with_its_subprotocols() -> None:
    headers = [*HANDSHAKE, (b"sec-websocket-protocol", b"a, b"), (b"sec-websocket-protocol", b"c")]
    assert check_handshake("GET", "1.1", headers) == Handshake(
        b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", ("a", "b", "c")
    )


def status_and_error(answer: object) -> tuple[int, dict[str, object], bytes]:
    assert isinstance(answer, bytes)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.endswith(b"\r\nconnection: close")
    return int(head.split(b" ")[1]), json.loads(body)["error"], head


@pytest.mark.parametrize(
    ("method", "version", "headers", "status"),
    [
        ("POST", "1.1", HANDSHAKE, 400),
        ("GET", "1.0", HANDSHAKE, 400),
        ("GET", "1.1", [h for h in HANDSHAKE if h[0] != b"connection"], 400),
        ("GET", "1.1", [*HANDSHAKE, (b"content-length", b"5")], 400),
        ("GET", "1.1", [*HANDSHAKE, (b"transfer-encoding", b"chunked")], 400),
        ("GET", "1.1", [h for h in HANDSHAKE if h[0] != b"sec-websocket-key"], 400),
        ("GET", "1.1", [*HANDSHAKE[:-1], (b"sec-websocket-key", b"c2hvcnQ=")], 400),
        ("GET", "1.1", [*HANDSHAKE[:-1], (b"sec-websocket-key", b"not base64!!")], 400),
        ("GET", "1.1", [*HANDSHAKE, (b"sec-websocket-key", KEY)], 400),
    ],
)
def test_a_broken_handshake_is_400(
    method: str, version: str, headers: list[tuple[bytes, bytes]], status: int
) -> None:
    got, error, _ = status_and_error(check_handshake(method, version, headers))
    assert (got, error["code"]) == (status, "bad_request")


@pytest.mark.parametrize("version", [None, b"8", b"13, 8"])
def test_another_version_is_426_naming_13(version: bytes | None) -> None:
    headers = [h for h in HANDSHAKE if h[0] != b"sec-websocket-version"]
    if version is not None:
        headers.append((b"sec-websocket-version", version))
    status, error, head = status_and_error(check_handshake("GET", "1.1", headers))
    assert (status, error["code"]) == (426, "upgrade_required")
    assert b"\r\nsec-websocket-version: 13\r\n" in head


def test_a_body_of_length_zero_is_no_body() -> None:
    assert isinstance(
        check_handshake("GET", "1.1", [*HANDSHAKE, (b"content-length", b"0")]), Handshake
    )


def test_the_101_carries_the_subprotocol_and_the_apps_headers() -> None:
    shake = Handshake(b"ACCEPT", ("chat",))
    assert build_accept(shake, "chat", [(b"x-one", b"1"), (b"Upgrade", b"h2c")]) == (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
        b"sec-websocket-accept: ACCEPT\r\nsec-websocket-protocol: chat\r\nx-one: 1\r\n\r\n"
    )


@pytest.mark.parametrize(
    "header", [(b"x-a", b"1\r\nset-cookie: x"), (b"bad name", b"1"), (b"x-a", b"a\x00")]
)
def test_a_header_that_would_split_the_101_is_refused(header: tuple[bytes, bytes]) -> None:
    with pytest.raises(RuntimeError):
        build_accept(Handshake(b"A", ()), None, [header])


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


# --------------------------------------------------------------------------- connection


def opened() -> WebSocket:
    ws = WebSocket(LIMIT)
    ws.accept()
    return ws


def test_ping_gets_a_pong_with_its_payload_and_a_pong_is_ignored() -> None:
    ws = opened()
    assert ws.receive_data(frame(Opcode.PING, b"beat") + frame(Opcode.PONG, b"x")) == []
    assert bytes(ws.outgoing) == encode_frame(Opcode.PONG, b"beat")
    assert ws.state is State.OPEN


def test_a_peer_close_is_echoed_with_its_code_and_ends_it() -> None:
    ws = opened()
    events = ws.receive_data(frame(Opcode.TEXT, b"hi") + frame(Opcode.CLOSE, b"\x0f\xa0why"))
    assert events == [Received("hi"), Closed(4000, "why")]
    assert bytes(ws.outgoing) == encode_close(4000)
    assert ws.state is State.CLOSED
    with pytest.raises(StateError):
        ws.send("late")


def test_a_close_without_code_is_answered_without_one() -> None:
    ws = opened()
    assert ws.receive_data(frame(Opcode.CLOSE)) == [Closed(1005, "")]
    assert bytes(ws.outgoing) == b"\x88\x00"


def test_the_servers_close_waits_for_the_peers() -> None:
    ws = opened()
    assert ws.close(1000, "done") == encode_close(1000, "done")
    assert ws.state is State.CLOSING
    # Messages and pings after the server's close are not answered; the close ends it.
    events = ws.receive_data(frame(Opcode.TEXT, b"late") + frame(Opcode.PING, b"p"))
    assert events == []
    assert ws.receive_data(frame(Opcode.CLOSE, b"\x03\xe8")) == [Closed(1000, "")]
    assert ws.outgoing == bytearray()  # no second close frame
    assert ws.state is State.CLOSED


def test_a_violation_sends_its_close_and_ends_it() -> None:
    ws = opened()
    [closed] = ws.receive_data(frame(Opcode.TEXT, b"\xff"))
    assert closed == Closed(1007, "a text message is not valid UTF-8")
    assert bytes(ws.outgoing) == encode_close(1007, "a text message is not valid UTF-8")
    assert ws.state is State.CLOSED


def test_a_violation_while_closing_sends_no_second_close() -> None:
    ws = opened()
    ws.close()
    assert ws.receive_data(frame(Opcode.CONTINUATION, b"x")) == [
        Closed(1002, "a continuation frame with no message begun")
    ]
    assert ws.outgoing == bytearray()


def test_nothing_is_parsed_before_the_accept_and_a_denial_ends_it() -> None:
    ws = WebSocket(LIMIT)
    assert ws.receive_data(frame(Opcode.TEXT, b"early")) == []
    ws.deny()
    assert ws.state is State.CLOSED
    with pytest.raises(StateError):
        ws.accept()


def test_a_lost_transport_ends_every_state_and_keeps_a_close_already_known() -> None:
    for state in State:
        assert TRANSITIONS[(state, Trigger.LOST)] is State.CLOSED
    ws = opened()
    assert ws.lost() == Closed(1006, "")
    ws = opened()
    ws.receive_data(frame(Opcode.CLOSE, b"\x03\xe9"))
    assert ws.lost() == Closed(1001, "")


def test_each_transition_outside_the_table_is_refused() -> None:
    for state in State:
        for trigger in Trigger:
            if (state, trigger) in TRANSITIONS:
                continue
            ws = WebSocket(LIMIT)
            ws.state = state
            with pytest.raises(StateError):
                ws._move(trigger)


def test_server_messages_are_text_or_binary_frames() -> None:
    ws = opened()
    [text, binary] = oracle_parse(ws.send("héllo") + ws.send(b"\x00\x01"))
    assert (text.opcode, text.data) == (WsOpcode.TEXT, "héllo".encode())
    assert (binary.opcode, binary.data) == (WsOpcode.BINARY, b"\x00\x01")
    assert oracle_parse(ws.ping(b"p"))[0].opcode == WsOpcode.PING


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
