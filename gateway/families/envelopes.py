"""How each family's clients read an error: the body of an error answer, the in-band event
that ends a committed stream, and what an upstream's in-band error stands for.

Anthropic's error types and their statuses live in one table, read both ways.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from gateway.errors import GatewayError

# Anthropic's error type for each status it names; other statuses: api_error from 500 up,
# else invalid_request_error. Read back (an upstream's in-band error), a type stands for
# the last status listed with it, and only where that status fails over (429, 5xx): an
# in-band invalid_request_error stays the gateway's 502.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
ANTHROPIC_STATUS = {
    kind: status for status, kind in ANTHROPIC_TYPES.items() if status == 429 or status >= 500
}
INBAND_STATUS = 502  # an in-band error that names no status of its own


def anthropic_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    found = ANTHROPIC_TYPES.get(status)
    if found is not None:
        return found
    return "api_error" if status >= 500 else "invalid_request_error"


def openai_body(exc: GatewayError) -> bytes:
    """SPEC §4's envelope."""
    return exc.body()


def anthropic_body(exc: GatewayError) -> bytes:
    """Anthropic's envelope (SPEC §9): its clients match on its types."""
    error = {"type": anthropic_type(exc.status), "message": exc.message}
    return orjson.dumps({"type": "error", "error": error})


def data_event(exc: GatewayError) -> bytes:
    """Chat's (and every untyped stream's): one `data:` line in SPEC §4's shape."""
    error = {"error": {"message": exc.message, "type": exc.type, "code": exc.code}}
    return b"data: " + orjson.dumps(error) + b"\n\n"


def typed_event(exc: GatewayError) -> bytes:
    """The Responses stream's own `event: error`."""
    typed = {"type": "error", "code": exc.code, "message": exc.message, "param": None}
    return b"event: error\ndata: " + orjson.dumps(typed) + b"\n\n"


def anthropic_event(exc: GatewayError) -> bytes:
    """The Messages stream's `event: error`, in Anthropic's envelope."""
    return b"event: error\ndata: " + anthropic_body(exc) + b"\n\n"


def inband_status(payload: bytes) -> int:
    """The status an upstream's in-band error event stands for: a status `code` it
    carries, else its Anthropic type's (OpenAI-compatible upstreams in front of Claude
    send those too), else INBAND_STATUS."""
    try:
        error = orjson.loads(payload)["error"]
        code = error.get("code")
        if isinstance(code, int) and 400 <= code <= 599:
            return code
        kind = error.get("type")
        if kind in ANTHROPIC_STATUS:
            return ANTHROPIC_STATUS[kind]
    except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
        pass
    return INBAND_STATUS


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a family's clients read when something fails: the error answer's body, and
    the last event of a stream that broke after its commit."""

    name: str
    body: Callable[[GatewayError], bytes]
    event: Callable[[GatewayError], bytes]


OPENAI = Envelope("openai", openai_body, data_event)  # {"error": {"message", "type", ...}}
OPENAI_TYPED = Envelope("openai", openai_body, typed_event)  # typed streams: responses
ANTHROPIC = Envelope("anthropic", anthropic_body, anthropic_event)  # {"type": "error", ...}
