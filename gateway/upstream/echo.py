"""The built-in `builtin:echo` upstream: answers in-process, so `make run` needs no keys.

It speaks the shapes of every relayed API family (OpenAI's chat, completions, embeddings,
responses, images, audio and moderations; rerank; Anthropic's messages), streaming
included, and goes through the same relay as any upstream: the whole gateway path can be
exercised and demonstrated without a provider.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import orjson

WORD_DELAY = 0.01  # seconds between streamed words: enough to see streaming, cheap in tests
# OpenAI's moderation categories: the SDK's strict validation wants every one named.
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip
# Responses kept for GET /responses/{id}: bounded like all gateway state, since a
# long-running demo gateway must not grow with every request.
MAX_STORED = 1000
_ids = itertools.count(1)

Json = dict[str, Any]
Headers = list[tuple[bytes, bytes]]

# Text parts of a Responses message: clients replay earlier assistant turns as output_text.
_RESPONSE_TEXT = ("input_text", "output_text", "text")


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


def _json_answer(obj: Any, status: int = 200) -> EchoResponse:
    return EchoResponse(status, orjson.dumps(obj))


def _error(status: int, message: str, code: str | None, anthropic: bool) -> EchoResponse:
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


def _typed_sse(events: Iterable[Json]) -> EchoResponse:
    """Responses and Messages name each event, and their SDKs dispatch on that name."""
    raw = [
        b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in events
    ]
    return EchoResponse(200, events=raw)


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


def _reply(completions: bool, req: Json) -> tuple[str, int]:
    if completions:
        prompt = req.get("prompt")
        if isinstance(prompt, str):
            text = prompt
        else:
            text = " ".join(map(str, prompt)) if isinstance(prompt, list) else ""
    else:
        text = _last_user_text(req.get("messages"))
    messages = req.get("messages")
    counted = messages if isinstance(messages, list) and messages else [text]
    prompt_tokens = max(1, sum(len(str(m)) for m in counted) // 4)
    return "echo: " + text, prompt_tokens


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _chat(call: _Call) -> EchoResponse:
    return _chat_like(False, call.json())


def _completions(call: _Call) -> EchoResponse:
    return _chat_like(True, call.json())


def _chat_like(completions: bool, req: Json) -> EchoResponse:
    model = req.get("model", "echo")
    created = int(time.time())
    text, prompt_tokens = _reply(completions, req)
    pieces = _pieces(text)
    completion_tokens = len(pieces)
    ident = f"echo-{next(_ids)}"
    if completions:
        choice: Json = {"index": 0, "text": text, "finish_reason": "stop"}
        obj = "text_completion"
    else:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        obj = "chat.completion"
    if not req.get("stream"):
        return _json_answer(
            {
                "id": ident,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [choice],
                "usage": _usage(prompt_tokens, completion_tokens),
            }
        )
    head = {
        "id": ident,
        "object": obj if completions else obj + ".chunk",
        "created": created,
        "model": model,
    }
    events: list[Json] = []
    for i, piece in enumerate(pieces):
        if completions:
            delta: Json = {"index": 0, "text": piece, "finish_reason": None}
        else:
            delta = {
                "index": 0,
                "delta": {"role": "assistant", "content": piece} if i == 0 else {"content": piece},
                "finish_reason": None,
            }
        events.append({**head, "choices": [delta]})
    last: Json = {
        "index": 0,
        "finish_reason": "stop",
        **({"text": ""} if completions else {"delta": {}}),
    }
    events.append({**head, "choices": [last]})
    options = req.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        events.append({**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    raw = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
    return EchoResponse(200, events=raw)


def _embeddings(call: _Call) -> EchoResponse:
    req = call.json()
    inputs = req.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    packed = req.get("encoding_format") == "base64"
    data = []
    for i, x in enumerate(items):
        vector = [b / 255 for b in hashlib.sha256(str(x).encode()).digest()[:8]]
        embedding: Any = vector
        if packed:
            # What OpenAI sends for base64: the float32 array, little-endian.
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = max(1, sum(len(str(x)) for x in items) // 4)
    return _json_answer(
        {
            "object": "list",
            "data": data,
            "model": req.get("model", "echo"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# --- responses ------------------------------------------------------------------------

# id -> (the response object, its input items), oldest first, at most MAX_STORED.
_stored: dict[str, tuple[Json, list[Json]]] = {}


def _remember(response: Json, items: list[Json]) -> None:
    _stored[response["id"]] = (response, items)
    while len(_stored) > MAX_STORED:
        del _stored[next(iter(_stored))]


def _input_items(value: Any, n: int) -> list[Json]:
    """The request's `input` as the items GET .../input_items lists."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list):
        return []
    items: list[Json] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            continue
        ident = item.get("id") or f"msg_echo{n}_{i}"
        role = item.get("role")
        if role is None or item.get("type", "message") != "message":
            items.append({**item, "id": ident})  # tool outputs and the like, as sent
            continue
        content = item.get("content")
        if isinstance(content, str):
            kind = "output_text" if role == "assistant" else "input_text"
            parts: list[Json] = [{"type": kind, "text": content}]
        else:
            parts = [p for p in content if isinstance(p, dict)] if isinstance(content, list) else []
        if role == "assistant":  # an output message: its text parts carry annotations
            parts = [
                {"annotations": [], **p} if p.get("type") == "output_text" else p for p in parts
            ]
        items.append(
            {"type": "message", "id": ident, "role": role, "status": "completed", "content": parts}
        )
    return items


