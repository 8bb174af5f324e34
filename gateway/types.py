"""The ASGI vocabulary and header lists, one home for every layer (a leaf: it imports no
gateway code)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

Headers = list[tuple[bytes, bytes]]  # lower-cased names, raw values, in order
Message = dict[str, Any]
Scope = MutableMapping[str, Any]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

# The scope extension through which the gateway's own server lets the relay write a
# stream's next bytes without a `send` (server.cycle.Cycle): scope["extensions"][WRITER].
WRITER = "gateway.writer"


class Writer(Protocol):
    def writable(self) -> bool:
        """write_now would take bytes: the response streams, open, its client reading."""
        ...

    def write_now(self, body: bytes) -> None:
        """More of the response body, written at once; only when writable()."""
        ...
