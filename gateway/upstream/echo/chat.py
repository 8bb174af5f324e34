"""Chat completions, completions and embeddings (OpenAI)."""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from typing import Any

import orjson

from gateway.upstream.echo.base import (
    Answer,
    Json,
    _Call,
    _ids,
    _json_answer,
    _last_user_text,
    _pieces,
    _usage,
)


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


def _chat(call: _Call) -> Answer:
    return _chat_like(False, call.json())


def _completions(call: _Call) -> Answer:
    return _chat_like(True, call.json())


def _chat_like(completions: bool, req: Json) -> Answer:
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
    return Answer(200, events=raw)


def _embeddings(call: _Call) -> Answer:
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
