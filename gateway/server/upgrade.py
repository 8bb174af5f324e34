"""Upgrade requests (SPEC §7): only WebSocket's is honoured.

A WebSocket handshake goes to server.websocket_cycle (ServerProtocol hands it the
transport). Any other upgrade request (`h2c`) is served as plain HTTP with its body: llhttp stops after such a head,
so a fresh parser reads the body behind a synthetic head that carries only the framing
(`resume_head`), its callbacks going to BodyOnly.
"""

from __future__ import annotations

from typing import Protocol

from gateway.types import Headers


def is_websocket(headers: Headers) -> bool:
    return any(name == b"upgrade" and b"websocket" in value.lower() for name, value in headers)


def resume_head(headers: Headers) -> bytes | None:
    """A head that carries only the request's body framing; None without a body."""
    framing = b"".join(
        name + b": " + value + b"\r\n"
        for name, value in headers
        if name == b"content-length" or name == b"transfer-encoding"
    )
    return b"POST / HTTP/1.1\r\n" + framing + b"\r\n" if framing else None


class BodyReader(Protocol):
    def on_body(self, body: bytes) -> None: ...

    def on_message_complete(self) -> None: ...

    def hold_reading(self) -> None: ...


class BodyOnly:
    """Parser callbacks for an upgrade request's body behind its synthetic head: the
    body and its end go to the protocol; after it the connection reads nothing more."""

    def __init__(self, protocol: BodyReader) -> None:
        self.protocol = protocol

    def on_body(self, body: bytes) -> None:
        self.protocol.on_body(body)

    def on_message_complete(self) -> None:
        self.protocol.on_message_complete()
        self.protocol.hold_reading()  # an upgrade request is the connection's last
