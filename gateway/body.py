"""The request body: size-limited read, one parse, validation, the upstream rewrite."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import BadRequest, PayloadTooLarge, ValidationFailed
from gateway.jsonscan import MODEL_KEY, rewrite_members, splice_sole

# A slug (and what a wildcard captures of it) ends up in response headers such as
# x-upstream-model: no control characters, so no line breaks.
_SLUG = re.compile(r"[^\x00-\x1f\x7f]{1,512}")
GATEWAY_FIELDS = frozenset({"models", "route", "provider", "session_id"})
MAX_SESSION_ID = 128
# What each endpoint needs besides `model`: the field and a word for the message.
REQUIRED = {
    "/chat/completions": "messages",
    "/completions": "prompt",
    "/embeddings": "input",
}


@dataclass(frozen=True, slots=True)
class ProviderPrefs:
    order: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    allow_fallbacks: bool = True


@dataclass(slots=True)
class ParsedBody:
    """What the gateway needs of a request body. The parsed JSON itself is not kept: for
    a large body it is as big as the body, and the splice needs only the raw bytes.

    Written by parse_body alone and read after; not frozen only because a frozen
    dataclass's __init__ sets each field through object.__setattr__ (0.94 us against
    0.18 us for ten fields, on every request)."""

    raw: bytes
    slugs: tuple[str, ...]  # `model` first, then `models`, without repeats
    stream: bool
    session_id: str | None
    prefs: ProviderPrefs | None
    needs_rewrite: bool  # any gateway field present: members must be dropped
    has_model: bool = True  # a top-level `model` member
    has_stream_options: bool = False
    stream_options: Any = None
    prompt_length: int = 0  # prompt characters, counted only when asked (parse_body)

    def for_upstream(self, upstream_model: str, inject_usage: bool = False) -> bytes:
        """The client's bytes with `model` replaced and the gateway's own fields removed.

        `inject_usage` asks the upstream for a final usage chunk (the gateway counts
        tokens from it and hides it from a client that did not ask).
        """
        replace = {"model": orjson.dumps(upstream_model)}
        if not inject_usage and not self.needs_rewrite and self.has_model:
            fast = splice_sole(self.raw, MODEL_KEY, replace["model"])
            if fast is not None:
                return fast
        inserts = [] if self.has_model else [b'"model":' + replace["model"]]
        if inject_usage:
            options = self.stream_options
            merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
            if self.has_stream_options:
                replace["stream_options"] = orjson.dumps(merged)
            else:
                inserts.append(b'"stream_options":' + orjson.dumps(merged))
        return rewrite_members(self.raw, replace, GATEWAY_FIELDS, b",".join(inserts))

    @property
    def asked_usage(self) -> bool:
        options = self.stream_options
        return isinstance(options, dict) and options.get("include_usage") is True

    def prompt_chars(self) -> int:
        """Characters of the prompt, for a token estimate when no usage came back."""
        return self.prompt_length


async def read_body(receive: Any, limit: int, declared: int | None) -> bytes:
    """Read the whole body, refusing with 413 as soon as it passes the limit."""
    if declared is not None and declared > limit:
        raise PayloadTooLarge(
            f"request body is {declared} bytes; the limit is {limit}", {"limit": limit}
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(
                    f"request body is over the limit of {limit} bytes", {"limit": limit}
                )
            chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class ClientGone(Exception):
    """The client went away before we answered; nothing is sent."""


def _fail(field: str, message: str) -> ValidationFailed:
    return ValidationFailed(message, {"field": field})


def _names(value: Any, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(field, f"{field} must be a list of provider names")
    return tuple(value)


def _prefs(value: Any) -> ProviderPrefs | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail("provider", "provider must be an object like {order: [...], only: [...]}")
    allow = value.get("allow_fallbacks", True)
    if not isinstance(allow, bool):
        raise _fail("provider.allow_fallbacks", "provider.allow_fallbacks must be true or false")
    only = value.get("only")
    return ProviderPrefs(
        order=_names(value.get("order", []), "provider.order"),
        only=None if only is None else _names(only, "provider.only"),
        ignore=_names(value.get("ignore", []), "provider.ignore"),
        allow_fallbacks=allow,
    )


def parse_body(
    raw: bytes, path: str, header_session: str | None = None, count_prompt: bool = False
) -> ParsedBody:
    """Validate the body and keep what routing and the splice need. `count_prompt`: also
    count the prompt's characters (keys with token limits estimate from them)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", {"cause": "json"}) from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object", {"cause": "not_object"})

    slugs: list[str] = []
    model = data.get("model")
    if model is not None:
        if not isinstance(model, str) or not _SLUG.fullmatch(model):
            raise _fail("model", "model must be a non-empty string without control characters")
        slugs.append(model)
    models = data.get("models")
    if models is not None:
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and _SLUG.fullmatch(m) for m in models)
        ):
            raise _fail("models", "models must be a non-empty list of model slugs")
        slugs.extend(m for m in models if m not in slugs)
    if not slugs:
        raise _fail("model", "model is required")
    route = data.get("route")
    if route is not None and route != "fallback":
        raise _fail("route", 'route may only be "fallback"')

    needed = REQUIRED[path]
    value = data.get(needed)
    if needed == "messages":
        if not isinstance(value, list) or not value:
            raise _fail("messages", "messages must be a non-empty list")
    elif value is None:
        raise _fail(needed, f"{needed} is required")

    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _fail("stream", "stream must be true or false")

    session_id = data.get("session_id", header_session)
    if session_id is not None:
        if not isinstance(session_id, str):
            raise _fail("session_id", "session_id must be a string")
        if len(session_id) > MAX_SESSION_ID:
            raise _fail("session_id", f"session_id must be at most {MAX_SESSION_ID} characters")

    prompt = data.get("messages", data.get("prompt", data.get("input"))) if count_prompt else None
    return ParsedBody(
        raw=raw,
        slugs=tuple(slugs),
        stream=bool(stream),
        session_id=session_id,
        prefs=_prefs(data.get("provider")),
        needs_rewrite=not GATEWAY_FIELDS.isdisjoint(data),
        has_model="model" in data,
        has_stream_options="stream_options" in data,
        stream_options=data.get("stream_options"),
        prompt_length=_text_length(prompt) if count_prompt else 0,
    )


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(v) for v in value)
    if isinstance(value, dict):
        return _text_length(value.get("content")) + _text_length(value.get("text"))
    return 0