def _response_input_tokens(req: Json) -> int:
    return _count(req.get("instructions"), req.get("input"))


def _response_object(req: Json, ident: str, created: int, output: list[Json], usage: Json) -> Json:
    # Beyond the brief's members, those the openai SDK's Response model requires, with
    # the values OpenAI sends for a plain text answer.
    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "status": "completed",
        "background": False,
        "completed_at": created,
        "error": None,
        "incomplete_details": None,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "max_tool_calls": None,
        "model": req.get("model", "echo"),
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": req.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": _given(req, "store", True),
        "temperature": _given(req, "temperature", 1.0),
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": _given(req, "top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": _given(req, "metadata", {}),
    }


def _responses(call: _Call) -> EchoResponse:
    req = call.json()
    n = next(_ids)
    created = int(time.time())
    items = _input_items(req.get("input"), n)
    text = "echo: " + _last_user_text(items, _RESPONSE_TEXT)
    pieces = _pieces(text)
    input_tokens = _response_input_tokens(req)
    part: Json = {"type": "output_text", "text": text, "annotations": []}
    message: Json = {
        "type": "message",
        "id": f"msg_echo{n}",
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    usage = {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": len(pieces),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + len(pieces),
    }
    response = _response_object(req, f"resp_echo{n}", created, [message], usage)
    _remember(response, items)
    if not req.get("stream"):
        return _json_answer(response)
    pending = {
        **response,
        "status": "in_progress",
        "completed_at": None,
        "output": [],
        "usage": None,
    }
    at = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    events: list[Json] = [
        {"type": "response.created", "response": pending},
        {"type": "response.in_progress", "response": pending},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message, "status": "in_progress", "content": []},
        },
        {"type": "response.content_part.added", **at, "part": {**part, "text": ""}},
        *(
            {"type": "response.output_text.delta", **at, "delta": piece, "logprobs": []}
            for piece in pieces
        ),
        {"type": "response.output_text.done", **at, "text": text, "logprobs": []},
        {"type": "response.content_part.done", **at, "part": part},
        {"type": "response.output_item.done", "output_index": 0, "item": message},
        {"type": "response.completed", "response": response},
    ]
    return _typed_sse({"type": e["type"], "sequence_number": i, **e} for i, e in enumerate(events))


def _stored_response(call: _Call) -> tuple[Json, list[Json]]:
    found = _stored.get(call.ident)
    if found is None:
        raise _Reject(404, f"Response with id '{call.ident}' not found.", "not_found")
    return found


def _response_get(call: _Call) -> EchoResponse:
    return _json_answer(_stored_response(call)[0])


def _response_cancel(call: _Call) -> EchoResponse:
    # Echo answers are complete before anyone could cancel them: the object, unchanged.
    return _json_answer(_stored_response(call)[0])


def _response_delete(call: _Call) -> EchoResponse:
    _stored_response(call)
    del _stored[call.ident]
    return _json_answer({"id": call.ident, "object": "response.deleted", "deleted": True})


def _response_input_items(call: _Call) -> EchoResponse:
    items = _stored_response(call)[1]
    # OpenAI lists newest first unless asked for `order=asc`.
    if call.query.get("order", ["desc"])[-1] != "asc":
        items = items[::-1]
    return _json_answer(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
    )


