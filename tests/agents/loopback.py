"""Servers on 127.0.0.1 that run on an event loop of their own, in a thread, so a test can
run an agent with a blocking subprocess call while they answer: a counting TCP forwarder
(in front of the gateway: how many WebSocket handshakes reach it) and a proxy sink (where
the agents' HTTP(S)_PROXY points: any attempt to reach past this machine is recorded and
refused there, never sent)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable

MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 30.0  # a connection that sends no whole request head by then is dropped
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LoopThread:
    """An event loop in a daemon thread; each server started on it is closed by stop()."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()

    def serve(self, handler: Handler) -> int:
        """Start a server for `handler` on 127.0.0.1, port 0; its port."""

        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.add(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            finally:
                self._writers.discard(writer)
                writer.close()

        async def start() -> asyncio.Server:
            return await asyncio.start_server(tracked, "127.0.0.1", 0, limit=MAX_HEAD)

        server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    def stop(self) -> None:
        async def close() -> None:
            for server in self._servers:
                server.close()
            for writer in list(self._writers):
                writer.close()
            for server in self._servers:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 5)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """A request head, bounded in size (MAX_HEAD, the stream's limit) and time."""
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)


class CountingForwarder:
    """Forwards every connection to 127.0.0.1:`target` and counts those whose first
    request asks for a WebSocket upgrade (Codex's handshakes on /v1/responses)."""

    def __init__(self, loop: LoopThread, target: int) -> None:
        self.target = target
        self.connections = 0
        self.handshakes: list[bytes] = []  # each handshake's request line
        self.port = loop.serve(self._forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        self.connections += 1
        if any(line.lower().replace(b" ", b"") == b"upgrade:websocket"
               for line in head.split(b"\r\n")):  # fmt: skip
            self.handshakes.append(head.split(b"\r\n", 1)[0])
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        try:
            up_writer.write(head)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        writer.close()


class ProxySink:
    """An HTTP proxy that forwards nothing: it records the first line of each request
    (`CONNECT host:443 ...`) and answers 403."""

    def __init__(self, loop: LoopThread) -> None:
        self.attempts: list[str] = []
        self.port = loop.serve(self._refuse)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        self.attempts.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
        writer.write(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
