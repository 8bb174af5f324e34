"""Token usage from upstream answers: the JSON `usage` member, or a stream's usage chunk."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.sse import event_end, last_event_end, payload_of, split_events

USAGE_KEY = b'"usage"'


def usage_in_body(body: bytes) -> dict[str, Any] | None:
    """The top-level `usage` object of a JSON answer. orjson parses a whole answer
    faster than a Python scan finds the member, and is skipped when none is named."""
    if USAGE_KEY not in body:
        return None
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    usage = obj.get("usage") if isinstance(obj, dict) else None
    return usage if isinstance(usage, dict) else None


def _content_length(choices: Any) -> int:
    total = 0
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    total += len(delta["content"])
                if isinstance(choice.get("text"), str):
                    total += len(choice["text"])
    return total


class Tally:
    """Reads a stream's events for usage and, when tokens are limited, content size.

    Without token limits only events that mention `usage` are parsed (for the log).
    """

    __slots__ = ("content_chars", "count_content", "hide_usage_chunk", "usage")

    def __init__(self, hide_usage_chunk: bool, count_content: bool = True) -> None:
        self.hide_usage_chunk = hide_usage_chunk
        self.count_content = count_content
        self.usage: dict[str, Any] | None = None
        self.content_chars = 0

    def block(self, block: bytes) -> bytes:
        """A block of whole events to relay, read like `events`. Without token limits
        only the events that name `usage` are found (by byte search) and parsed."""
        if self.count_content:
            return b"".join(self.events(split_events(block)))
        at = block.find(USAGE_KEY)
        if at < 0:
            return block
        parts: list[bytes] = []
        done = 0
        while at >= 0:
            start = last_event_end(block, done, at)
            end = event_end(block, at)
            kept = self.events([block[start:end]])
            if not kept:
                parts.append(block[done:start])
                done = end
            at = block.find(USAGE_KEY, end)
        parts.append(block[done:])
        return b"".join(parts)

    def events(self, events: list[bytes]) -> list[bytes]:
        """The events to relay: all, less the usage-only chunk the gateway asked for."""
        kept = []
        for event in events:
            payload = payload_of(event) if self.count_content or USAGE_KEY in event else None
            if payload is not None:
                try:
                    obj = orjson.loads(payload)
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    usage = obj.get("usage")
                    if isinstance(usage, dict):
                        self.usage = usage
                        if self.hide_usage_chunk and not obj.get("choices"):
                            continue
                    self.content_chars += _content_length(obj.get("choices"))
            kept.append(event)
        return kept
