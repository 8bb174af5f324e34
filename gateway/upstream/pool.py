"""Keep-alive connections per upstream origin, bounded, reused only when clean.

At most `Origin.limit` connections are open to an origin at once (a provider's
`max_connections`); a request that finds them all busy waits for one at most its
connect timeout, then fails like a connect timeout (the next candidate may serve)."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

from gateway.upstream.connection import CLOSED, H1Connection

IDLE_SECONDS = 30.0  # an idle connection older than this is closed, not reused
MAX_PER_ORIGIN = 1024  # connections open at once to one origin; more wait for a free one


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    limit: int = MAX_PER_ORIGIN  # connections open at once (the provider's max_connections)

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


class Pool:
    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._idle: dict[Origin, list[H1Connection]] = {}
        self._slots: dict[Origin, asyncio.Semaphore] = {}

    def tls_context(self) -> ssl.SSLContext:
        """The one verifying context (also for upstream WebSockets)."""
        return self._context()

    def _context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # Verification on: the default context checks the chain and the host name.
            self._ssl = ssl.create_default_context()
        return self._ssl

    async def acquire(self, origin: Origin, connect_timeout: float) -> tuple[H1Connection, bool]:
        """A connection to `origin` and whether it was reused from the pool."""
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = asyncio.Semaphore(origin.limit)
        if slots.locked():
            # Every connection is busy: wait for one, but no longer than a connect may
            # take. (Only then: a timeout context per request costs on the hot path.)
            async with asyncio.timeout(connect_timeout):
                await slots.acquire()
        else:
            await slots.acquire()
        try:
            idle = self._idle.get(origin)
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if conn.state is not CLOSED and now - conn.idle_since < IDLE_SECONDS:
                    return conn, True
                conn.close()
            return await self.connect(origin, connect_timeout), False
        except BaseException:
            slots.release()
            raise

    async def connect(self, origin: Origin, connect_timeout: float) -> H1Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(connect_timeout):
            if origin.tls:
                _, conn = await loop.create_connection(
                    H1Connection,
                    origin.host,
                    origin.port,
                    ssl=self._context(),
                    server_hostname=origin.host,
                )
            else:
                _, conn = await loop.create_connection(H1Connection, origin.host, origin.port)
        return conn

    def release(self, origin: Origin, conn: H1Connection) -> None:
        """Give a connection back: pooled when its response was read to a clean end."""
        if conn.recycle():
            conn.idle_since = time.monotonic()
            self._idle.setdefault(origin, []).append(conn)
        else:
            conn.abort()
        self._slots[origin].release()

    def drop(self, origin: Origin) -> None:
        """Free the slot of a connection that was aborted without a response (or of one
        taken with take_slot)."""
        self._slots[origin].release()

    async def take_slot(self, origin: Origin, wait: float) -> None:
        """One of `origin`'s slots for a connection the pool does not keep (an upstream
        WebSocket, which holds it while open), given back with drop(). TimeoutError when
        none frees up within `wait` seconds, as acquire."""
        slots = self._slots.get(origin)
        if slots is None:
            slots = self._slots[origin] = asyncio.Semaphore(origin.limit)
        async with asyncio.timeout(wait):
            await slots.acquire()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()
