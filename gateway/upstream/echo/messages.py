"""Anthropic's Messages API: create, stream, count_tokens."""

from __future__ import annotations

from gateway.upstream.echo.base import (
    Answer,
    Json,
    _Call,
    _count,
    _ids,
    _json_answer,
    _last_user_text,
    _pieces,
    _typed_sse,
)


def _message_input_tokens(req: Json) -> int:
    return _count(req.get("system"), req.get("messages"))


def _messages(call: _Call) -> Answer:
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


def _message_tokens(call: _Call) -> Answer:
    return _json_answer({"input_tokens": _message_input_tokens(call.json())})


# --- images, audio, moderations, rerank -------------------------------------------------
