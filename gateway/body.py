"""The request body: size-limited read, one parse, validation, the upstream rewrite."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson
from msgspec import UNSET, UnsetType

from gateway.errors import BadRequest, PayloadTooLarge, ValidationFailed
from gateway.families import Family
from gateway.wire.estimate import DEFAULT_OUTPUT, MEDIA_TOKENS, output_allowance, prompt_tokens
from gateway.wire.jsonscan import MODEL_KEY, rewrite_members, splice, splice_sole
from gateway.wire.multipart import MalformedForm, delimiter_of, fields

# A slug (and what a wildcard captures of it) ends up in response headers such as
# x-upstream-model: no control characters, so no line breaks.
_SLUG = re.compile(r"[^\x00-\x1f\x7f]{1,512}")
GATEWAY_FIELDS = frozenset({"models", "route", "provider", "session_id"})
MAX_SESSION_ID = 128


SORTS = ("price", "latency", "throughput")


@dataclass(frozen=True, slots=True)
class ProviderPrefs:
    order: tuple[str, ...] = ()
    only: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    allow_fallbacks: bool = True
    sort: str | None = None  # price | latency | throughput (OpenRouter)
    max_price: tuple[float | None, float | None] | None = None  # (prompt, completion) $/1M


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
    # The prompt's token estimate and the declared output allowance (wire.estimate's),
    # made only when asked (parse_body's count_prompt): keys with token limits.
    prompt_tokens: int = 0
    output_allowance: int = 0
    previous_response_id: str | None = None  # responses: the id this request continues
    route_sort: bool = False  # route: "sort": every listed slug's entries sorted together
    # A multipart upload (audio): the span of the `model` part's value in `raw`.
    model_span: tuple[int, int] | None = None

    def for_upstream(self, upstream_model: str, inject_usage: bool = False) -> bytes:
        """The client's bytes with `model` replaced and the gateway's own fields removed.

        `inject_usage` asks the upstream for a final usage chunk (the gateway counts
        tokens from it and hides it from a client that did not ask).
        """
        if self.model_span is not None:
            return splice(self.raw, *self.model_span, upstream_model.encode())
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
    sort = value.get("sort")
    if sort is not None and sort not in SORTS:
        raise _fail("provider.sort", "provider.sort must be price, latency or throughput")
    return ProviderPrefs(
        order=_names(value.get("order", []), "provider.order"),
        only=None if only is None else _names(only, "provider.only"),
        ignore=_names(value.get("ignore", []), "provider.ignore"),
        allow_fallbacks=allow,
        sort=sort,
        max_price=_max_price(value.get("max_price")),
    )


def _max_price(value: Any) -> tuple[float | None, float | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail("provider.max_price", "provider.max_price must be {prompt, completion}")
    out: list[float | None] = []
    for field_name in ("prompt", "completion"):
        limit = value.get(field_name)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | float)):
            raise _fail(f"provider.max_price.{field_name}", "a price must be a number")
        out.append(None if limit is None else float(limit))
    return out[0], out[1]


class _Fields(msgspec.Struct):
    """The members the gateway reads; msgspec validates every other member while skipping
    it, building no object for it. The prompt fields stay raw JSON (a view of the body):
    for a large body they are the body, and the gateway needs only their shape."""

    model: Any = UNSET
    models: Any = UNSET
    route: Any = UNSET
    provider: Any = UNSET
    session_id: Any = UNSET
    stream: Any = UNSET
    stream_options: Any = UNSET
    previous_response_id: Any = UNSET
    messages: msgspec.Raw | UnsetType = UNSET
    prompt: msgspec.Raw | UnsetType = UNSET
    input: msgspec.Raw | UnsetType = UNSET
    query: msgspec.Raw | UnsetType = UNSET
    documents: msgspec.Raw | UnsetType = UNSET


# msgspec decodes into _Fields without materialising the rest: 0.28 us against orjson.loads'
# 0.52 us for a 279-byte chat body, and an 8 MiB body costs nothing beyond itself (orjson
# built the whole tree: 2.2x the body at its peak).
_DECODE = msgspec.json.Decoder(_Fields).decode
# Keys with token limits: the whole body, for the prompt estimate (every string counts).
_DECODE_ANY = msgspec.json.Decoder().decode
# Matched on the raw members themselves (re takes any buffer): 0.12 us, where slicing a
# memoryview of them to look took 0.2 us per check.
_NON_EMPTY_LIST = re.compile(rb"\[[ \t\r\n]*[^ \t\r\n\]]").match
_NULL = re.compile(rb"null").match
# UTF-8 inside skipped strings is not checked by msgspec; it is checked here, a window at
# a time so a large body is never decoded whole.
_UTF8_WINDOW = 1 << 20


def _check_utf8(raw: bytes) -> None:
    if raw.isascii():
        return
    try:
        if len(raw) <= _UTF8_WINDOW:
            str(raw, "utf-8")
            return
        decode = codecs.getincrementaldecoder("utf-8")().decode
        view = memoryview(raw)
        for start in range(0, len(view), _UTF8_WINDOW):
            decode(view[start : start + _UTF8_WINDOW], start + _UTF8_WINDOW >= len(view))
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"request body is not valid JSON: invalid UTF-8 at byte {exc.start}",
            {"cause": "json"},
        ) from None


def _given(value: Any) -> bool:
    """A member present and not null."""
    if isinstance(value, msgspec.Raw):
        return _NULL(value) is None
    return value is not UNSET and value is not None


def _non_empty_list(value: Any) -> bool:
    if isinstance(value, msgspec.Raw):
        return _NON_EMPTY_LIST(value) is not None
    return isinstance(value, list) and len(value) > 0


def parse_body(
    raw: bytes,
    family: Family,
    header_session: str | None = None,
    count_prompt: bool = False,
    path_slug: str | None = None,
) -> ParsedBody:
    """Validate the body and keep what routing and the splice need. `count_prompt`: also
    count the prompt's characters (keys with token limits estimate from them).
    `path_slug`: the slug an Azure deployment path names, which the body's `model`
    does not override."""
    try:
        data = _DECODE(raw)
    except msgspec.ValidationError:  # the only typed expectation is the top-level object
        # (decoding stops at the first value that is not one, before reading further)
        raise BadRequest("request body must be a JSON object", {"cause": "not_object"}) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}", {"cause": "json"}) from None
    except RecursionError:  # msgspec's depth limit is the interpreter's (1,000)
        raise BadRequest("request body is nested too deeply", {"cause": "json"}) from None
    _check_utf8(raw)

    slugs: list[str] = []
    model = data.model
    if model is not UNSET and model is not None:
        if not isinstance(model, str) or not _SLUG.fullmatch(model):
            raise _fail("model", "model must be a non-empty string without control characters")
        slugs.append(model)
    models = data.models
    if models is not UNSET and models is not None:
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and _SLUG.fullmatch(m) for m in models)
        ):
            raise _fail("models", "models must be a non-empty list of model slugs")
        slugs.extend(m for m in models if m not in slugs)
    previous = data.previous_response_id
    if previous is UNSET or previous is None:
        previous = None
    elif not isinstance(previous, str) or not _SLUG.fullmatch(previous):
        raise _fail("previous_response_id", "previous_response_id must be a response id")
    if path_slug is not None:
        # Taken from a path, percent-decoded: held to the body's rule (no control
        # characters, so no CR LF into headers or logs) before any upstream is called.
        if not _SLUG.fullmatch(path_slug):
            raise _fail(
                "model", "the deployment in the path must be a slug without control characters"
            )
        slugs = [path_slug]
    elif not slugs and previous is None:
        raise _fail("model", "model is required")
    route = data.route
    if route is not UNSET and route is not None and route not in ("fallback", "sort"):
        raise _fail("route", 'route may only be "fallback" or "sort"')

    for needed in family.required:
        value = getattr(data, needed)
        if needed == "messages":
            if not _non_empty_list(value):
                raise _fail("messages", "messages must be a non-empty list")
        elif not _given(value):
            raise _fail(needed, f"{needed} is required")

    stream = None if data.stream is UNSET else data.stream
    if stream is not None and not isinstance(stream, bool):
        raise _fail("stream", "stream must be true or false")

    session_id = header_session if data.session_id is UNSET else data.session_id
    if session_id is not None:
        if not isinstance(session_id, str):
            raise _fail("session_id", "session_id must be a string")
        if len(session_id) > MAX_SESSION_ID:
            raise _fail("session_id", f"session_id must be at most {MAX_SESSION_ID} characters")

    has_options = data.stream_options is not UNSET
    prompt, allowance = _estimate(raw) if count_prompt else (0, 0)
    return ParsedBody(
        raw=raw,
        slugs=tuple(slugs),
        stream=bool(stream),
        session_id=session_id,
        prefs=_prefs(None if data.provider is UNSET else data.provider),
        needs_rewrite=(
            data.models is not UNSET
            or data.route is not UNSET
            or data.provider is not UNSET
            or data.session_id is not UNSET
        ),
        has_model=model is not UNSET,
        has_stream_options=has_options,
        stream_options=data.stream_options if has_options else None,
        prompt_tokens=prompt,
        output_allowance=allowance,
        previous_response_id=previous,
        route_sort=route == "sort",
    )


def _estimate(raw: bytes) -> tuple[int, int]:
    """The prompt estimate and output allowance of a validated JSON body (a second,
    whole decode: only for keys with token limits)."""
    whole = _DECODE_ANY(raw)
    return prompt_tokens(whole), output_allowance(whole)


def parse_multipart(
    raw: bytes, content_type: bytes | None, header_session: str | None = None
) -> ParsedBody:
    """An audio upload (multipart/form-data): the `model` part is found (its value is
    what the splice replaces, every other byte is kept) and `stream` read; the file part
    is never copied or decoded."""
    model: tuple[int, int] | None = None
    stream = False
    try:
        delimiter = delimiter_of(content_type)
        for name, start, end in fields(raw, delimiter):
            if name == b"model":
                model = (start, end)
            elif name == b"stream":
                stream = raw[start:end].strip().lower() == b"true"
    except MalformedForm as exc:
        raise BadRequest(str(exc), {"cause": exc.cause}) from None
    if model is None:
        raise _fail("model", "model is required (a form field)")
    slug = raw[model[0] : model[1]].decode("utf-8", "replace")
    if not _SLUG.fullmatch(slug):
        raise _fail("model", "model must be a non-empty string without control characters")
    return ParsedBody(
        raw=raw,
        slugs=(slug,),
        stream=stream,
        session_id=header_session,
        prefs=None,
        needs_rewrite=False,
        model_span=model,
        prompt_tokens=MEDIA_TOKENS,  # one audio item (SPEC §13's estimate)
        output_allowance=DEFAULT_OUTPUT,
    )
