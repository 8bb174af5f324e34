"""The client-facing HTTP/1.1 protocol (gateway/server/protocol.py) under a real uvicorn, over
loopback sockets: exact bytes on the wire, keep-alive, pipelining, flow control, errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from gateway.server.protocol import ServerProtocol
from gateway.types import WRITER
from tests.helpers import MemoryTransport, assert_envelope, loopback_socket, start_uvicorn

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Message, Receive, Send], Awaitable[None]]
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]

WAIT = 5.0  # seconds any single step may take before the test fails instead of hanging


async def within(aw: Awaitable[Any], seconds: float = WAIT) -> Any:
    return await asyncio.wait_for(aw, seconds)


@dataclass
class Running:
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@asynccontextmanager
async def serving(
    app: App, protocol: type[ServerProtocol] = ServerProtocol, **config: Any
) -> AsyncIterator[Running]:
    sock = loopback_socket()
    port = sock.getsockname()[1]
    settings: dict[str, Any] = {
        "lifespan": "off",
        "log_level": "warning",
        "access_log": False,
        "timeout_graceful_shutdown": 5,
        **config,
    }
    server, task = await start_uvicorn(uvicorn.Config(app, http=protocol, **settings), sock)
    try:
        assert server.started, "server did not start within 5 s"
        yield Running(server, task, port)
    finally:
        server.should_exit = True
        await within(task, 10)
        sock.close()


@asynccontextmanager
async def connect(port: int, rcvbuf: int | None = None) -> AsyncIterator[Connection]:
    if rcvbuf is None:
        reader, writer = await within(asyncio.open_connection("127.0.0.1", port))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            # Set before connecting, so the window the server sees stays small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            await within(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)))
            reader, writer = await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise
    try:
        yield reader, writer
    finally:
        writer.close()
        with suppress(ConnectionError):
            await within(writer.wait_closed())


@dataclass
class Response:
    status_line: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes  # everything read for this response, head included

    @property
    def status(self) -> int:
        return int(self.status_line.split(b" ")[1])

    def get(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]

    def as_httpx(self) -> httpx.Response:
        return httpx.Response(self.status, headers=self.headers, content=self.body)


async def read_response(reader: asyncio.StreamReader) -> Response:
    """One response, framed as its head says: content-length, chunked, or to EOF."""

    async def read() -> Response:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head[:-4].split(b"\r\n")
        headers = [
            (n.strip(), v.strip()) for n, _, v in (line.partition(b":") for line in lines[1:])
        ]
        resp = Response(lines[0], headers, b"", head)
        if resp.status in (204, 304):
            return resp
        if resp.get(b"transfer-encoding") == [b"chunked"]:
            parts = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line[:-2], 16)
                data = await reader.readexactly(size + 2)
                assert data.endswith(b"\r\n"), data
                resp.raw += size_line + data
                if size == 0:
                    break
                parts.append(data[:-2])
            resp.body = b"".join(parts)
        elif lengths := resp.get(b"content-length"):
            resp.body = await reader.readexactly(int(lengths[0]))
            resp.raw += resp.body
        else:
            resp.body = await reader.read()
            resp.raw += resp.body
        return resp

    result: Response = await within(read())
    return result


async def closed(reader: asyncio.StreamReader) -> bool:
    """The server closed the connection with nothing more sent (or reset it)."""
    try:
        rest = await within(reader.read())
    except ConnectionResetError:
        return True
    assert rest == b"", rest
    return True


def get(path: str = "/", *extra: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "host: test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def start(status: int = 200, *headers: tuple[bytes, bytes]) -> Message:
    return {"type": "http.response.start", "status": status, "headers": list(headers)}


def body(data: bytes = b"", more: bool = False) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


def plain(data: bytes) -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    return (b"content-type", b"text/plain"), (b"content-length", str(len(data)).encode())


def exact(path: bytes) -> bytes:
    """The whole response `echo_path` gives, byte for byte."""
    return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (
        len(path),
        path,
    )


async def echo_path(scope: Message, receive: Receive, send: Send) -> None:
    data = scope["path"].encode()
    await send(start(200, *plain(data)))
    await send(body(data))


async def read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    messages = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body"):
            break
    return b"".join(m.get("body", b"") for m in messages), messages


async def still_serving(port: int) -> None:
    async with connect(port) as (reader, writer):
        writer.write(get("/again"))
        assert (await read_response(reader)).raw == exact(b"/again")


# whole responses and keep-alive


async def test_small_response_exact_bytes_and_keep_alive() -> None:
    async with serving(echo_path) as srv, connect(srv.port) as (reader, writer):
        writer.write(get("/first"))
        assert await within(reader.readexactly(len(exact(b"/first")))) == exact(b"/first")
        writer.write(get("/second"))
        assert await within(reader.readexactly(len(exact(b"/second")))) == exact(b"/second")
        # Every byte up to the close is accounted for: nothing stray between responses.
        writer.write(get("/third", "connection: close"))
        rest = await within(reader.read())
        assert rest == exact(b"/third").replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)


async def test_httpx_client_reuses_the_connection() -> None:
    async with serving(echo_path) as srv, httpx.AsyncClient(timeout=WAIT) as client:
        ports = set()
        for path in ("/a", "/b", "/c"):
            r = await client.get(srv.url + path)
            assert (r.status_code, r.text) == (200, path)
            assert r.headers["content-length"] == str(len(path))
            assert r.extensions["network_stream"] is not None
            ports.add(r.extensions["network_stream"].get_extra_info("client_addr")[1])
        assert len(ports) == 1, ports


# one transport write for head and first body bytes (in-process, with a fake transport)


async def drive(app: App, request: bytes) -> list[bytes]:
    """Feed `request` to one protocol instance; the transport writes it made."""
    config = uvicorn.Config(app, http=ServerProtocol, lifespan="off", log_level="warning")
    state = ServerState()
    protocol = ServerProtocol(config, state, {}, _loop=asyncio.get_running_loop())
    transport = MemoryTransport()
    protocol.connection_made(transport)
    try:
        protocol.data_received(request)
        await within(asyncio.gather(*state.tasks))
    finally:
        protocol.connection_lost(None)
    return transport.writes


async def test_head_and_first_body_bytes_are_one_write() -> None:
    assert await drive(echo_path, get("/x")) == [exact(b"/x")]


async def test_streamed_chunks_are_one_write_each_head_with_the_first() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send(start(200))
        await send(body(b"first", more=True))
        await send(body(b"", more=True))  # nothing to write
        await send(body(b"second", more=True))
        await send(body(b"last"))  # its chunk and the terminator together

    writes = await drive(app, get())
    assert writes == [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n",
        b"6\r\nsecond\r\n",
        b"4\r\nlast\r\n0\r\n\r\n",
    ]


# chunked responses


async def test_chunked_response_framing_and_streaming() -> None:
    go = asyncio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send(start(200, (b"content-type", b"text/plain")))
        await send(body(b"first", more=True))
        # The client must see the first chunk before the second exists.
        await within(go.wait())
        await send(body(b"second!", more=True))
        await send(body(b"", more=False))

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(get())
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n"
        assert await within(reader.readexactly(len(head))) == head
        assert await within(reader.readexactly(10)) == b"5\r\nfirst\r\n"
        go.set()
        rest = b"7\r\nsecond!\r\n0\r\n\r\n"
        assert await within(reader.readexactly(len(rest))) == rest
        # Still keep-alive: the next request is answered on the same connection.
        writer.write(get("/next"))
        assert (await read_response(reader)).body == b"first" + b"second!"


async def test_app_transfer_encoding_header_is_framed_once() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send(start(200, (b"transfer-encoding", b"chunked")))
        await send(body(b"abc", more=True))
        await send(body(b"de"))

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(get())
        resp = await read_response(reader)
        assert resp.raw == (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )


async def test_no_content_statuses_get_no_framing() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send(start(int(scope["path"][1:])))
        await send(body())

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(get("/204") + get("/304"))
        expected = b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\n\r\n"
        assert await within(reader.readexactly(len(expected))) == expected
        writer.write(get("/200"))
        assert (await read_response(reader)).status == 200


# request bodies


class Recorder:
    """An app that reads the whole request body, keeps every message, and answers with
    the body's length and digest."""

    def __init__(self, before_read: asyncio.Event | None = None) -> None:
        self.messages: list[Message] = []
        self.scopes: list[Message] = []
        self.before_read = before_read

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if self.before_read is not None:
            await within(self.before_read.wait())
        data, messages = await read_body(receive)
        self.messages += messages
        answer = digest(data)
        await send(start(200, *plain(answer)))
        await send(body(answer))