def _response_tokens(call: _Call) -> EchoResponse:
    req = call.json()
    return _json_answer(
        {"object": "response.input_tokens", "input_tokens": _response_input_tokens(req)}
    )


# --- messages (Anthropic) ---------------------------------------------------------------


def _message_input_tokens(req: Json) -> int:
    return _count(req.get("system"), req.get("messages"))


def _messages(call: _Call) -> EchoResponse:
    req = call.json()
    text = "echo: " + _last_user_text(req.get("messages"))
    pieces = _pieces(text)
    input_tokens = _message_input_tokens(req)
    message: Json = {
        "id": f"msg_echo{next(_ids)}",
        "type": "message",
        "role": "assistant",
        "model": req.get("model", "echo"),
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": len(pieces)},
    }
    if not req.get("stream"):
        return _json_answer(message)
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
    }
    return _typed_sse(
        [
            {"type": "message_start", "message": start},
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            {"type": "ping"},
            *(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                }
                for piece in pieces
            ),
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": len(pieces)},
            },
            {"type": "message_stop"},
        ]
    )


def _message_tokens(call: _Call) -> EchoResponse:
    return _json_answer({"input_tokens": _message_input_tokens(call.json())})


# --- images, audio, moderations, rerank -------------------------------------------------


def _png_pixel() -> bytes:
    """A valid 1x1 transparent PNG, so clients that decode the image succeed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1, 8-bit RGBA
    pixels = zlib.compress(b"\x00" + b"\x00" * 4)  # the row's filter byte, then RGBA
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


_PIXEL_B64 = base64.b64encode(_png_pixel()).decode()


def _images(call: _Call) -> EchoResponse:
    req = call.json()
    n = req.get("n")
    count = min(n, 10) if isinstance(n, int) and n > 0 else 1
    image = {"b64_json": _PIXEL_B64, "revised_prompt": req.get("prompt")}
    return _json_answer({"created": int(time.time()), "data": [image] * count})


def _speech(call: _Call) -> EchoResponse:
    req = call.json()
    # Deterministic per input, so a test can tell two answers apart.
    audio = b"ID3" + hashlib.sha256(str(req.get("input", "")).encode()).digest()
    return EchoResponse(200, audio, content_type=b"audio/mpeg")


def _form(call: _Call) -> dict[str, bytes]:
    """The multipart/form-data body's fields by name (the first of each name)."""
    kind, _, params = call.header(b"content-type").partition(b";")
    boundary = b""
    for param in params.split(b";"):
        key, _, value = param.strip().partition(b"=")
        if key.lower() == b"boundary":
            boundary = value.strip().strip(b'"')
    if kind.strip().lower() != b"multipart/form-data" or not boundary:
        raise _Reject(400, "body must be multipart/form-data with a boundary")
    fields: dict[str, bytes] = {}
    for part in call.body.split(b"--" + boundary)[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, found, value = part.partition(b"\r\n\r\n")
        name = _field_name(head) if found else None
        if name is not None:
            # The CRLF before the next delimiter belongs to the delimiter.
            fields.setdefault(name, value.removesuffix(b"\r\n"))
    return fields


def _field_name(head: bytes) -> str | None:
    for line in head.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        for param in value.split(b";"):
            pkey, _, pvalue = param.strip().partition(b"=")
            if pkey.lower() == b"name":
                return pvalue.strip().strip(b'"').decode("utf-8", "replace")
    return None


def _transcription(call: _Call) -> EchoResponse:
    audio = _form(call).get("file")
    if audio is None:
        raise _Reject(400, "the form has no `file` part", "missing_file")
    return _json_answer({"text": f"echo: {len(audio)} bytes of audio"})


def _moderations(call: _Call) -> EchoResponse:
    req = call.json()
    value = req.get("input")
    # A list of strings is one input each; anything else (one string, or one
    # multimodal list of parts) is a single input.
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        inputs: list[Any] = value
    else:
        inputs = [value]
    return _json_answer(
        {
            "id": f"modr-echo{next(_ids)}",
            "model": req.get("model", "echo"),
            "results": [
                {
                    "flagged": False,
                    "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
                    "category_scores": dict.fromkeys(MODERATION_CATEGORIES, 0.0),
                    "category_applied_input_types": {
                        key: ["text"] for key in MODERATION_CATEGORIES
                    },
                }
                for _ in inputs
            ],
        }
    )


def _rerank(call: _Call) -> EchoResponse:
    req = call.json()
    query = str(req.get("query", ""))
    wanted = set(query.lower().split())
    documents = req.get("documents")
    texts = [
        str(d.get("text", "")) if isinstance(d, dict) else str(d)
        for d in (documents if isinstance(documents, list) else [])
    ]
    # The share of the query's words found in the document: crude, deterministic, and
    # it orders documents the way a reader would expect.
    scores = [len(wanted & set(t.lower().split())) / len(wanted) if wanted else 0.0 for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])  # stable: ties by index
    top_n = req.get("top_n")
    if isinstance(top_n, int) and top_n >= 0:
        order = order[:top_n]
    return _json_answer(
        {
            "id": f"rerank-echo{next(_ids)}",
            "model": req.get("model", "echo"),
            "results": [{"index": i, "relevance_score": scores[i]} for i in order],
            "usage": {"total_tokens": _count(query, *texts)},
        }
    )


