"""Sending whole responses over plain ASGI: JSON bodies and the error envelope."""

from __future__ import annotations

import time
from collections.abc import Sequence

from gateway.errors import GatewayError
from gateway.families import Family
from gateway.types import Send

JSON = b"application/json"


def server_timing(t0: float, upstream: float | None = None) -> tuple[bytes, bytes]:
    """W3C Server-Timing: time in the gateway so far, and the upstream's time to first byte."""
    value = f"gateway;dur={(time.perf_counter() - t0) * 1000:.2f}"
    if upstream is not None:
        value += f", upstream;dur={upstream * 1000:.2f}"
    return (b"server-timing", value.encode())


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    content_type: bytes | None = JSON,
) -> None:
    head = [*headers, (b"content-length", str(len(body)).encode())]
    if content_type is not None:
        head.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def send_error(
    send: Send,
    exc: GatewayError,
    request_id: bytes,
    extra: Sequence[tuple[bytes, bytes]] = (),
    family: Family | None = None,
) -> None:
    """The error answer, in the envelope `family`'s clients read (None: SPEC §4's, the
    gateway's own paths)."""
    headers = [(b"x-request-id", request_id), *extra]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()]
    body = exc.body() if family is None else family.error_body(exc)
    await send_bytes(send, exc.status, body, headers)
