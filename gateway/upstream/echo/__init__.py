"""The built-in `builtin:echo` upstream: answers in-process, so `make run` needs no keys.

It speaks the shapes of every relayed API family (OpenAI's chat, completions, embeddings,
responses, images, audio and moderations; rerank; Anthropic's messages), streaming
included, and goes through the same relay as any upstream: the whole gateway path can be
exercised and demonstrated without a provider.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from urllib.parse import parse_qs

from gateway.types import Headers
from gateway.upstream.echo.base import Answer, _Call, _error, _Reject
from gateway.upstream.echo.chat import _chat, _completions, _embeddings
from gateway.upstream.echo.media import _images, _moderations, _rerank, _speech, _transcription
from gateway.upstream.echo.messages import _message_tokens, _messages
from gateway.upstream.echo.responses import (
    MAX_STORED,
    _response_cancel,
    _response_delete,
    _response_get,
    _response_input_items,
    _response_tokens,
    _responses,
    _stored,
)

__all__ = ["MAX_STORED", "WORD_DELAY", "EchoResponse", "_stored"]

WORD_DELAY = 0.01  # seconds between streamed words: enough to see streaming, cheap in tests

Handler = Callable[[_Call], Answer]

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
            return cls(*_error(404, f"Invalid URL ({verb} {path})", None, anthropic=False))
        handler, ident = found
        try:
            return cls(*handler(_Call(body, headers or [], ident, parse_qs(query))))
        except _Reject as exc:
            return cls(*_error(exc.status, exc.message, exc.code, path.startswith("/messages")))

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

    def relay_inline(self, sink: Callable[[bytes], bool] | None) -> None:
        pass  # the echo's events are made in process, as next_chunk asks

    def close(self) -> None:
        pass
