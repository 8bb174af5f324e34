"""Token usage from upstream answers: the JSON `usage` member, or a stream's usage chunk."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.sse import data_payloads, payload_of

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

    def wants(self, block: bytes) -> bool:
        """Whether a block of events has anything for this tally to read."""
        return self.count_content or USAGE_KEY in block

    def events(self, events: list[bytes]) -> list[bytes]:
        """The events to relay: all, less the usage-only chunk the gateway asked for."""
        kept = []
        for event in events:
            if (self.count_content or USAGE_KEY in event) and data_payloads(event):
                try:
                    obj = orjson.loads(payload_of(event))
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