# --- dispatch -------------------------------------------------------------------------

Handler = Callable[[_Call], "EchoResponse"]

# (method, path) -> handler; "{id}" stands for the third path segment.
_ROUTES: dict[tuple[str, str], Handler] = {
    ("POST", "/chat/completions"): _chat,
    ("POST", "/completions"): _completions,
    ("POST", "/embeddings"): _embeddings,
    ("POST", "/responses"): _responses,
    ("POST", "/responses/input_tokens"): _response_tokens,
    ("GET", "/responses/{id}"): _response_get,
    ("DELETE", "/responses/{id}"): _response_delete,
    ("POST", "/responses/{id}/cancel"): _response_cancel,
    ("GET", "/responses/{id}/input_items"): _response_input_items,
    ("POST", "/messages"): _messages,
    ("POST", "/messages/count_tokens"): _message_tokens,
    ("POST", "/images/generations"): _images,
    ("POST", "/audio/speech"): _speech,
    ("POST", "/audio/transcriptions"): _transcription,
    ("POST", "/audio/translations"): _transcription,
    ("POST", "/moderations"): _moderations,
    ("POST", "/rerank"): _rerank,
}


def _route(verb: str, path: str) -> tuple[Handler, str] | None:
    """The handler for the request and the {id} it names ("" on fixed paths)."""
    handler = _ROUTES.get((verb, path))
    if handler is not None:
        return handler, ""
    parts = path.split("/")
    if len(parts) < 3 or not parts[2]:
        return None
    ident, parts[2] = parts[2], "{id}"
    handler = _ROUTES.get((verb, "/".join(parts)))
    return None if handler is None else (handler, ident)


class EchoResponse:
    """An answer held whole in memory, read the way the relay reads a real upstream's."""

    __slots__ = ("_body", "_events", "_sent", "headers", "is_sse", "status")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        events: list[bytes] | None = None,
        content_type: bytes = b"application/json",
    ) -> None:
        self.status = status
        self._body = body
        self._events = events
        self.is_sse = events is not None
        self._sent = 0
        ctype = b"text/event-stream" if self.is_sse else content_type
        self.headers: Headers = [(b"content-type", ctype)]

    @classmethod
    def answer(
        cls,
        path: str,
        body: bytes,
        method: bytes | None = None,
        headers: Headers | None = None,
    ) -> EchoResponse:
        """The answer to `method` (None: POST) on `path`, relative to the provider's base."""
        path, _, query = path.partition("?")
        verb = "POST" if method is None else method.decode("latin-1").upper()
        found = _route(verb, path)
        if found is None:
            return _error(404, f"Invalid URL ({verb} {path})", None, anthropic=False)
        handler, ident = found
        try:
            return handler(_Call(body, headers or [], ident, parse_qs(query)))
        except _Reject as exc:
            return _error(exc.status, exc.message, exc.code, path.startswith("/messages"))

    async def read(self) -> bytes:
        return self._body if self._events is None else b"".join(self._events)

    async def next_chunk(self) -> bytes:
        if self._events is None:
            body, self._body = self._body, b""
            return body
        if not self._events:
            return b""
        if self._sent:
            await asyncio.sleep(WORD_DELAY)
        self._sent += 1
        return self._events.pop(0)

    def ready(self) -> bool:
        return not (self._events and self._sent)

    def relax(self) -> None:
        pass

    def close(self) -> None:
        pass
