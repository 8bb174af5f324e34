"""What a client connection is held to, who gives way at the connection cap, and which
request framings are refused before any route sees them.

Pure policy: ServerProtocol applies it. Kept apart so the protocol module
reads as parsing and answering requests, not as the rules around them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway.errors import (
    BadRequest,
    NotFound,
    NotImplementedByGateway,
    Overloaded,
    VersionNotSupported,
)
from gateway.server.cycle import closing
from gateway.types import Headers

# At the connection cap, a connection still sending its head after this long may be
# closed to make room (a whole head arrives in one packet from a well-behaved client).
SLOW_HEAD_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_header_bytes: int = 65536  # request line plus header fields
    max_header_fields: int = 256
    header_timeout: float = 10.0  # from the head's first byte to its end
    body_timeout: float = 30.0  # longest pause between request body bytes
    max_connections: int = 10_000
    max_message_bytes: int = 8 * 1024 * 1024  # a WebSocket message or frame (1009 past it)


DEFAULT_LIMITS = ServerLimits()


def limits_of(app: Any) -> ServerLimits:
    """The app's `server_limits` (the gateway's come from its settings), looked for
    through the middleware uvicorn may wrap it in; else the defaults."""
    for _ in range(8):
        limits = getattr(app, "server_limits", None)
        if isinstance(limits, ServerLimits):
            return limits
        app = getattr(app, "app", None)
        if app is None:
            break
    return DEFAULT_LIMITS


def overloaded() -> bytes:
    """The 503 a connection gets when it cannot be served for the cap."""
    error = Overloaded("the gateway is at its connection limit; retry shortly")
    return closing(b"503 Service Unavailable", error, b"retry-after: 1\r\n")


class Connection(Protocol):
    """What the policy reads of a connection (ServerProtocol's fields)."""

    cycle: object | None  # a request being answered
    head_since: float  # > 0 while a head is arriving (or stray CRLFs began one)
    idle_since: float  # > 0 while no request has begun since the last answer


C = TypeVar("C", bound=Connection)


def give_way(connections: Iterable[C], newcomer: C, now: float) -> tuple[C | None, bool]:
    """(the connection to close, whether it is idle). The longest-idle keep-alive one
    first, counting one that has sent only CRLFs since (they begin no request, SPEC
    §13); else the one longest stalled in a head for over SLOW_HEAD_SECONDS (it holds
    no request); (None, False) when none may go."""
    idle: C | None = None
    slow: C | None = None
    for other in connections:
        if other is newcomer or other.cycle is not None:
            continue
        if other.idle_since:
            if idle is None or other.idle_since < idle.idle_since:
                idle = other
        elif (
            other.head_since
            and now - other.head_since > SLOW_HEAD_SECONDS
            and (slow is None or other.head_since < slow.head_since)
        ):
            slow = other
    return (idle, True) if idle is not None else (slow, False)


def framing_refusal(version: str, headers: Headers) -> bytes | None:
    """The answer to a head whose framing nginx refuses too (SPEC §13), in nginx's
    order; None when it may be served. `headers` have lower-case names."""
    if version[:2] != "1.":
        unsupported = VersionNotSupported(f"HTTP/{version} is not supported here; use HTTP/1.1")
        return closing(b"505 HTTP Version Not Supported", unsupported)
    hosts = sum(1 for name, _ in headers if name == b"host")
    if hosts > 1:
        return _bad("a request carries one Host header field, not several")
    if not hosts and version != "1.0":
        return _bad("an HTTP/1.1 request needs a Host header field")
    codings = [value for name, value in headers if name == b"transfer-encoding"]
    if codings:
        if version == "1.0":
            return _bad("Transfer-Encoding is not allowed in an HTTP/1.0 request")
        if len(codings) > 1:
            return _bad("a request carries one Transfer-Encoding header field, not several")
        if codings[0].strip().lower() != b"chunked":
            error = NotImplementedByGateway("the only request Transfer-Encoding served is chunked")
            return closing(b"501 Not Implemented", error)
    return None


def encoded_slash() -> bytes:
    """The answer to a path holding `%2F`: it is never decoded into a separator (a
    client's `a%2Fb` would otherwise reach a route as two segments), so it matches no
    route."""
    return closing(b"404 Not Found", NotFound("an encoded slash (%2F) in a path matches no route"))


def _bad(message: str) -> bytes:
    return closing(b"400 Bad Request", BadRequest(message))