def digest(data: bytes) -> bytes:
    return b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())


async def test_content_length_request_body() -> None:
    app = Recorder()
    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(b"POST /p?q=1 HTTP/1.1\r\nhost: t\r\ncontent-length: 11\r\n\r\nhello world")
        assert (await read_response(reader)).body == digest(b"hello world")
    assert app.messages == [{"type": "http.request", "body": b"hello world", "more_body": False}]
    scope = app.scopes[0]
    assert (scope["method"], scope["path"], scope["query_string"]) == ("POST", "/p", b"q=1")
    assert scope["http_version"] == "1.1"
    assert (b"content-length", b"11") in scope["headers"]


async def test_chunked_request_body() -> None:
    app = Recorder()
    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(
            b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await writer.drain()
        writer.write(b"6\r\n world\r\n0\r\n\r\n")
        assert (await read_response(reader)).body == digest(b"hello world")
    assert b"".join(m["body"] for m in app.messages) == b"hello world"
    assert app.messages[-1]["more_body"] is False
    assert all(m["more_body"] for m in app.messages[:-1])


async def test_large_body_in_pieces_with_read_pausing() -> None:
    """Over 64 KiB sent while the app is not reading: the server stops reading rather
    than buffer it all, then the app gets every byte, in order, over several messages."""
    paused = asyncio.Event()

    class Protocol(ServerProtocol):
        def on_body(self, body: bytes) -> None:
            super().on_body(body)
            if self.flow.reading_paused:
                paused.set()

    go = asyncio.Event()
    app = Recorder(before_read=go)
    data = b"".join(i.to_bytes(4, "big") * 256 for i in range(1024))  # 1 MiB, no repeats
    async with serving(app, protocol=Protocol) as srv, connect(srv.port) as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % len(data))
        for i in range(0, len(data), 32 * 1024):
            writer.write(data[i : i + 32 * 1024])
        await within(paused.wait())
        go.set()
        await within(writer.drain())
        assert (await read_response(reader)).body == digest(data)
    assert b"".join(m["body"] for m in app.messages) == data
    assert len(app.messages) > 1
    assert [m["more_body"] for m in app.messages] == [True] * (len(app.messages) - 1) + [False]


