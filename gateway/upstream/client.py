"""The upstream hop: send a request on a pooled connection, read its answer.

This is the one place where transport errors become GatewayErrors: `translate` maps
them, and each I/O step catches exactly TRANSPORT_ERRORS and hands them to it.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Callable, Iterable
from typing import Protocol

from gateway.config.routes import Provider
from gateway.errors import (
    GatewayError,
    UpstreamDisconnected,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.types import Headers
from gateway.upstream.connection import ConnectionLost, H1Connection
from gateway.upstream.credentials import Credentials
from gateway.upstream.echo import EchoResponse
from gateway.upstream.head import Target, join_query, prepare, request_head, response_headers
from gateway.upstream.pool import Origin, Pool
from gateway.wire.sse import DEFAULT_MAX_EVENT

DEFAULT_MAX_RESPONSE = 64 * 1024 * 1024  # decoded body bytes of one upstream answer
DECODE_STEP = 256 * 1024  # at most this many decoded bytes per decompress call
JOIN_BELOW = 64 * 1024  # request bodies below this leave with their head in one write
# What the transport can raise; everything else is a bug and propagates as such.
TRANSPORT_ERRORS = (ConnectionLost, TimeoutError, OSError, zlib.error)


class UpstreamResponse(Protocol):
    status: int
    headers: Headers  # already filtered for the client
    is_sse: bool

    async def read(self) -> bytes: ...

    async def next_chunk(self) -> bytes:
        """The next bytes of the body as they arrive; b"" at the end."""
        ...

    def ready(self) -> bool:
        """next_chunk() would not wait: bytes, the end or an error are already here."""
        ...

    def relax(self) -> None:
        """The answer has started: from here only the provider's own timeouts bound it,
        not the request's attempts deadline."""
        ...

    def relay_inline(self, sink: Callable[[bytes], bool] | None) -> None:
        """While next_chunk() waits with nothing buffered, hand each arriving piece of
        the body to `sink` as it arrives, without waking the reader; `sink` returns
        False to leave the piece to next_chunk() instead. None stops it. Answers that
        do not arrive from a socket of their own ignore it."""
        ...

    def close(self) -> None: ...


def translate(exc: BaseException, started: bool) -> GatewayError:
    """Turn a transport exception into the error the client (or the error event) sees."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(
            "the upstream did not answer in time",
            {"cause": "read timeout" if started else "connect or first-byte timeout"},
        )
    if started:
        return UpstreamDisconnected(
            "the upstream connection was lost mid-response", {"cause": str(exc)}
        )
    cause = str(exc) if isinstance(exc, ConnectionLost) else type(exc).__name__
    return UpstreamUnavailable("the upstream could not be reached", {"cause": cause})


def _is_sse(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
    return False


class Decoder:
    """A body's content-encoding undone whole or not at all (SPEC §13): gzip member by
    member (a decompressobj stops at the end of the first and leaves the rest unused),
    and an error for anything that does not decode to its very end: a truncated member,
    bytes after a deflate stream, a bad member. Names the body's encoding, not zlib's
    message (that is a library's text, never a client's)."""

    __slots__ = ("_gzip", "_open", "_zlib")

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS if gzip else zlib.MAX_WBITS)
        self._open = False  # a member has started and not ended

    def decode(self, data: bytes, limit: int) -> tuple[bytes, bytes]:
        """(at most `limit` decoded bytes, the input still to decode)."""
        z = self._zlib
        if z.eof:
            if not self._gzip:
                raise _undecodable("bytes after the end of the deflate stream")
            z = self._zlib = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the next member
        self._open = True
        try:
            out = z.decompress(data, limit)
        except zlib.error:
            raise _undecodable("the compressed body is corrupt") from None
        if z.eof:
            self._open = False
            return out, z.unused_data
        return out, z.unconsumed_tail

    def finish(self) -> bytes:
        """At the body's end: what zlib still holds; an error if a member is unfinished."""
        if not self._open:
            return b""
        z = self._zlib
        try:
            tail = z.flush()
        except zlib.error:
            raise _undecodable("the compressed body is corrupt") from None
        if not z.eof:
            raise _undecodable("the compressed body is truncated")
        if z.unused_data:
            # Only input decode() held back can be here, and it always hands that on.
            raise _undecodable("bytes after the end of the compressed body")
        self._open = False
        return tail


