"""WebSocket connections on the gateway's own server (gateway/server/websocket_cycle.py
and ServerProtocol's hand-over), over loopback sockets under a real uvicorn: the
`websockets` library as the oracle client for what a conforming client meets, a raw
socket client for what a hostile one sends."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.server.admission import ServerLimits
from gateway.server.websocket_cycle import ClientDisconnected, WebSocketCycle
from gateway.wire.websocket import (
    Opcode,
    unmask,
)
from tests.server.test_protocol import Message, Receive, Send, closed, connect, serving, within

LIMIT = 4096  # max_message_bytes of the apps here


def handshake(path: str = "/ws", *extra: str, key: bytes = b"dGhlIHNhbXBsZSBub25jZQ==") -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "host: test",
        "connection: Upgrade",
        "upgrade: websocket",
        "sec-websocket-version: 13",
        f"sec-websocket-key: {key.decode()}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frame(opcode: int, payload: bytes = b"", fin: bool = True, masked: bool = True) -> bytes:
    size = len(payload)
    bit = 0x80 if masked else 0
    if size < 126:
        length = bytes((bit | size,))
    elif size < 65536:
        length = struct.pack("!BH", bit | 126, size)
    else:
        length = struct.pack("!BQ", bit | 127, size)
    head = bytes(((0x80 if fin else 0) | opcode,)) + length
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + unmask(payload, mask)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A server frame (unmasked): (opcode, payload)."""
    b0, b1 = await within(reader.readexactly(2))
    assert not b1 & 0x80, "a server frame is never masked"
    size = b1 & 0x7F
    if size == 126:
        (size,) = struct.unpack("!H", await within(reader.readexactly(2)))
    elif size == 127:
        (size,) = struct.unpack("!Q", await within(reader.readexactly(8)))
    return b0 & 0x0F, await within(reader.readexactly(size))


@dataclass
class EchoApp:
    """Accepts, echoes every message, records what it was told."""

    server_limits: ServerLimits = field(
        default_factory=lambda: ServerLimits(max_message_bytes=LIMIT)
    )
    scopes: list[Message] = field(default_factory=list)
    received: list[Message] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        assert (await receive())["type"] == "websocket.connect"
        subprotocol = scope["subprotocols"][0] if scope["subprotocols"] else None
        await send(
            {"type": "websocket.accept", "subprotocol": subprotocol, "headers": [(b"x-ws", b"1")]}
        )
        try:
            while True:
                message = await receive()
                self.received.append(message)
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") == "close please":
                    await send({"type": "websocket.close", "code": 4001, "reason": "asked"})
                    continue
                reply = {k: v for k, v in message.items() if k in ("text", "bytes")}
                await send({"type": "websocket.send", **reply})
        finally:
            self.done.set()


@asynccontextmanager
async def raw_socket(port: int, request: bytes) -> AsyncIterator[tuple[Any, Any, bytes]]:
    """A raw client past the handshake: (reader, writer, the 101's head)."""
    async with connect(port) as (reader, writer):
        writer.write(request)
        head = await within(reader.readuntil(b"\r\n\r\n"))
        yield reader, writer, head


# --------------------------------------------------------------------------- conforming


async def test_handshake_scope_and_echo_with_the_oracle_client() -> None:
    app = EchoApp()
    async with serving(app) as srv:
        url = f"ws://127.0.0.1:{srv.port}/v1/responses?x=1"
        async with ws_connect(url, subprotocols=["chat"], compression=None) as ws:  # type: ignore[list-item]
            assert ws.subprotocol == "chat"
            assert ws.response.headers["x-ws"] == "1"
            await ws.send("héllo")
            assert await within(ws.recv()) == "héllo"
            await ws.send(b"\x00\xff")
            assert await within(ws.recv()) == b"\x00\xff"
            big = "x" * LIMIT  # at the limit: served
            await ws.send(big)
            assert await within(ws.recv()) == big
            await ws.send(["frag", "mented"])  # one message in three frames
            assert await within(ws.recv()) == "fragmented"
            await within(ws.ping(b"beat"))  # answered with its payload (the library checks)
        await within(app.done.wait())
    [scope] = app.scopes
    assert scope["type"] == "websocket"
    assert (scope["scheme"], scope["path"], scope["query_string"]) == (
        "ws",
        "/v1/responses",
        b"x=1",
    )
    assert scope["subprotocols"] == ["chat"]
    assert scope["extensions"]["websocket.http.response"] == {}
    assert callable(scope["extensions"]["gateway.busy"])  # the app's word on its idleness
    assert scope["http_version"] == "1.1"
    assert app.received[-1] == {"type": "websocket.disconnect", "code": 1000, "reason": ""}