async def test_empty_get_body_is_one_final_message() -> None:
    app = Recorder()
    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(get())
        assert (await read_response(reader)).body == digest(b"")
    assert app.messages == [{"type": "http.request", "body": b"", "more_body": False}]


# Expect: 100-continue


async def test_expect_100_continue_sent_when_the_app_reads() -> None:
    async with serving(Recorder()) as srv, connect(srv.port) as (reader, writer):
        writer.write(
            b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        assert await within(reader.readexactly(len(interim))) == interim
        writer.write(b"hello")
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (200, digest(b"hello"))


async def test_expect_100_continue_not_sent_when_the_app_answers_first() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send(start(417, *plain(b"no")))
        await send(body(b"no"))

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(
            b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n"
        )
        resp = await read_response(reader)
        assert resp.status_line == b"HTTP/1.1 417 Expectation Failed"
        assert resp.body == b"no"


# HEAD


async def test_head_has_headers_but_no_body() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/unsized":
            await send(start(200, (b"content-type", b"text/plain")))
            await send(body(b"hello", more=True))
            await send(body(b""))
        else:
            await echo_path(scope, receive, send)

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(b"HEAD /hello HTTP/1.1\r\nhost: t\r\n\r\n" + get("/after"))
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 6\r\n\r\n"
        # The GET's answer follows the HEAD's head directly: no body bytes between.
        expected = head + exact(b"/after")
        assert await within(reader.readexactly(len(expected))) == expected
        writer.write(b"HEAD /unsized HTTP/1.1\r\nhost: t\r\n\r\n" + get("/after"))
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n"  # no chunked framing
        expected = head + exact(b"/after")
        assert await within(reader.readexactly(len(expected))) == expected


# connection close


async def test_http_1_0_request_is_answered_then_closed() -> None:
    async with serving(echo_path) as srv, connect(srv.port) as (reader, writer):
        writer.write(b"GET /old HTTP/1.0\r\n\r\n")
        resp = await read_response(reader)
        assert resp.body == b"/old"
        assert resp.get(b"connection") == [b"close"]
        assert await closed(reader)


async def test_client_connection_close_is_honoured() -> None:
    async with serving(echo_path) as srv, connect(srv.port) as (reader, writer):
        writer.write(get("/bye", "connection: close"))
        resp = await read_response(reader)
        assert (resp.body, resp.get(b"connection")) == (b"/bye", [b"close"])
        assert await closed(reader)


async def test_app_connection_close_header_closes_once_answered() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send(start(200, *plain(b"bye"), (b"connection", b"close")))
        await send(body(b"bye"))

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(get())
        resp = await read_response(reader)
        assert resp.body == b"bye"
        assert resp.get(b"connection") == [b"close"]  # the app's, not a second one
        assert await closed(reader)


# pipelining


async def test_pipelined_requests_answered_in_order() -> None:
    order: list[str] = []
    first_seen = asyncio.Event()
    go = asyncio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        order.append(scope["path"])
        data, _ = await read_body(receive)
        if scope["path"] == "/a":
            first_seen.set()
            await within(go.wait())  # the second request must wait its turn
        answer = scope["path"].encode() + b":" + data
        await send(start(200, *plain(answer)))
        await send(body(answer))

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(
            b"POST /a HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\nxyz"
            + get("/b")
            + b"POST /c HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"
        )
        await within(first_seen.wait())
        assert order == ["/a"]
        go.set()
        bodies = [(await read_response(reader)).body for _ in range(3)]
        assert bodies == [b"/a:xyz", b"/b:", b"/c:hi"]
        assert order == ["/a", "/b", "/c"]


async def test_pipelined_request_after_connection_close_is_not_answered() -> None:
    async with serving(echo_path) as srv, connect(srv.port) as (reader, writer):
        writer.write(get("/a", "connection: close") + get("/b"))
        assert (await read_response(reader)).body == b"/a"
        assert await closed(reader)


# malformed requests


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd",
        b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\nhost: t\r\n\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
    ],
    ids=[
        "garbage",
        "bad-content-length",
        "two-content-lengths",
        "length-and-chunked",
        "non-ascii-path",
        "header-without-colon",
    ],
)
async def test_malformed_request_is_400_envelope_then_closed(request_bytes: bytes) -> None:
    calls: list[Message] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        calls.append(scope)
        await echo_path(scope, receive, send)

    async with serving(app) as srv:
        async with connect(srv.port) as (reader, writer):
            writer.write(request_bytes)
            resp = await read_response(reader)
            assert resp.status_line == b"HTTP/1.1 400 Bad Request"
            assert_envelope(resp.as_httpx(), 400, "bad_request")
            assert resp.get(b"connection") == [b"close"]
            assert len(resp.get(b"x-request-id")[0]) == 24
            assert await closed(reader)
        await still_serving(srv.port)
    assert [c["path"] for c in calls] == ["/again"]


