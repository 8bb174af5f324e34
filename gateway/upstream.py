"""The upstream hop: one long-lived aiohttp session, header filtering, error translation.

This is the one place where transport errors become GatewayErrors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Protocol

import aiohttp

from gateway.echo import EchoResponse
from gateway.errors import GatewayError, UpstreamDisconnected, UpstreamTimeout, UpstreamUnavailable
from gateway.routes import Provider

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# Never sent upstream: the client's credentials and what the hop itself sets.
_REQUEST_DROP = HOP_BY_HOP | {
    "authorization",
    "cookie",
    "host",
    "content-length",
    "accept-encoding",
}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "content-encoding", "set-cookie"}


class UpstreamResponse(Protocol):
    status: int
    headers: Headers  # already filtered for the client
    is_sse: bool

    async def read(self) -> bytes: ...

    async def next_chunk(self) -> bytes:
        """The next bytes of the body as they arrive; b"" at the end."""
        ...

    def close(self) -> None: ...


def request_headers(
    provider: Provider, client: Iterable[tuple[bytes, bytes]]
) -> list[tuple[str, str]]:
    named_by_connection: set[str] = set()
    pairs: list[tuple[str, str]] = []
    own = {name.lower() for name in provider.headers}
    for raw_name, raw_value in client:
        name = raw_name.decode("latin-1").lower()
        if name == "connection":
            named_by_connection.update(
                t.strip().lower() for t in raw_value.decode("latin-1").split(",")
            )
        if name in _REQUEST_DROP or name in own:
            continue
        pairs.append((name, raw_value.decode("latin-1")))
    if named_by_connection:
        pairs = [(n, v) for n, v in pairs if n not in named_by_connection]
    if provider.api_key is not None and provider.api_key.reveal() and "authorization" not in own:
        pairs.append(("authorization", "Bearer " + provider.api_key.reveal()))
    pairs.extend(provider.headers.items())
    # Identity keeps the bytes we splice plain; the client gets them uncompressed anyway.
    pairs.append(("accept-encoding", "identity"))
    if not any(n == "content-type" for n, _ in pairs):
        pairs.append(("content-type", "application/json"))
    return pairs


def response_headers(raw: Iterable[tuple[bytes, bytes]]) -> Headers:
    out: Headers = []
    for name, value in raw:
        lower = name.lower()
        if lower.decode("latin-1") in _RESPONSE_DROP:
            continue
        if lower == b"x-request-id":
            out.append((b"x-upstream-request-id", value))
        else:
            out.append((lower, value))
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
            "the upstream connection was lost mid-response", {"cause": type(exc).__name__}
        )
    return UpstreamUnavailable("the upstream could not be reached", {"cause": type(exc).__name__})


class AiohttpResponse:
    __slots__ = ("_resp", "headers", "is_sse", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = response_headers(resp.raw_headers)
        self.is_sse = resp.content_type == "text/event-stream"

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise translate(exc, started=True) from None

    async def next_chunk(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise translate(exc, started=True) from None

    def close(self) -> None:
        self._resp.close()


class Upstream:
    """Owns the client session; a fresh one per worker process, made inside its loop."""

    def __init__(self, connections: int = 1000) -> None:
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._connections, ttl_dns_cache=300, keepalive_timeout=30
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # A cookie jar would carry one tenant's cookies into another's request.
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent",),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, provider: Provider, path: str, body: bytes, client_headers: Headers
    ) -> UpstreamResponse:
        if provider.builtin is not None:
            return EchoResponse.answer(path, body)
        assert self._session is not None, "Upstream.start() was not awaited"
        t = provider.timeout
        timeout = aiohttp.ClientTimeout(
            total=t.total, sock_connect=t.connect, connect=t.connect, sock_read=t.read
        )
        try:
            request = self._session.request(
                "POST",
                provider.base_url + path,
                data=body,
                headers=request_headers(provider, client_headers),
                params=dict(provider.query) or None,
                timeout=timeout,
                allow_redirects=False,
            )
            if t.first_byte is not None:
                async with asyncio.timeout(t.first_byte):
                    resp = await request
            else:
                resp = await request
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise translate(exc, started=False) from None
        return AiohttpResponse(resp)