async def test_the_apps_close_code_reaches_the_client_and_the_handshake_ends_it() -> None:
    app = EchoApp()
    async with serving(app) as srv:
        async with ws_connect(f"ws://127.0.0.1:{srv.port}/", compression=None) as ws:
            await ws.send("close please")
            with pytest.raises(ConnectionClosed) as info:
                await within(ws.recv())
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "asked")
        await within(app.done.wait())
    assert app.received[-1]["type"] == "websocket.disconnect"
    assert app.received[-1]["code"] == 4001  # the client echoed it


async def test_the_clients_close_code_reaches_the_app() -> None:
    app = EchoApp()
    async with serving(app) as srv:
        async with ws_connect(f"ws://127.0.0.1:{srv.port}/", compression=None) as ws:
            await ws.close(4321, "bye")
        await within(app.done.wait())
    assert app.received[-1] == {"type": "websocket.disconnect", "code": 4321, "reason": "bye"}


async def test_fragments_with_a_ping_between_them_and_the_close_echoed() -> None:
    app = EchoApp()
    async with serving(app) as srv, raw_socket(srv.port, handshake()) as (reader, writer, head):
        assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
        assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head
        writer.write(
            frame(Opcode.TEXT, b"one ", fin=False)
            + frame(Opcode.PING, b"in between")
            + frame(Opcode.CONTINUATION, "tw\xc3".encode("latin-1"), fin=False)
            + frame(Opcode.PONG, b"unsolicited")
            + frame(Opcode.CONTINUATION, b"\xa9")
        )
        assert await read_frame(reader) == (Opcode.PONG, b"in between")
        assert await read_frame(reader) == (Opcode.TEXT, "one twé".encode())
        writer.write(frame(Opcode.CLOSE))  # no code: answered without one
        assert await read_frame(reader) == (Opcode.CLOSE, b"")
        assert await closed(reader)
        await within(app.done.wait())
    assert app.received[-1] == {"type": "websocket.disconnect", "code": 1005, "reason": ""}


async def test_frames_sent_with_the_handshake_are_read_after_the_accept() -> None:
    app = EchoApp()
    async with serving(app) as srv:
        request = handshake() + frame(Opcode.TEXT, b"early")
        async with raw_socket(srv.port, request) as (reader, _writer, head):
            assert head.startswith(b"HTTP/1.1 101 ")
            assert await read_frame(reader) == (Opcode.TEXT, b"early")


# --------------------------------------------------------------------------- answered at the handshake


async def test_the_app_denies_with_an_http_answer() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        body = json.dumps({"error": {"code": "unauthorized"}}).encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})

    async with serving(app) as srv:
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(f"ws://127.0.0.1:{srv.port}/v1/responses"):
                pass
        response = info.value.response
        assert response.status_code == 401
        assert json.loads(response.body or b"")["error"]["code"] == "unauthorized"
        async with raw_socket(srv.port, handshake()) as (reader, _, head):
            assert head.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
            assert b"\r\nconnection: close\r\n" in head
            assert b"upgrade" not in head.lower()
            rest = await within(reader.read())
            assert json.loads(rest)["error"]["code"] == "unauthorized"


async def test_a_close_before_the_accept_is_403() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.close"})

    async with serving(app) as srv, raw_socket(srv.port, handshake()) as (reader, _, head):
        assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert json.loads(await within(reader.read()))["error"]["code"] == "websocket_refused"


@pytest.mark.parametrize("raises", [False, True])
async def test_an_app_that_ends_without_answering_gives_500(raises: bool) -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if raises:
            raise ValueError("boom")

    async with serving(app) as srv, raw_socket(srv.port, handshake()) as (reader, _, head):
        assert head.startswith(b"HTTP/1.1 500 ")
        assert json.loads(await within(reader.read()))["error"]["code"] == "internal_error"


