"""The upstream HTTP/1.1 client against real servers on loopback that misbehave on demand."""

from __future__ import annotations

import asyncio
import gzip
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.config.routes import Provider, Timeouts
from gateway.errors import (
    UpstreamDisconnected,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.upstream.client import Upstream
from gateway.upstream.connection import HIGH_WATER, RelayFault

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """Raw TCP server; counts connections and what the client did."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.peer_closed = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, ssl_ctx: ssl.SSLContext | None = None) -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ssl_ctx)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()


async def read_request(r: asyncio.StreamReader) -> bytes:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await r.readexactly(length)


def provider(port: int, scheme: str = "http", **timeouts: float) -> Provider:
    return Provider(
        name="p", base_url=f"{scheme}://127.0.0.1:{port}/v1", timeout=Timeouts(**timeouts)
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[Server]]]:
    servers: list[Server] = []

    async def make(handler: Handler) -> Server:
        s = Server(handler)
        await s.start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        await s.stop()


@pytest.fixture
async def client() -> AsyncIterator[Upstream]:
    up = Upstream()
    yield up
    await up.close()


async def send(up: Upstream, p: Provider, body: bytes = b'{"a":1}') -> tuple[int, bytes]:
    resp = await up.send(p, "/chat/completions", body, [(b"content-type", b"application/json")])
    try:
        return resp.status, await resp.read()
    finally:
        resp.close()


async def test_request_line_and_framing(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    seen: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seen.append(await read_request(r))
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        await w.drain()

    s = await serve(handler)
    assert await send(client, provider(s.port), b'{"x": 2}') == (200, b"hello")
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert f"host: 127.0.0.1:{s.port}".encode() in lines
    assert b"content-length: 8" in lines
    assert b"accept-encoding: identity" in lines
    assert body == b'{"x": 2}'


async def test_keep_alive_reuses_one_connection(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            await read_request(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()

    s = await serve(handler)
    for _ in range(5):
        assert await send(client, provider(s.port)) == (200, b"ok")
    assert s.connections == 1


async def test_chunked_body_in_pieces(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5\r\nhel", b"lo\r\n6\r\n wor", b"ld\r\n0\r\n\r\n"):
            w.write(piece)
            await w.drain()
            await asyncio.sleep(0.01)
        await r.read()

    s = await serve(handler)
    assert await send(client, provider(s.port)) == (200, b"hello world")


async def test_body_until_close_without_length(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await w.drain()

    s = await serve(handler)
    assert await send(client, provider(s.port)) == (200, b"until the end")
    assert await send(client, provider(s.port)) == (200, b"until the end")
    assert s.connections == 2  # `Connection: close` is never reused


async def test_truncated_content_length_is_a_disconnect(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        await w.drain()

    s = await serve(handler)
    with pytest.raises(UpstreamDisconnected):
        await send(client, provider(s.port))


async def test_malformed_response_is_unavailable(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"this is not http\r\n\r\n")
        await w.drain()
        await r.read()

    s = await serve(handler)
    with pytest.raises(UpstreamUnavailable) as info:
        await send(client, provider(s.port))
    assert "malformed" in info.value.details["cause"]


async def test_close_before_status_line_is_unavailable(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)

    s = await serve(handler)
    with pytest.raises(UpstreamUnavailable):
        await send(client, provider(s.port))


async def test_refused_connection_is_unavailable(client: Upstream) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamUnavailable):
        await send(client, provider(port))


async def test_stall_before_head_is_a_timeout(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await r.read()

    s = await serve(handler)
    with pytest.raises(UpstreamTimeout):
        await send(client, provider(s.port, read=0.2))


async def test_stall_mid_body_is_a_read_timeout(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await w.drain()
        await r.read()
        s.peer_closed.set()

    s = await serve(handler)
    resp = await client.send(provider(s.port, read=0.2), "/chat/completions", b"{}", [])
    assert await resp.next_chunk() == b"abc"
    with pytest.raises(UpstreamTimeout):
        await resp.next_chunk()
    # The stalled connection is closed, not pooled.
    await asyncio.wait_for(s.peer_closed.wait(), 2)


async def test_unfinished_response_closes_its_connection(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await w.drain()
        assert await r.read() == b""
        s.peer_closed.set()

    s = await serve(handler)
    resp = await client.send(provider(s.port), "/chat/completions", b"{}", [])
    assert await resp.next_chunk() == b"abc"
    resp.close()
    await asyncio.wait_for(s.peer_closed.wait(), 1)


async def test_reused_connection_dead_before_response_is_retried_once(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        if s.connections == 1:
            # Keep-alive promised, but the second request is read and dropped unanswered.
            await read_request(r)
            return
        await r.read()

    s = await serve(handler)
    assert await send(client, provider(s.port)) == (200, b"ok")
    assert await send(client, provider(s.port)) == (200, b"ok")
    assert s.connections == 2


async def test_reading_pauses_while_the_consumer_is_slow(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    size = 8 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        w.write(payload)
        await w.drain()
        await r.read()

    s = await serve(handler)
    resp = await client.send(provider(s.port), "/chat/completions", b"{}", [])
    conn = resp._conn  # type: ignore[attr-defined]
    # Let the server push as much as the socket takes: the client buffer stays bounded.
    for _ in range(50):
        await asyncio.sleep(0.01)
    assert conn.paused
    assert conn.buffered < HIGH_WATER + 1024 * 1024
    assert await resp.read() == payload


# relay_inline: pieces of a body handed on from data_received while the reader waits


def chunked_piece(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def paced_body(
    serve: Callable[[Handler], Awaitable[Server]], pieces: list[bytes], go: asyncio.Event | None
) -> Server:
    """A chunked answer: its first piece at once, each next one (and then the end) after
    `go` is set (then cleared) or, without `go`, 0.1 s after the one before."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i, piece in enumerate(pieces):
            if i and go is not None:
                await asyncio.wait_for(go.wait(), 5)
                go.clear()
            elif i:
                await asyncio.sleep(0.1)  # the pace itself is what is tested
            w.write(chunked_piece(piece))
            await w.drain()
        if go is not None:
            await asyncio.wait_for(go.wait(), 5)
        else:
            await asyncio.sleep(0.1)  # the end in a read of its own
        w.write(b"0\r\n\r\n")
        await w.drain()
        await r.read()

    return await serve(handler)


class Taken:
    """A sink that takes every piece and says when one arrived."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.arrived = asyncio.Event()

    def sink(self, piece: bytes) -> bool:
        self.pieces.append(piece)
        self.arrived.set()
        return True


async def test_inline_sink_takes_pieces_while_the_reader_waits(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    go = asyncio.Event()
    s = await paced_body(serve, [b"abc", b"def", b"ghi"], go)
    resp = await client.send(provider(s.port), "/chat/completions", b"{}", [])
    assert await resp.next_chunk() == b"abc"
    taken = Taken()
    took, arrived = taken.pieces, taken.arrived
    resp.relay_inline(taken.sink)
    reader = asyncio.ensure_future(resp.next_chunk())
    for want in (b"def", b"ghi"):
        go.set()
        await asyncio.wait_for(arrived.wait(), 5)
        arrived.clear()
        assert took[-1] == want
        assert not reader.done()  # handed on without waking the reader
    go.set()  # the end still wakes it
    assert await asyncio.wait_for(reader, 5) == b""
    assert took == [b"def", b"ghi"]


async def test_the_read_that_ends_the_answer_goes_to_the_reader(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    """Its pieces are read with the end (a stream's last events leave with it, in one
    write), not handed to the sink."""
    go = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked_piece(b"a"))
        await asyncio.wait_for(go.wait(), 5)
        w.write(chunked_piece(b"bc") + chunked_piece(b"de") + b"0\r\n\r\n")
        await w.drain()
        await r.read()

    s = await serve(handler)
    resp = await client.send(provider(s.port), "/chat/completions", b"{}", [])
    assert await resp.next_chunk() == b"a"
    took: list[bytes] = []
    resp.relay_inline(lambda piece: took.append(piece) is None)
    reader = asyncio.ensure_future(resp.next_chunk())
    await asyncio.sleep(0)  # the reader waits
    go.set()
    assert await asyncio.wait_for(reader, 5) == b"bcde"
    assert await resp.next_chunk() == b""
    assert took == []


async def test_a_declined_piece_goes_to_next_chunk(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    s = await paced_body(serve, [b"abc", b"def"], None)
    resp = await client.send(provider(s.port), "/chat/completions", b"{}", [])
    assert await resp.next_chunk() == b"abc"
    offered: list[bytes] = []
    resp.relay_inline(lambda piece: offered.append(piece) is not None)  # always False
    assert await resp.next_chunk() == b"def"
    assert offered == [b"def"]
    assert await resp.next_chunk() == b""


async def test_pieces_taken_inline_restart_the_read_timeout(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    """Each piece within the read timeout, all of them together longer: no timeout,
    though the waiting reader never woke for one."""
    s = await paced_body(serve, [b"p%d" % i for i in range(7)], None)  # 0.6 s in all
    resp = await client.send(provider(s.port, read=0.3), "/chat/completions", b"{}", [])
    assert await resp.next_chunk() == b"p0"
    took: list[bytes] = []
    resp.relay_inline(lambda piece: took.append(piece) is None)  # always True
    assert await asyncio.wait_for(resp.next_chunk(), 5) == b""
    assert took == [b"p%d" % i for i in range(1, 7)]


async def test_a_piece_over_the_response_limit_is_left_to_next_chunk(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    up = Upstream(max_response_bytes=5)
    try:
        s = await paced_body(serve, [b"abc", b"def"], None)
        resp = await up.send(provider(s.port), "/chat/completions", b"{}", [])
        assert await resp.next_chunk() == b"abc"
        took: list[bytes] = []
        resp.relay_inline(lambda piece: took.append(piece) is None)
        with pytest.raises(UpstreamResponseTooLarge):
            await resp.next_chunk()
        assert took == []
    finally:
        await up.close()


async def test_the_response_limit_counts_pieces_taken_inline(
    serve: Callable[[Handler], Awaitable[Server]],
) -> None:
    up = Upstream(max_response_bytes=8)
    try:
        go = asyncio.Event()
        s = await paced_body(serve, [b"abc", b"def", b"ghi"], go)
        resp = await up.send(provider(s.port), "/chat/completions", b"{}", [])
        assert await resp.next_chunk() == b"abc"
        taken = Taken()
        took, arrived = taken.pieces, taken.arrived
        resp.relay_inline(taken.sink)
        reader = asyncio.ensure_future(resp.next_chunk())
        go.set()
        await asyncio.wait_for(arrived.wait(), 5)  # 6 of 8 bytes now
        go.set()  # 3 more: over the limit, so the reader has them and says so
        with pytest.raises(UpstreamResponseTooLarge):
            await asyncio.wait_for(reader, 5)
        assert took == [b"def"]
    finally:
        await up.close()


async def test_a_fault_in_the_sink_is_the_gateways_not_the_upstreams(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    go = asyncio.Event()
    s = await paced_body(serve, [b"abc", b"def"], go)
    resp = await client.send(provider(s.port), "/chat/completions", b"{}", [])
    conn = resp._conn  # type: ignore[attr-defined]
    assert await resp.next_chunk() == b"abc"

    def sink(piece: bytes) -> bool:
        raise KeyError("a bug")

    resp.relay_inline(sink)
    reader = asyncio.ensure_future(resp.next_chunk())
    await asyncio.sleep(0)  # the reader waits
    go.set()
    with pytest.raises(RelayFault) as raised:
        await asyncio.wait_for(reader, 5)
    assert isinstance(raised.value.__cause__, KeyError)
    assert conn.state.name == "CLOSED"  # mid-body: never pooled
    assert not client.pool._idle.get(resp._origin)  # type: ignore[attr-defined]


async def test_a_pooled_connection_keeps_no_sink(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    s = await paced_body(serve, [b"abc", b"def"], None)
    resp = await client.send(provider(s.port), "/chat/completions", b"{}", [])
    conn = resp._conn  # type: ignore[attr-defined]
    resp.relay_inline(lambda piece: piece is None)  # declines: next_chunk reads all
    assert await resp.read() == b"abcdef"
    resp.close()
    assert conn.sink is None
    assert client.pool._idle  # type: ignore[attr-defined]  # pooled, to serve the next


async def test_gzip_answer_is_decoded(
    serve: Callable[[Handler], Awaitable[Server]], client: Upstream
) -> None:
    packed = gzip.compress(b'{"model":"m"}')

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(packed)
        )
        w.write(packed)
        await w.drain()
        await r.read()

    s = await serve(handler)
    resp = await client.send(provider(s.port), "/chat/completions", b"{}", [])
    assert all(name != b"content-encoding" for name, _ in resp.headers)
    assert await resp.read() == b'{"model":"m"}'


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


async def test_tls_verified_against_a_trusted_test_certificate(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret")
        await w.drain()
        await r.read()

    s = Server(handler)
    await s.start(server_ctx)
    try:
        trusting = Upstream()
        trusting.pool._ssl = ssl.create_default_context(cafile=str(cert))
        assert await send(trusting, provider(s.port, "https")) == (200, b"secret")
        await trusting.close()
        # The default context does not know the test CA: verification refuses it.
        default = Upstream()
        with pytest.raises(UpstreamUnavailable):
            await send(default, provider(s.port, "https"))
        await default.close()
    finally:
        await s.stop()
