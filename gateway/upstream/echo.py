"""The built-in `builtin:echo` upstream: answers in-process, so `make run` needs no keys.

It speaks the same OpenAI shapes as a real provider, streaming included, and goes
through the same relay as any upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from typing import Any

import orjson

WORD_DELAY = 0.01  # seconds between streamed words: enough to see streaming, cheap in tests
_ids = itertools.count(1)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


def _reply(path: str, req: dict[str, Any]) -> tuple[str, int]:
    if path == "/completions":
        prompt = req.get("prompt")
        text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt or []))
    else:
        messages = req.get("messages") or []
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        text = _text_of(users[-1].get("content")) if users else ""
    prompt_tokens = max(1, sum(len(str(m)) for m in req.get("messages", []) or [text]) // 4)
    return "echo: " + text, prompt_tokens


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class EchoResponse:
    __slots__ = ("_body", "_events", "_sent", "headers", "is_sse", "status")

    def __init__(self, status: int, body: bytes = b"", events: list[bytes] | None = None) -> None:
        self.status = status
        self._body = body
        self._events = events
        self.is_sse = events is not None
        self._sent = 0
        ctype = b"text/event-stream" if self.is_sse else b"application/json"
        self.headers = [(b"content-type", ctype)]

    @classmethod
    def answer(cls, path: str, body: bytes) -> EchoResponse:
        try:
            req = orjson.loads(body)
        except orjson.JSONDecodeError:
            req = None
        if not isinstance(req, dict):
            return cls(
                400,
                orjson.dumps(
                    {
                        "error": {
                            "message": "body must be a JSON object",
                            "type": "invalid_request_error",
                            "code": None,
                            "param": None,
                        }
                    }
                ),
            )
        model = req.get("model", "echo")
        created = int(time.time())
        if path == "/embeddings":
            inputs = req.get("input")
            items = inputs if isinstance(inputs, list) else [inputs]
            data = [
                {
                    "object": "embedding",
                    "index": i,
                    "embedding": [b / 255 for b in hashlib.sha256(str(x).encode()).digest()[:8]],
                }
                for i, x in enumerate(items)
            ]
            tokens = max(1, sum(len(str(x)) for x in items) // 4)
            return cls(
                200,
                orjson.dumps(
                    {
                        "object": "list",
                        "data": data,
                        "model": model,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                    }
                ),
            )
        text, prompt_tokens = _reply(path, req)
        words = text.split(" ")
        completion_tokens = len(words)
        ident = f"echo-{next(_ids)}"
        if path == "/completions":
            choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "stop"}
            obj = "text_completion"
        else:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            obj = "chat.completion"
        if not req.get("stream"):
            return cls(
                200,
                orjson.dumps(
                    {
                        "id": ident,
                        "object": obj,
                        "created": created,
                        "model": model,
                        "choices": [choice],
                        "usage": _usage(prompt_tokens, completion_tokens),
                    }
                ),
            )
        head = {
            "id": ident,
            "object": obj + ("" if path == "/completions" else ".chunk"),
            "created": created,
            "model": model,
        }
        events: list[dict[str, Any]] = []
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            if path == "/completions":
                delta: dict[str, Any] = {"index": 0, "text": piece, "finish_reason": None}
            else:
                delta = {
                    "index": 0,
                    "delta": (
                        {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
                    ),
                    "finish_reason": None,
                }
            events.append({**head, "choices": [delta]})
        last: dict[str, Any] = {
            "index": 0,
            "finish_reason": "stop",
            **({"text": ""} if path == "/completions" else {"delta": {}}),
        }
        events.append({**head, "choices": [last]})
        options = req.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            events.append(
                {**head, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}
            )
        raw = [b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + [b"data: [DONE]\n\n"]
        return cls(200, events=raw)

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
