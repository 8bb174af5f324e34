"""The Responses API (OpenAI): create, stream, and the lookups by id of what it stored."""

from __future__ import annotations

import time
from typing import Any

from gateway.upstream.echo.base import (
    Answer,
    Json,
    _Call,
    _count,
    _given,
    _ids,
    _json_answer,
    _last_user_text,
    _pieces,
    _Reject,
    _typed_sse,
)

# Responses kept for GET /responses/{id}: bounded like all gateway state, since a
# long-running demo gateway must not grow with every request.
MAX_STORED = 1000
# Text parts of a Responses message: clients replay earlier assistant turns as output_text.
_RESPONSE_TEXT = ("input_text", "output_text", "text")


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


def _responses(call: _Call) -> Answer:
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


def _response_get(call: _Call) -> Answer:
    return _json_answer(_stored_response(call)[0])


def _response_cancel(call: _Call) -> Answer:
    # Echo answers are complete before anyone could cancel them: the object, unchanged.
    return _json_answer(_stored_response(call)[0])


def _response_delete(call: _Call) -> Answer:
    _stored_response(call)
    del _stored[call.ident]
    return _json_answer({"id": call.ident, "object": "response.deleted", "deleted": True})


def _response_input_items(call: _Call) -> Answer:
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


def _response_tokens(call: _Call) -> Answer:
    req = call.json()
    return _json_answer(
        {"object": "response.input_tokens", "input_tokens": _response_input_tokens(req)}
    )


# --- messages (Anthropic) ---------------------------------------------------------------