async def test_malformed_chunk_in_a_body_the_app_reads_is_400() -> None:
    """The head was fine, so the app runs; the bad chunk size after it still gets the
    client a 400, and the app is told the client is gone."""
    seen: asyncio.Queue[Message] = asyncio.Queue()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        while (message := await receive())["type"] == "http.request":
            await seen.put(message)
        await seen.put(message)
        await send(start(200, *plain(b"late")))  # dropped: the client got its answer
        await send(body(b"late"))

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(
            b"POST / HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"
        )
        resp = await read_response(reader)
        assert_envelope(resp.as_httpx(), 400, "bad_request")
        assert await closed(reader)
        while (message := await within(seen.get()))["type"] == "http.request":
            assert message["more_body"] is True
        assert message == {"type": "http.disconnect"}


async def test_malformed_request_after_a_good_one_on_the_connection() -> None:
    async with serving(echo_path) as srv, connect(srv.port) as (reader, writer):
        writer.write(get("/ok"))
        assert (await read_response(reader)).raw == exact(b"/ok")
        writer.write(b"GARBAGE\r\n\r\n")
        assert_envelope((await read_response(reader)).as_httpx(), 400, "bad_request")
        assert await closed(reader)


# app failures


async def test_app_raising_before_the_response_is_500_envelope() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/again":
            return await echo_path(scope, receive, send)
        raise ValueError("secret detail")

    async with serving(app) as srv:
        async with connect(srv.port) as (reader, writer):
            writer.write(get("/boom"))
            resp = await read_response(reader)
            assert resp.status_line == b"HTTP/1.1 500 Internal Server Error"
            err = assert_envelope(resp.as_httpx(), 500, "internal_error")
            assert "secret detail" not in resp.raw.decode()
            assert err["type"] == "server_error"
            assert resp.get(b"connection") == [b"close"]
            assert await closed(reader)
        await still_serving(srv.port)


