"""Token usage from upstream answers: the JSON `usage` member, or a stream's usage chunk."""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

from gateway.wire.sse import event_end, last_event_end, payload_of

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


# A usage object (not OpenAI's `"usage": null` on every chunk once usage is asked for).
_USAGE_OBJECT = re.compile(rb'"usage"[ \t]*:[ \t]*\{')
# Text a stream relays: chat deltas' `content`, completions' `text`. Their JSON string
# length stands for their characters (escapes count a little more): only an estimate is
# made from it, when a stream ends without usage.


@functools.cache
def content_pattern(fields: tuple[str, ...]) -> re.Pattern[bytes]:
    """The string members a family's events carry text in (families.Family)."""
    names = b"|".join(re.escape(f.encode()) for f in fields)
    # The string's body unrolled (runs of plain bytes between escapes): one C loop per
    # run where an alternation per byte stepped through the engine (13.7 -> 5 us per
    # 22-event block).
    plain = rb'[^"\\\r\n]*'
    body = plain + rb"(?:\\." + plain + rb")*"
    return re.compile(rb'"(?:' + names + rb')"[ \t]*:[ \t]*"(' + body + rb')"')


_CONTENT = content_pattern(("content", "text"))


class Tally:
    """Reads a stream's blocks of events for usage and, when tokens are limited, the size
    of the content relayed.

    Both are found by byte search over the block, never by splitting it into events and
    parsing each: only an event that holds a usage object is parsed (for the log, the
    limits, and to hide the usage-only chunk the gateway asked for).
    """

    __slots__ = ("content", "content_chars", "count_content", "hide_usage_chunk", "usage")

    def __init__(
        self,
        hide_usage_chunk: bool,
        count_content: bool = True,
        content: re.Pattern[bytes] = _CONTENT,
    ) -> None:
        self.hide_usage_chunk = hide_usage_chunk
        self.count_content = count_content
        self.content = content
        self.usage: dict[str, Any] | None = None
        self.content_chars = 0

    def block(self, block: bytes) -> bytes:
        """A block of whole events to relay: all of it, less the usage-only chunk the
        gateway asked for."""
        if self.count_content:
            self.content_chars += sum(map(len, self.content.findall(block)))
        # bytes.find first: a memchr-speed scan, where the regex would step byte by byte.
        at = block.find(USAGE_KEY)
        found = None if at < 0 else _USAGE_OBJECT.search(block, at)
        if found is None:
            return block
        parts: list[bytes] = []
        done = 0
        while found is not None:
            at = found.start()
            start = last_event_end(block, done, at)
            end = event_end(block, at)
            if not self._keep(block[start:end]):
                parts.append(block[done:start])
                done = end
            found = _USAGE_OBJECT.search(block, end)
        parts.append(block[done:])
        return b"".join(parts)

    def _keep(self, event: bytes) -> bool:
        """Read the event's usage; False for the usage-only chunk the gateway injected."""
        payload = payload_of(event)
        if payload is None:
            return True
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        usage = obj.get("usage")
        if not isinstance(usage, dict):
            # responses: response.completed's `response.usage`; messages: message_start's
            # `message.usage` (input), then message_delta's top-level one (output so far).
            for holder in ("response", "message"):
                inner = obj.get(holder)
                if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
                    usage = inner["usage"]
                    break
        if isinstance(usage, dict):
            self.usage = usage if self.usage is None else {**self.usage, **usage}
            return not (self.hide_usage_chunk and not obj.get("choices"))
        return True


def usage_tokens(usage: dict[str, Any]) -> int:
    """Tokens in a usage object of any family: `total_tokens`, else chat's prompt and
    completion tokens, else input, output and Anthropic's cache tokens."""
    total = usage.get("total_tokens")
    if isinstance(total, int) and total >= 0:
        return total
    names = ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
             "cache_creation_input_tokens", "cache_read_input_tokens")  # fmt: skip
    parts = (usage.get(name) for name in names)
    return sum(p for p in parts if isinstance(p, int) and p > 0)


def _count(value: Any) -> int:
    return value if value.__class__ is int and value > 0 else 0


def cache_written(usage: dict[str, Any]) -> int:
    """Prompt tokens written to the provider's cache (Anthropic's
    cache_creation_input_tokens; usage_parts counts them inside the prompt)."""
    written = usage.get("cache_creation_input_tokens")
    return written if written.__class__ is int and written > 0 else 0


def prompt_kinds(usage: dict[str, Any]) -> tuple[int, int, int]:
    """(cache read, cache write, uncached) prompt tokens of a usage object of any family
    (SPEC §14): OpenAI's and the Responses API's totals hold their cached part; Anthropic's
    input_tokens holds neither its cache reads nor its cache writes."""
    prompt, cached, _ = usage_parts(usage)
    written = cache_written(usage)
    return cached, written, max(0, prompt - cached - written)


def usage_parts(usage: dict[str, Any]) -> tuple[int, int, int]:
    """(prompt, cached prompt, completion) tokens of a usage object of any family: chat's
    prompt/completion (cached in prompt_tokens_details), responses' input/output (cached
    in input_tokens_details, already inside input), Anthropic's input/output with cache
    reads and writes counted apart from input."""
    get = usage.get
    prompt = get("prompt_tokens")
    if prompt is not None or "completion_tokens" in usage:
        # The common (chat) shape inline: this runs for every answer with usage.
        completion = get("completion_tokens")
        details = get("prompt_tokens_details")
        cached = _count(details.get("cached_tokens")) if details.__class__ is dict else 0
        return (
            prompt if prompt.__class__ is int and prompt > 0 else 0,
            cached,
            completion if completion.__class__ is int and completion > 0 else 0,
        )
    read = _count(usage.get("cache_read_input_tokens"))
    written = _count(usage.get("cache_creation_input_tokens"))
    details = usage.get("input_tokens_details")
    cached = read or (_count(details.get("cached_tokens")) if isinstance(details, dict) else 0)
    prompt = _count(usage.get("input_tokens")) + read + written
    return prompt, cached, _count(usage.get("output_tokens"))