def _undecodable(why: str) -> ConnectionLost:
    return ConnectionLost(f"the upstream body could not be decoded: {why}", before_response=False)


def _decoder(raw: Iterable[tuple[bytes, bytes]]) -> tuple[bool, Decoder | None]:
    """(can relay decoded, decoder) for the response's content-encoding (names already
    lowercase)."""
    for name, value in raw:
        if name == b"content-encoding":
            coding = value.strip().lower()
            if coding in (b"gzip", b"x-gzip"):
                return True, Decoder(gzip=True)
            if coding == b"deflate":
                return True, Decoder(gzip=False)
            return coding in (b"identity", b""), None
    return True, None


class H1Response:
    __slots__ = (
        "_conn",
        "_deadline",
        "_decoder",
        "_left",
        "_limit",
        "_origin",
        "_pending",
        "_pool",
        "_read",
        "_total_deadline",
        "headers",
        "is_sse",
        "status",
    )

    def __init__(
        self,
        pool: Pool,
        origin: Origin,
        conn: H1Connection,
        read: float,
        deadline: float,
        total_deadline: float = math.inf,
        limit: int = DEFAULT_MAX_RESPONSE,
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: H1Connection | None = conn
        self._read = read
        self._deadline = deadline
        self._total_deadline = total_deadline
        self._limit = limit
        self._left = limit  # decoded body bytes still allowed
        self._pending = b""  # compressed bytes not yet decoded (a decode step's tail)
        self.status = conn.status
        decoded, self._decoder = _decoder(conn.headers)
        self.headers = response_headers(conn.headers, decoded)
        self.is_sse = _is_sse(self.headers)

    async def next_chunk(self) -> bytes:
        conn = self._conn
        if conn is None:
            return b""
        try:
            while True:
                if conn.chunks and self._decoder is None:
                    chunk = conn.take()
                    self._left -= len(chunk)
                    if self._left < 0:
                        raise self._too_large()
                    return chunk
                if self._decoder is not None and (self._pending or conn.chunks):
                    # Decoded in bounded steps: a small compressed body can expand a
                    # thousandfold, and no step may hold more than DECODE_STEP of it.
                    # The limit counts every member's output together.
                    data = self._pending or conn.take()
                    chunk, self._pending = self._decoder.decode(data, DECODE_STEP)
                    if not chunk:
                        continue
                    self._left -= len(chunk)
                    if self._left < 0:
                        raise self._too_large()
                    return chunk
                if conn.ended:
                    if self._decoder is not None:
                        tail = self._decoder.finish()
                        self._decoder = None
                        self.close()
                        self._left -= len(tail)
                        if self._left < 0:
                            raise self._too_large()
                        return tail
                    self.close()
                    return b""
                if conn.error is not None:
                    raise conn.error
                if conn.fault is not None:
                    self.close()  # mid-body: not reused
                    raise conn.fault  # the gateway's own (RelayFault: not a transport error)
                loop = conn.loop or asyncio.get_running_loop()
                await conn.wait(min(self._read, self._deadline - loop.time()))
        except TRANSPORT_ERRORS as exc:
            self.close()
            raise translate(exc, started=True) from None

    def _too_large(self) -> UpstreamResponseTooLarge:
        self.close()
        return UpstreamResponseTooLarge(
            f"the upstream answer is over the limit of {self._limit} bytes",
            {"limit": self._limit},
        )

    def relax(self) -> None:
        self._deadline = self._total_deadline

    def relay_inline(self, sink: Callable[[bytes], bool] | None) -> None:
        conn = self._conn
        if conn is None:
            return
        if sink is None or self._decoder is not None:
            conn.sink = None  # a compressed body is decoded in bounded steps by next_chunk
            return

        def take(body: bytes) -> bool:
            left = self._left - len(body)
            if left < 0 or not sink(body):
                return False  # over the limit: next_chunk says so
            self._left = left
            loop = conn.loop
            if loop is not None:
                # Bytes arrived though the reader did not wake: its read timeout counts
                # from here, as a wait begun now would (next_chunk).
                conn.wait_due = min(loop.time() + self._read, self._deadline)
            return True

        conn.sink = take

    def ready(self) -> bool:
        conn = self._conn
        return (
            conn is None
            or bool(conn.chunks or self._pending)
            or conn.ended
            or conn.error is not None
        )

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def close(self) -> None:
        """Idempotent. An unfinished response closes its connection: the upstream sees
        the client leave at once, and no half-read body is ever reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.sink = None
            self._pool.release(self._origin, conn)


class Upstream:
    """The per-worker client: one pool, targets prepared once per provider object."""

    def __init__(
        self,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE,
        max_event_bytes: int = DEFAULT_MAX_EVENT,
    ) -> None:
        self.pool = Pool()
        # Limits on what one upstream may send: a decoded body, one SSE event.
        self.max_response_bytes = max_response_bytes
        self.max_event_bytes = max_event_bytes
        self._targets: dict[int, tuple[Provider, Target]] = {}
        self.credentials = Credentials(self)  # tokens of oauth2 and gcp providers

    async def close(self) -> None:
        await self.credentials.close()
        self.pool.close()
        # Closed transports finish closing on the loop's next turn.
        await asyncio.sleep(0)

    def target(self, provider: Provider) -> Target:
        """The provider's request head, prepared once per provider object."""
        entry = self._targets.get(id(provider))
        if entry is None or entry[0] is not provider:
            if len(self._targets) > 4096:  # old config snapshots' providers
                self._targets.clear()
            entry = self._targets[id(provider)] = (provider, prepare(provider))
        return entry[1]

    async def send(
        self,
        provider: Provider,
        path: str,
        body: bytes,
        client_headers: Headers,
        deadline: float = math.inf,
        method: bytes | None = None,
    ) -> UpstreamResponse:
        """Send the request; return once the final response head is in. `deadline` (loop
        time) bounds the whole exchange, body included, on top of the provider's
        timeouts."""
        if provider.builtin is not None:
            return EchoResponse.answer(path, body, method, client_headers)
        target = self.target(provider)
        t = provider.timeout
        loop = asyncio.get_running_loop()
        total = math.inf if t.total is None else loop.time() + t.total
        deadline = min(deadline, total)
        # A token (oauth2, gcp) or a signature (aws) per request; a plain key is in
        # target.fixed already.
        auth = provider.auth
        creds = b""
        if auth is not None and auth.per_request:
            if auth.aws is None:
                creds = await self.credentials.header(provider)
            else:
                url = provider.base_url + join_query(target, path)
                creds = await self.credentials.signature(provider, method or b"POST", url, body)
        head = request_head(target, path, client_headers, len(body), method, creds)
        # One write for the usual small request; a large body is not copied again to
        # join it to its head (the peak for one request stays near twice its body).
        data = head + body if len(body) < JOIN_BELOW else (head, body)
        origin = target.origin
        pool = self.pool
        try:
            conn, reused = await pool.acquire(origin, min(t.connect, deadline - loop.time()))
        except TRANSPORT_ERRORS as exc:
            raise translate(exc, started=False) from None
        # From here this call holds one of the origin's slots until the response closes.
        current: H1Connection | None = conn
        try:
            while True:
                try:
                    conn.send(data)
                    first = t.first_byte if t.first_byte is not None else t.read
                    head_by = loop.time() + min(first, deadline - loop.time())
                    while not conn.head_done:
                        if conn.error is not None:
                            raise conn.error
                        await conn.wait(head_by - loop.time())
                    return H1Response(
                        pool, origin, conn, t.read, deadline, total, self.max_response_bytes
                    )
                except ConnectionLost as exc:
                    if not (reused and exc.before_response):
                        raise
                # The upstream closed an idle keep-alive connection under us: the request
                # never reached it, so one retry on a fresh connection is safe.
                conn.abort()
                current, reused = None, False
                conn = current = await pool.connect(origin, min(t.connect, deadline - loop.time()))
        except BaseException as exc:
            if current is not None:
                current.abort()
            pool.drop(origin)
            if isinstance(exc, TRANSPORT_ERRORS):
                raise translate(exc, started=False) from None
            raise