async def test_request_ids_differ_between_error_answers() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        raise ValueError

    async with serving(app) as srv:
        ids = set()
        for _ in range(2):
            async with connect(srv.port) as (reader, writer):
                writer.write(get())
                ids.add((await read_response(reader)).get(b"x-request-id")[0])
        assert len(ids) == 2


async def test_app_raising_after_the_first_body_bytes_cuts_the_response() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/again":
            return await echo_path(scope, receive, send)
        await send(start(200, (b"content-length", b"10")))
        await send(body(b"hello", more=True))
        raise ValueError("mid-body")

    async with serving(app) as srv:
        async with connect(srv.port) as (reader, writer):
            writer.write(get())
            raw = await within(reader.read())
            assert raw == b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"  # then EOF
        async with httpx.AsyncClient(timeout=WAIT) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(srv.url + "/boom")
        await still_serving(srv.port)


async def test_app_raising_after_start_before_any_body_is_500_envelope() -> None:
    """The head waits for the first body bytes, so nothing has gone out yet: the client
    gets a proper 500 rather than a connection closed without any answer."""

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send(start(200, *plain(b"never")))
        raise ValueError

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(get())
        resp = await read_response(reader)
        assert_envelope(resp.as_httpx(), 500, "internal_error")
        assert b"never" not in resp.raw
        assert await closed(reader)


async def test_app_returning_without_a_response_is_500() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/again":
            await echo_path(scope, receive, send)
        elif scope["path"] == "/started":
            await send(start(200, *plain(b"never")))

    async with serving(app) as srv:
        for path in ("/nothing", "/started"):
            async with connect(srv.port) as (reader, writer):
                writer.write(get(path))
                resp = await read_response(reader)
                assert_envelope(resp.as_httpx(), 500, "internal_error")
                assert await closed(reader)
        await still_serving(srv.port)


async def test_app_returning_mid_body_closes_the_connection() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send(start(200))
        await send(body(b"part", more=True))

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(get())
        raw = await within(reader.read())
        assert raw == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\npart\r\n"


async def test_out_of_order_messages_are_app_errors() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/body-first":
            await send(body(b"x"))
        else:
            await send(start(200, *plain(b"x")))
            await send(body(b"x"))
            await send(body(b"y"))  # after the end

    async with serving(app) as srv:
        async with connect(srv.port) as (reader, writer):
            writer.write(get("/body-first"))
            assert_envelope((await read_response(reader)).as_httpx(), 500, "internal_error")
            assert await closed(reader)
        async with connect(srv.port) as (reader, writer):
            writer.write(get("/twice"))
            assert (await read_response(reader)).body == b"x"
            assert await closed(reader)


# header injection


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (b"x-evil", b"a\r\nx-injected: 1"),
        (b"x-evil", b"a\nx-injected: 1"),
        (b"x-evil", b"a\rx-injected: 1"),
        (b"x-evil", b"a\r\n\r\nHTTP/1.1 200 OK\r\nx-injected: 1\r\ncontent-length: 0\r\n\r\n"),
        (b"x-evil: 1\r\nx-injected", b"1"),
        (b"x-evil x-injected", b"1"),
        (b"", b"x-injected"),
    ],
    ids=[
        "crlf-value",
        "lf-value",
        "cr-value",
        "split-response",
        "crlf-name",
        "space-name",
        "empty",
    ],
)
async def test_header_injection_is_refused(name: bytes, value: bytes) -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/again":
            return await echo_path(scope, receive, send)
        await send(start(200, *plain(b"ok"), (name, value)))
        await send(body(b"ok"))

    async with serving(app) as srv:
        async with connect(srv.port) as (reader, writer):
            writer.write(get())
            resp = await read_response(reader)
            assert_envelope(resp.as_httpx(), 500, "internal_error")
            assert await closed(reader)
            assert b"x-injected" not in resp.raw
            assert resp.raw.count(b"HTTP/1.1") == 1
        await still_serving(srv.port)


# client disconnect