async def test_a_broken_handshake_never_reaches_the_app() -> None:
    app = EchoApp()
    async with serving(app) as srv:
        request = handshake().replace(b"sec-websocket-version: 13", b"sec-websocket-version: 8")
        async with raw_socket(srv.port, request) as (reader, _, head):
            assert head.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
            assert b"\r\nsec-websocket-version: 13\r\n" in head
            assert json.loads(await within(reader.read()))["error"]["code"] == "upgrade_required"
        async with raw_socket(srv.port, handshake(key=b"c2hvcnQ=")) as (reader, _, head):
            assert head.startswith(b"HTTP/1.1 400 ")
    assert app.scopes == []


async def test_a_handshake_after_a_keep_alive_request_is_served() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await EchoApp()(scope, receive, send)

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(b"GET /first HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await within(reader.readuntil(b"\r\n\r\n"))).startswith(b"HTTP/1.1 204 ")
        writer.write(handshake())
        assert (await within(reader.readuntil(b"\r\n\r\n"))).startswith(b"HTTP/1.1 101 ")
        writer.write(frame(Opcode.BINARY, b"then frames"))
        assert await read_frame(reader) == (Opcode.BINARY, b"then frames")


async def test_h2c_is_still_served_as_plain_http() -> None:
    seen: list[str] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(
            b"POST /p HTTP/1.1\r\nhost: t\r\nconnection: Upgrade\r\nupgrade: h2c\r\n"
            b"content-length: 5\r\n\r\nhello"
        )
        assert (await within(reader.read())).endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert seen == ["http"]


# --------------------------------------------------------------------------- hostile peers


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        pytest.param(frame(Opcode.TEXT, b"hi", masked=False), 1002, id="unmasked"),
        pytest.param(frame(Opcode.BINARY, bytes(LIMIT + 1))[:8], 1009, id="frame-over-limit"),
        pytest.param(
            frame(Opcode.BINARY, bytes(LIMIT), fin=False) + frame(Opcode.CONTINUATION, b"x"),
            1009,
            id="message-over-limit",
        ),
        pytest.param(frame(Opcode.TEXT, b"caf\xe9"), 1007, id="bad-utf8"),
        pytest.param(frame(Opcode.CONTINUATION, b"x"), 1002, id="continuation-first"),
        pytest.param(frame(Opcode.CLOSE, b"\x03"), 1002, id="close-one-byte"),
    ],
)
async def test_a_violation_closes_with_its_code(frames: bytes, code: int) -> None:
    app = EchoApp()
    async with serving(app) as srv, raw_socket(srv.port, handshake()) as (reader, writer, head):
        assert head.startswith(b"HTTP/1.1 101 ")
        writer.write(frames)
        opcode, payload = await read_frame(reader)
        assert opcode == Opcode.CLOSE
        assert int.from_bytes(payload[:2], "big") == code
        assert await closed(reader)  # the server ends TCP at once
        await within(app.done.wait())
    assert app.received[-1]["type"] == "websocket.disconnect"
    assert app.received[-1]["code"] == code


async def test_a_client_that_never_reads_is_cut_off_within_the_bound() -> None:
    """The app sends 64 KiB messages as fast as it may; the client reads nothing. The
    app is held back (writing paused at the transport's high-water mark), and
    body_timeout after the client stopped reading its send fails and the connection is
    gone."""
    sent = 0
    failed = asyncio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        nonlocal sent
        await receive()
        await send({"type": "websocket.accept"})
        chunk = b"x" * 65536
        try:
            while True:
                await send({"type": "websocket.send", "bytes": chunk})
                sent += len(chunk)
        except ClientDisconnected:
            failed.set()

    app.server_limits = ServerLimits(body_timeout=0.5)  # type: ignore[attr-defined]
    async with serving(app) as srv, connect(srv.port, rcvbuf=16 * 1024) as (reader, writer):
        writer.write(handshake())
        await within(reader.readuntil(b"\r\n\r\n"))
        loop = asyncio.get_running_loop()
        began = loop.time()
        await within(failed.wait())
        assert loop.time() - began < 4
    # What left the app: the socket buffers (a few MiB at most on loopback) and the
    # transport's high-water mark, never the unbounded stream it tried to send.
    assert sent < 16 * 1024 * 1024


