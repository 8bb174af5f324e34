"""RFC 6455's server side, sans I/O (gateway/server/websocket.py): the handshake check
and the connection's state machine (the frames are tests/wire/test_websocket.py's)."""

from __future__ import annotations

import json

import pytest
from websockets.frames import Opcode as WsOpcode

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
    Opcode,
    Received,
    accept_key,
    encode_close,
    encode_frame,
)
from tests.wire.test_websocket import LIMIT, frame, oracle_parse

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
HANDSHAKE = [
    (b"host", b"t"),
    (b"connection", b"keep-alive, Upgrade"),
    (b"upgrade", b"websocket"),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-key", KEY),
]
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
