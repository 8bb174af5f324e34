"""What a client connection is held to, and who gives way at the connection cap.

Pure policy: gateway/server/protocol.py applies it. Kept apart so the protocol module
reads as parsing and answering requests, not as the rules around them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from gateway.errors import Overloaded
from gateway.server.cycle import closing

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
    head_since: float  # > 0 while a head is arriving
    idle_since: float  # > 0 while idle between requests


C = TypeVar("C", bound=Connection)


def give_way(connections: Iterable[C], newcomer: C, now: float) -> tuple[C | None, bool]:
    """(the connection to close, whether it is idle). The longest-idle keep-alive one
    first; else the one longest stalled in a head for over SLOW_HEAD_SECONDS (it holds
    no request); (None, False) when none may go."""
    idle: C | None = None
    slow: C | None = None
    for other in connections:
        if other is newcomer or other.cycle is not None:
            continue
        if not other.head_since:
            if other.idle_since and (idle is None or other.idle_since < idle.idle_since):
                idle = other
        elif now - other.head_since > SLOW_HEAD_SECONDS and (
            slow is None or other.head_since < slow.head_since
        ):
            slow = other
    return (idle, True) if idle is not None else (slow, False)
