"""What every echo family shares: the call as a handler sees it, its answer, errors, and
reading text and usage out of a request."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from gateway.types import Headers

_ids = itertools.count(1)

Json = dict[str, Any]


class Answer(NamedTuple):
    """A handler's whole answer; EchoResponse serves it the way a real upstream would."""

    status: int
    body: bytes = b""
    events: list[bytes] | None = None  # SSE events, one per read
    content_type: bytes = b"application/json"


class _Reject(Exception):
    """Ends a handler with an error answer, in the envelope of the path's family."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class _Call:
    body: bytes
    headers: Headers
    ident: str  # the {id} segment of /responses/{id}/...; "" on fixed paths
    query: dict[str, list[str]]

    def json(self) -> Json:
        try:
            req = orjson.loads(self.body)
        except orjson.JSONDecodeError:
            req = None
        if not isinstance(req, dict):
            raise _Reject(400, "body must be a JSON object")
        return req

    def header(self, name: bytes) -> bytes:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return b""


# --- shared helpers -----------------------------------------------------------------


def _json_answer(obj: Any, status: int = 200) -> Answer:
    return Answer(status, orjson.dumps(obj))


def _error(status: int, message: str, code: str | None, anthropic: bool) -> Answer:
    if anthropic:
        return _json_answer(
            {"type": "error", "error": {"type": "invalid_request_error", "message": message}},
            status,
        )
    return _json_answer(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": code,
                "param": None,
            }
        },
        status,
    )


def _typed_sse(events: Iterable[Json]) -> Answer:
    """Responses and Messages name each event, and their SDKs dispatch on that name."""
    raw = [
        b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in events
    ]
    return Answer(200, events=raw)


def _text_of(content: Any, kinds: tuple[str, ...] = ("text",)) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") in kinds
        )
    return ""


def _last_user_text(messages: Any, kinds: tuple[str, ...] = ("text",)) -> str:
    if not isinstance(messages, list):
        return ""
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return _text_of(users[-1].get("content"), kinds) if users else ""


def _pieces(text: str) -> list[str]:
    """The streamed deltas: one word each, the space kept in front so they join back."""
    return [word if i == 0 else " " + word for i, word in enumerate(text.split(" "))]


def _count(*values: Any) -> int:
    """A token estimate: about four characters a token, never zero."""
    return max(1, sum(len(str(v)) for v in values if v is not None) // 4)


def _given(req: Json, key: str, default: Any) -> Any:
    value = req.get(key)
    return default if value is None else value


# --- chat, completions, embeddings ------------------------------------------------------


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