async def test_an_app_that_never_reads_pauses_the_client() -> None:
    """Messages wait for the app up to a bound; past it the server stops reading, and
    the client's writes back up instead of the server's memory growing."""
    accepted = asyncio.Event()
    release = asyncio.Event()
    disconnect: list[Message] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        accepted.set()
        await within(release.wait())  # reads nothing until the test has looked
        while (message := await receive())["type"] == "websocket.receive":
            pass
        disconnect.append(message)

    async with serving(app) as srv, raw_socket(srv.port, handshake()) as (reader, writer, _):
        await within(accepted.wait())
        [protocol] = list(srv.server.server_state.connections)
        assert isinstance(protocol, WebSocketCycle)
        message = frame(Opcode.BINARY, bytes(2048))
        for _ in range(200):  # 400 KiB, far past the queue's 64 KiB
            writer.write(message)
        writer.write(frame(Opcode.CLOSE, b"\x03\xe8"))
        await within(_until(lambda: protocol.flow.reading_paused and protocol.queued))
        queued = protocol.queued
        assert 64 * 1024 <= queued < 64 * 1024 + 300 * 1024  # the bound, plus one read
        release.set()  # the app reads: every message, then the close, come through
        assert await read_frame(reader) == (Opcode.CLOSE, b"\x03\xe8")
        assert await closed(reader)
    assert disconnect == [{"type": "websocket.disconnect", "code": 1000, "reason": ""}]


async def _until(check: Any) -> None:
    while not check():  # noqa: ASYNC110 (a protocol's flag, no event to wait on)
        await asyncio.sleep(0.01)


async def test_a_silent_peer_is_pinged_then_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WebSocketCycle, "ping_seconds", 0.2)
    app = EchoApp()
    async with serving(app) as srv, raw_socket(srv.port, handshake()) as (reader, _, head):
        assert head.startswith(b"HTTP/1.1 101 ")
        assert await read_frame(reader) == (Opcode.PING, b"")
        assert await closed(reader)  # no pong, no byte at all: gone
        await within(app.done.wait())
    assert app.received[-1]["code"] == 1006


async def test_a_peer_that_answers_pings_stays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WebSocketCycle, "ping_seconds", 0.1)
    app = EchoApp()
    async with serving(app) as srv, raw_socket(srv.port, handshake()) as (reader, writer, _):
        for _ in range(3):
            opcode, payload = await read_frame(reader)
            assert opcode == Opcode.PING
            writer.write(frame(Opcode.PONG, payload))
        writer.write(frame(Opcode.TEXT, b"still here"))
        while (frame_ := await read_frame(reader))[0] == Opcode.PING:
            writer.write(frame(Opcode.PONG, frame_[1]))
        assert frame_ == (Opcode.TEXT, b"still here")


async def test_a_close_never_answered_ends_after_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(WebSocketCycle, "close_seconds", 0.3)
    app = EchoApp()
    async with serving(app) as srv, raw_socket(srv.port, handshake()) as (reader, writer, _):
        writer.write(frame(Opcode.TEXT, b"close please"))
        assert (await read_frame(reader))[0] == Opcode.CLOSE
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await closed(reader)  # the client never sent its close
        assert loop.time() - began < 3
        await within(app.done.wait())
    assert app.received[-1]["code"] == 1006


async def test_shutdown_sends_going_away() -> None:
    app = EchoApp()
    async with serving(app) as srv:
        ws = await ws_connect(f"ws://127.0.0.1:{srv.port}/", compression=None)
        srv.server.should_exit = True
        with pytest.raises(ConnectionClosed) as info:
            await within(ws.recv())
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
        await within(app.done.wait())


async def test_at_the_cap_an_idle_websocket_gives_way() -> None:
    app = EchoApp(server_limits=ServerLimits(max_connections=1, max_message_bytes=LIMIT))
    async with serving(app) as srv:
        ws = await ws_connect(f"ws://127.0.0.1:{srv.port}/", compression=None)
        await ws.send("hi")
        assert await within(ws.recv()) == "hi"  # the app waits for the next message
        async with raw_socket(srv.port, handshake()) as (_reader, _writer, head):
            assert head.startswith(b"HTTP/1.1 101 ")
            with pytest.raises(ConnectionClosed) as info:
                await within(ws.recv())
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
