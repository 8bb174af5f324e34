"""The upstream hop: request building, header filtering, the pooled HTTP/1.1 client.

This is the one place where transport errors become GatewayErrors.
"""

from __future__ import annotations

import asyncio
import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlencode, urlsplit

from gateway.errors import GatewayError, UpstreamDisconnected, UpstreamTimeout, UpstreamUnavailable
from gateway.routes import Provider
from gateway.upstream.connection import ConnectionLost, H1Connection
from gateway.upstream.echo import EchoResponse
from gateway.upstream.pool import Origin, Pool

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never sent upstream: the client's credentials and what the hop itself sets.
_REQUEST_DROP = HOP_BY_HOP | {
    b"authorization",
    b"cookie",
    b"host",
    b"content-length",
    b"accept-encoding",
}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"content-encoding", b"set-cookie"}


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

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Target:
    """What a provider's requests share, prepared once."""

    origin: Origin
    request_line_prefix: bytes  # b"POST /v1"
    query: bytes  # b"?api-version=..." or b""
    fixed: bytes  # host, credentials, provider headers: ready-made header lines
    own: frozenset[bytes]  # header names the provider sets itself


def prepare(provider: Provider) -> Target:
    url = urlsplit(provider.base_url)
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 80)
    host = url.hostname or ""
    default_port = port == (443 if tls else 80)
    host_header = host if default_port else f"{host}:{port}"
    if ":" in host and not default_port:
        host_header = f"[{host}]:{port}"
    lines = [f"host: {host_header}"]
    own = {name.lower() for name in provider.headers}
    if provider.api_key is not None and provider.api_key.reveal() and "authorization" not in own:
        lines.append("authorization: Bearer " + provider.api_key.reveal())
    lines += [f"{name}: {value}" for name, value in provider.headers.items()]
    # Identity keeps the bytes the gateway splices plain.
    lines.append("accept-encoding: identity")
    query = urlencode(list(provider.query.items()))
    return Target(
        origin=Origin(url.scheme, host, port),
        request_line_prefix=b"POST " + (url.path or "").encode(),
        query=b"?" + query.encode() if query else b"",
        fixed="".join(line + "\r\n" for line in lines).encode("latin-1"),
        own=frozenset(name.encode("latin-1") for name in own) | {b"host"},
    )


def request_head(
    target: Target, path: str, client: Iterable[tuple[bytes, bytes]], length: int
) -> bytes:
    parts = [target.request_line_prefix, path.encode(), target.query, b" HTTP/1.1\r\n"]
    named: set[bytes] = set()
    kept: Headers = []
    content_type = False
    for name, value in client:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
        if name in _REQUEST_DROP or name in target.own:
            continue
        if name == b"content-type":
            content_type = True
        kept.append((name, value))
    for name, value in kept:
        if name not in named:
            parts += (name, b": ", value, b"\r\n")
    if not content_type:
        parts.append(b"content-type: application/json\r\n")
    parts += (target.fixed, b"content-length: ", str(length).encode(), b"\r\n\r\n")
    return b"".join(parts)


def response_headers(raw: Iterable[tuple[bytes, bytes]], decoded: bool = True) -> Headers:
    """Headers for the client, from names already lowercase (h1.py). `decoded`: the body
    is relayed decompressed, so its content-encoding is dropped (an encoding the gateway
    cannot undo is kept)."""
    out: Headers = []
    for name, value in raw:
        if name in _RESPONSE_DROP and (decoded or name != b"content-encoding"):
            continue
        if name == b"x-request-id":
            out.append((b"x-upstream-request-id", value))
        else:
            out.append((name, value))
    return out


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


def _decoder(raw: Iterable[tuple[bytes, bytes]]) -> tuple[bool, zlib._Decompress | None]:
    """(can relay decoded, decompressor) for the response's content-encoding (names
    already lowercase)."""
    for name, value in raw:
        if name == b"content-encoding":
            coding = value.strip().lower()
            if coding in (b"gzip", b"x-gzip"):
                return True, zlib.decompressobj(16 + zlib.MAX_WBITS)
            if coding == b"deflate":
                return True, zlib.decompressobj()
            return coding in (b"identity", b""), None
    return True, None


class H1Response:
    __slots__ = (
        "_conn",
        "_deadline",
        "_decoder",
        "_origin",
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
    ) -> None:
        self._pool = pool
        self._origin = origin
        self._conn: H1Connection | None = conn
        self._read = read
        self._deadline = deadline
        self._total_deadline = total_deadline
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
                if conn.chunks:
                    chunk = conn.take()
                    if self._decoder is not None:
                        chunk = self._decoder.decompress(chunk)
                        if not chunk:
                            continue
                    return chunk
                if conn.done:
                    self.close()
                    if self._decoder is not None:
                        tail, self._decoder = self._decoder.flush(), None
                        if tail:
                            return tail
                    return b""
                if conn.error is not None:
                    raise conn.error
                loop = asyncio.get_running_loop()
                await conn.wait(min(self._read, self._deadline - loop.time()))
        except (ConnectionLost, TimeoutError, OSError, zlib.error) as exc:
            self.close()
            raise translate(exc, started=True) from None

    def relax(self) -> None:
        self._deadline = self._total_deadline

    def ready(self) -> bool:
        conn = self._conn
        return conn is None or bool(conn.chunks) or conn.done or conn.error is not None

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
            self._pool.release(self._origin, conn)


class Upstream:
    """The per-worker client: one pool, targets prepared once per provider object."""

    def __init__(self) -> None:
        self.pool = Pool()
        self._targets: dict[int, tuple[Provider, Target]] = {}

    async def close(self) -> None:
        self.pool.close()
        # Closed transports finish closing on the loop's next turn.
        await asyncio.sleep(0)

    def _target(self, provider: Provider) -> Target:
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
    ) -> UpstreamResponse:
        """Send the request; return once the response head is in. `deadline` (loop time)
        bounds the whole exchange, body included, on top of the provider's timeouts."""
        if provider.builtin is not None:
            return EchoResponse.answer(path, body)
        target = self._target(provider)
        t = provider.timeout
        loop = asyncio.get_running_loop()
        total = math.inf if t.total is None else loop.time() + t.total
        deadline = min(deadline, total)
        data = request_head(target, path, client_headers, len(body)) + body
        origin = target.origin
        pool = self.pool
        try:
            conn, reused = await pool.acquire(origin, min(t.connect, deadline - loop.time()))
        except (TimeoutError, OSError) as exc:
            raise translate(exc, started=False) from None
        while True:
            try:
                conn.send(data)
                first = t.first_byte if t.first_byte is not None else t.read
                head_by = loop.time() + min(first, deadline - loop.time())
                while not conn.head_done:
                    if conn.error is not None:
                        raise conn.error
                    await conn.wait(head_by - loop.time())
                return H1Response(pool, origin, conn, t.read, deadline, total)
            except ConnectionLost as exc:
                conn.abort()
                if reused and exc.before_response:
                    # The upstream closed an idle keep-alive connection under us: the
                    # request never reached it, so one retry on a fresh one is safe.
                    reused = False
                    try:
                        conn = await pool.connect(origin, min(t.connect, deadline - loop.time()))
                    except (TimeoutError, OSError) as again:
                        pool.swap(origin)
                        raise translate(again, started=False) from None
                    continue
                pool.swap(origin)
                raise translate(exc, started=False) from None
            except (TimeoutError, OSError) as exc:
                conn.abort()
                pool.swap(origin)
                raise translate(exc, started=False) from None
            except BaseException:
                conn.abort()
                pool.swap(origin)
                raise