async def test_disconnect_after_the_body_wakes_the_waiting_app() -> None:
    got: asyncio.Queue[Message] = asyncio.Queue()
    body_read = asyncio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/again":
            return await echo_path(scope, receive, send)
        data, _ = await read_body(receive)
        assert data == b"hello"
        body_read.set()
        await got.put(await receive())  # nothing more comes: waits for the client to go

    async with serving(app) as srv:
        async with connect(srv.port) as (_reader, writer):
            writer.write(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello")
            await within(body_read.wait())
            assert got.empty()
        assert await within(got.get(), 2) == {"type": "http.disconnect"}
        await still_serving(srv.port)


async def test_disconnect_mid_body_is_seen_by_the_app() -> None:
    got: asyncio.Queue[Message] = asyncio.Queue()
    first_read = asyncio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        first = await receive()
        first_read.set()
        await got.put(first)
        await got.put(await receive())

    async with serving(app) as srv:
        async with connect(srv.port) as (_reader, writer):
            writer.write(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nhello")
            await within(first_read.wait())
        assert await within(got.get()) == {
            "type": "http.request",
            "body": b"hello",
            "more_body": True,
        }
        assert await within(got.get(), 2) == {"type": "http.disconnect"}


async def test_sends_after_a_disconnect_are_dropped_quietly() -> None:
    left = asyncio.Event()
    done: asyncio.Queue[str] = asyncio.Queue()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/again":
            return await echo_path(scope, receive, send)
        await read_body(receive)
        await send(start(200))
        await send(body(b"a", more=True))
        assert await receive() == {"type": "http.disconnect"}
        left.set()
        await send(body(b"b", more=True))
        await send(body(b""))
        await done.put("returned")

    async with serving(app) as srv:
        async with connect(srv.port) as (reader, writer):
            writer.write(get())
            assert await within(reader.readuntil(b"1\r\na\r\n"))
        await within(left.wait())
        assert await within(done.get()) == "returned"
        await still_serving(srv.port)


# keep-alive timeout


async def test_keep_alive_timeout_closes_idle_connections_only() -> None:
    go = asyncio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] == "/slow":
            await within(go.wait())
        await echo_path(scope, receive, send)

    async with serving(app, timeout_keep_alive=1) as srv:
        loop = asyncio.get_running_loop()

        async def idle_after_one_request() -> float:
            async with connect(srv.port) as (reader, writer):
                writer.write(get("/x"))
                assert (await read_response(reader)).raw == exact(b"/x")
                began = loop.time()
                assert await within(reader.read(), 3) == b""
                return loop.time() - began

        async def never_sends() -> float:
            began = loop.time()
            async with connect(srv.port) as (reader, _):
                assert await within(reader.read(), 3) == b""
            return loop.time() - began

        async def busy() -> None:
            async with connect(srv.port) as (reader, writer):
                for i in range(6):  # a request every 0.3 s for 1.5 s: never idle 1 s
                    writer.write(get(f"/{i}"))
                    assert (await read_response(reader)).raw == exact(f"/{i}".encode())
                    await asyncio.sleep(0.3)
                writer.write(get("/last"))
                assert (await read_response(reader)).raw == exact(b"/last")

        async def slow_answer() -> None:
            # A response still being made when the timer fires is not cut.
            async with connect(srv.port) as (reader, writer):
                writer.write(get("/slow"))
                await asyncio.sleep(1.5)
                go.set()
                assert (await read_response(reader)).raw == exact(b"/slow")

        idle, silent, *_ = await asyncio.gather(
            idle_after_one_request(), never_sends(), busy(), slow_answer()
        )
        assert 0.7 < idle < 3
        assert 0.7 < silent < 3


# write flow control


async def test_slow_reader_gets_every_byte_in_order() -> None:
    paused = asyncio.Event()
    resumed = asyncio.Event()
    chunks = 128
    size = 64 * 1024
    sent: list[int] = []

    class Protocol(ServerProtocol):
        def pause_writing(self) -> None:
            paused.set()
            super().pause_writing()

        def resume_writing(self) -> None:
            resumed.set()
            super().resume_writing()

    def chunk(i: int) -> bytes:
        return i.to_bytes(4, "big") * (size // 4)

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        await send(start(200, (b"content-length", str(chunks * size).encode())))
        for i in range(chunks):
            await send(body(chunk(i), more=i < chunks - 1))
            sent.append(i)

    async with (
        serving(app, protocol=Protocol) as srv,
        connect(srv.port, rcvbuf=16 * 1024) as (reader, writer),
    ):
        writer.write(get())
        await within(paused.wait())
        assert len(sent) < chunks  # the app is held back, not buffered without bound
        head = await within(reader.readuntil(b"\r\n\r\n"))
        assert head == b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (chunks * size)
        data = await within(reader.readexactly(chunks * size), 10)
        assert resumed.is_set()
        assert data == b"".join(chunk(i) for i in range(chunks))
        writer.write(get())  # and the connection is still good
        assert len((await read_response(reader)).body) == chunks * size


# the Writer extension (types.WRITER): a stream's bytes written outside `send`


async def test_writer_writes_a_streams_next_chunks_only_while_it_may() -> None:
    seen: list[tuple[str, bool]] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        writer = scope["extensions"][WRITER]
        seen.append(("before the head", writer.writable()))
        await send(start(200, (b"content-type", b"text/event-stream")))
        seen.append(("head held for the first body", writer.writable()))
        await send(body(b"one ", more=True))
        seen.append(("streaming", writer.writable()))
        writer.write_now(b"two ")
        writer.write_now(b"")  # nothing: an empty chunk would end the stream
        writer.write_now(b"three")
        await send(body(b""))
        seen.append(("complete", writer.writable()))

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(get())
        response = await within(read_response(reader))
        assert response.get(b"transfer-encoding") == [b"chunked"]
        assert response.body == b"one two three"
    assert seen == [
        ("before the head", False),
        ("head held for the first body", False),
        ("streaming", True),
        ("complete", False),
    ]


async def test_writer_is_not_writable_for_a_sized_answer_or_a_paused_reader() -> None:
    sized: list[bool] = []
    paused_seen: list[bool] = []
    size = 64 * 1024

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        writer = scope["extensions"][WRITER]
        if scope["path"] == "/sized":
            await send(start(200, (b"content-length", b"2")))
            await send(body(b"o", more=True))
            sized.append(writer.writable())  # content-length: only send() frames it
            await send(body(b"k"))
            return
        await send(start(200))
        await send(body(b"", more=True))
        writes = 0
        while writer.writable() and writes < 1000:  # until the client's window is full
            writer.write_now(bytes([writes % 256]) * size)
            writes += 1
        paused_seen.append(not writer.writable())
        await send(body(b"end"))  # waits for the reader, as every send does

    async with serving(app) as srv:
        async with connect(srv.port) as (reader, writer):
            writer.write(get("/sized"))
            assert (await within(read_response(reader))).body == b"ok"
        async with connect(srv.port, rcvbuf=16 * 1024) as (reader, writer):
            writer.write(get("/paced"))
            response = await within(read_response(reader), 10)
    assert sized == [False]
    assert paused_seen == [True]
    pieces = len(response.body) // size
    assert response.body == b"".join(bytes([i % 256]) * size for i in range(pieces)) + b"end"


# graceful shutdown


async def test_shutdown_finishes_the_response_in_flight() -> None:
    go = asyncio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        if scope["path"] != "/stream":
            return await echo_path(scope, receive, send)
        await send(start(200))
        await send(body(b"first", more=True))
        await within(go.wait())
        await send(body(b"second"))

    async with (
        serving(app) as srv,
        connect(srv.port) as (busy_r, busy_w),
        connect(srv.port) as (idle_r, idle_w),
    ):
        idle_w.write(get("/idle"))
        assert (await read_response(idle_r)).raw == exact(b"/idle")
        busy_w.write(get("/stream"))
        assert await within(busy_r.readuntil(b"5\r\nfirst\r\n"))
        srv.server.should_exit = True
        # uvicorn asks every connection to shut down in one pass: once the idle one is
        # closed, the busy one has been told too.
        assert await closed(idle_r)
        assert not srv.task.done()
        go.set()
        rest = b"6\r\nsecond\r\n0\r\n\r\n"
        assert await within(busy_r.readexactly(len(rest))) == rest
        assert await closed(busy_r)
        await within(srv.task, 10)
        with pytest.raises(OSError):
            await within(asyncio.open_connection("127.0.0.1", srv.port))


async def test_shutdown_before_the_head_sends_connection_close() -> None:
    reached = asyncio.Event()
    go = asyncio.Event()

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        reached.set()
        await within(go.wait())
        await echo_path(scope, receive, send)

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(get("/late"))
        await within(reached.wait())
        srv.server.should_exit = True
        # uvicorn's main loop notices should_exit within 0.1 s; its shutdown then waits
        # for the task, which waits for `go`. Wait for the listening socket to close.
        for _ in range(200):
            if not srv.server.servers or not srv.server.servers[0].is_serving():
                break
            await asyncio.sleep(0.01)
        go.set()
        resp = await read_response(reader)
        assert resp.body == b"/late"
        assert resp.get(b"connection") == [b"close"]
        assert await closed(reader)


# content-length mismatches


async def test_content_length_mismatch_does_not_hurt_the_server() -> None:
    async def app(scope: Message, receive: Receive, send: Send) -> None:
        path = scope["path"]
        if path == "/again":
            return await echo_path(scope, receive, send)
        await send(start(200, (b"content-length", b"6")))
        if path == "/long-first":
            await send(body(b"1234567"))
        elif path == "/long-later":
            await send(body(b"123", more=True))
            await send(body(b"4567"))
        else:  # short
            await send(body(b"12345"))

    async with serving(app) as srv:
        async with connect(srv.port) as (reader, writer):
            writer.write(get("/long-first"))  # nothing sent yet: a clean 500
            assert_envelope((await read_response(reader)).as_httpx(), 500, "internal_error")
            assert await closed(reader)
        async with connect(srv.port) as (reader, writer):
            writer.write(get("/long-later"))
            raw = await within(reader.read())
            assert raw == b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n123"
        async with connect(srv.port) as (reader, writer):
            writer.write(get("/short"))
            raw = await within(reader.read())
            assert raw == b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n12345"
        await still_serving(srv.port)


# upgrade requests


async def test_websocket_upgrade_is_answered_by_the_app_then_closed() -> None:
    """A WebSocket handshake reaches the app as a `websocket` scope (server.websocket_cycle);
    a path it does not serve it answers 404 through the denial-response extension, and
    the connection ends (tests/server/test_websocket_conn.py has the rest)."""
    scopes: list[Message] = []

    async def app(scope: Message, receive: Receive, send: Send) -> None:
        scopes.append(scope)
        answer = json.dumps({"error": {"code": "not_found"}}).encode()
        await send(
            {"type": "websocket.http.response.start", "status": 404, "headers": plain(answer)}
        )
        await send({"type": "websocket.http.response.body", "body": answer})

    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(
            get(
                "/v1/other",
                "connection: upgrade",
                "upgrade: websocket",
                "sec-websocket-version: 13",
                "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
            )
            + b"\x81\x05hello not http"
        )
        resp = await read_response(reader)
        assert resp.status == 404
        assert json.loads(resp.body)["error"]["code"] == "not_found"
        assert resp.get(b"connection") == [b"close"]
        assert resp.get(b"upgrade") == []
        assert await closed(reader)
    assert [scope["type"] for scope in scopes] == ["websocket"]


@pytest.mark.parametrize("chunked", [False, True])
async def test_h2c_upgrade_with_a_body_is_served_with_its_body(chunked: bool) -> None:
    app = Recorder()
    framing = (
        b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        if chunked
        else b"content-length: 11\r\n\r\nhello world"
    )
    async with serving(app) as srv, connect(srv.port) as (reader, writer):
        writer.write(
            b"POST /p HTTP/1.1\r\nhost: t\r\nconnection: Upgrade, HTTP2-Settings\r\n"
            b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n" + framing
        )
        resp = await read_response(reader)
        assert resp.status == 200
        assert resp.body == digest(b"hello world")
        assert await closed(reader)  # an upgrade request is the connection's last
    assert b"".join(m["body"] for m in app.messages) == b"hello world"


# request scope


async def test_scope_fields() -> None:
    app = Recorder()
    async with serving(app, root_path="/base") as srv, connect(srv.port) as (reader, writer):
        writer.write(get("/a%20b/c?x=1&y=%20#frag", "X-Mixed-Case: V"))
        await read_response(reader)
        writer.write(get(f"http://127.0.0.1:{srv.port}/abs?z=2"))
        await read_response(reader)
    scope, absolute = app.scopes
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["root_path"] == "/base"
    assert scope["path"] == "/base/a b/c"
    assert scope["raw_path"] == b"/a%20b/c"
    assert scope["query_string"] == b"x=1&y=%20"
    assert scope["server"] == ("127.0.0.1", srv.port)
    assert scope["client"][0] == "127.0.0.1"
    assert (b"x-mixed-case", b"V") in scope["headers"]
    assert (absolute["raw_path"], absolute["query_string"]) == (b"/abs", b"z=2")
