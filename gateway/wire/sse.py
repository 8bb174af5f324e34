"""Server-sent events on raw bytes: split at blank lines, splice `model` in data lines.

Splitting is done here rather than by a line iterator: `str.splitlines` also breaks on
U+2028 and friends, which would corrupt JSON, and every byte (including `\\r\\n`) must
reach the client as the upstream sent it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

from gateway.errors import UpstreamResponseTooLarge
from gateway.wire.jsonscan import MODEL_KEY, object_start, replace_value

DEFAULT_MAX_EVENT = 16 * 1024 * 1024  # bytes of one event (--max-event-bytes)

# A line ending followed by another one ends an event. `\r` directly followed by `\n` is
# one ending (`\r\n`), never two.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r|\n)")
_DATA_LINE = re.compile(rb"(?:^|(?<=[\r\n]))data:[ ]?([^\r\n]*)", re.M)
# In a block of whole events: each `data:` line whose JSON object starts with scalar
# members, then `"model"` with a scalar value. With `subn`, every such value is replaced
# in one C pass; the count tells whether that was every `"model"` in the block.
# The pattern starts with the literal `\ndata:` so `re` can skip ahead to candidates
# (a `^` in multiline mode would make it try every byte); the block gets a leading
# newline for the duration of the pass.
# Strings and scalars here never cross a line end: a data line ends at CR or LF, so a
# member after a raw newline is not in the line's JSON (per event it is not either).
_LINE_STRING = rb'"[^"\\\r\n]*(?:\\[^\r\n][^"\\\r\n]*)*"'
_LINE_SCALAR = rb"(?:" + _LINE_STRING + rb"|[-+0-9.eE]+|true|false|null)"
_LINE_MODEL = re.compile(
    rb"(\ndata:[ ]?[ \t]*\{(?:[ \t]*"
    + _LINE_STRING
    + rb"[ \t]*:[ \t]*"
    + _LINE_SCALAR
    # Lazy: try `"model"` at each member first (greedy backtracking cost 2.5x here).
    + rb'[ \t]*,)*?[ \t]*"model"[ \t]*:[ \t]*)('
    + _LINE_SCALAR
    # Only a value its member's end follows on the line, as replace_value requires: a
    # line cut after the value is rewritten by neither (else the bytes a client gets
    # would depend on where the upstream's reads fell).
    + rb")(?=[ \t]*[,}])"
)
TERMINATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class EventSplitter:
    """Feed raw chunks; get back whole events, each with its own terminating blank line.

    Linear in the bytes fed: an unfinished event is kept in one bytearray (no object per
    read, whatever size the reads come in), and each chunk is searched only with the
    last three bytes before it (a terminator is at most four bytes long), never from
    the event's start again."""

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int = DEFAULT_MAX_EVENT) -> None:
        self._limit = limit
        self._buf = bytearray()  # the unfinished event

    def feed_block(self, chunk: bytes) -> bytes:
        """The complete events the chunk finishes, as one block of bytes (b"" if none).
        UpstreamResponseTooLarge when an event passes the limit (line endings around it
        not counted, so where reads split a terminator does not matter)."""
        buf = self._buf
        if not buf and chunk[-2:] == b"\n\n" and b"\r" not in chunk and len(chunk) <= self._limit:
            # The usual read: whole events, `\n` endings only, nothing held before it.
            # It is the block itself (no search for its last end: ~4k instructions).
            return chunk
        if buf:
            back = bytes(buf[-3:])
            window = back + chunk
        else:
            back, window = b"", chunk
        end = last_event_end(window, 0, len(window))
        # Mixed endings (`\n\r\n`) are not among the three: the regex finds any after.
        while (match := _EVENT_END.search(window, end)) is not None:
            end = match.end()
        limit = self._limit
        if end == 0:
            buf += chunk
            if len(buf) > limit and _unended(buf, 0, len(buf)) > limit:
                raise self._too_large()
            return b""
        cut = end - len(back)  # where the events end within `chunk`
        if buf:
            buf += memoryview(chunk)[:cut]
            block = bytes(buf)
            buf.clear()
        else:
            block = chunk[:cut] if cut < len(chunk) else chunk
        if cut < len(chunk):
            buf += memoryview(chunk)[cut:]
        # Rare: only a block over the limit can hold an event over it.
        if (len(buf) > limit and _unended(buf, 0, len(buf)) > limit) or (
            len(block) > limit and any(_unended(block, s, e) > limit for s, e in event_spans(block))
        ):
            raise self._too_large()
        return block

    def _too_large(self) -> UpstreamResponseTooLarge:
        return UpstreamResponseTooLarge(
            f"an upstream event is over the limit of {self._limit} bytes",
            {"limit": self._limit, "cause": "event_too_large"},
        )

    def takes(self, size: int) -> bool:
        """Whether `size` more bytes can be fed without feed_block raising: with the
        unfinished event they are within the limit (so is any event they finish)."""
        return len(self._buf) + size <= self._limit

    def rest(self) -> bytes:
        """Bytes of an unfinished event, for a stream that ended without a blank line."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest


def _unended(buf: bytes | bytearray, start: int, end: int) -> int:
    """Length of buf[start:end] less the line endings it starts and ends with: an
    event's size must not depend on where a read split a terminator (`\r` | `\n`),
    the one before it or its own."""
    while end > start and buf[end - 1] in (10, 13):
        end -= 1
    while start < end and buf[start] in (10, 13):
        start += 1
    return end - start


def last_event_end(buf: bytes, lo: int, hi: int) -> int:
    """End of the last `\n\n`, `\r\n\r\n` or `\r\r` within buf[lo:hi]; `lo` if none.

    Without any `\r` only `\n\n` can occur: one memchr for `\r` spares the full scans
    that looking for the two absent terminators would make."""
    end = lo
    for t in TERMINATORS if b"\r" in buf else TERMINATORS[:1]:
        found = buf.rfind(t, lo, hi)
        if found >= 0:
            end = max(end, found + len(t))
    return end


def event_spans(block: bytes) -> Iterator[tuple[int, int]]:
    """(start, end) of each event in a block of whole events (see feed_block), lazily."""
    pos = 0
    if b"\r" in block:
        for match in _EVENT_END.finditer(block):
            yield pos, match.end()
            pos = match.end()
    else:
        # Without `\r` an event ends at `\n\n` alone: bytes.find where the regex, having
        # no literal to skip to, stepped byte by byte (26.7 -> 3 us for a 22-event block).
        found = block.find(b"\n\n")
        while found >= 0:
            yield pos, found + 2
            pos = found + 2
            found = block.find(b"\n\n", pos)
    if pos < len(block):
        yield pos, len(block)


def event_end(block: bytes, at: int) -> int:
    """End of the event that holds position `at`."""
    match = _EVENT_END.search(block, at)
    return match.end() if match is not None else len(block)


def split_events(block: bytes) -> list[bytes]:
    return [block[start:end] for start, end in event_spans(block)]


class Splicer:
    """Puts the client's slug into every top-level `model` of one stream's events.

    The first line the regex finds teaches the exact bytes up to and including the old
    value (`\ndata: {"id":"…","object":"…","created":…,"model":"upstream-id"`), which
    OpenAI-style streams repeat in every chunk. A block whose every `"model"` sits in
    such a line, the first block included, is rewritten with one bytes.replace; anything
    else falls back to the regex, then to event by event.
    """

    __slots__ = ("learned", "model_json", "short", "template")

    def __init__(self, model_json: bytes) -> None:
        self.model_json = model_json
        self.template = b"\\g<1>" + model_json.replace(b"\\", b"\\\\")
        self.learned: tuple[bytes, bytes] | None = None
        # The learnt line from its `"model"` on, old and new: what the replace looks for.
        # Under 100 bytes bytes.replace takes its simple search; the whole line (the id,
        # the object, ...) often is over, and took the two-way search, set up again for
        # every occurrence (9.9 -> 3.7 us for a 22-event block).
        self.short: tuple[bytes, bytes] = (b"", b"")

    def event(self, event: bytes) -> bytes:
        return splice_model(event, self.model_json)

    def block(self, block: bytes) -> bytes:
        occurrences = block.count(MODEL_KEY)
        if not occurrences:
            return block
        learned = self.learned
        if learned is not None:
            old, new = learned
            # Every `"model"` is in a learnt line (the line's own `\n` counted for the
            # first). Each such line holds exactly one (the counts are equal), so its
            # `"model"` and what follows up to the member's end stand for the line.
            if block.count(old) + block.startswith(old[1:]) == occurrences:
                return block.replace(*self.short)
        work = b"\n" + block
        if learned is None:
            # Learnt from the first line before the first rewrite: a fast upstream's
            # whole stream can arrive as one block, and `subn` with a template runs
            # Python code for every match.
            first = _LINE_MODEL.search(work)
            if first is not None and first.group(2).startswith(b'"'):
                head = first.group(1)
                # With the byte that ends the member: every occurrence counted must be
                # one the regex (and replace_value) would take too.
                end = first.end()
                follow = work[end : end + 1]
                if follow == b"," or follow == b"}":
                    old = head + first.group(2) + follow
                    new = head + self.model_json + follow
                    self.learned = (old, new)
                    key = head.rindex(MODEL_KEY)  # the member's own: the last in the head
                    self.short = (old[key:], new[key:])
                    if work.count(old) == occurrences:
                        return block.replace(*self.short)
        out, replaced = _LINE_MODEL.subn(self.template, work)
        if replaced != occurrences:
            return b"".join([self.event(e) for e in split_events(block)])
        return out[1:]


def data_payloads(event: bytes) -> list[tuple[int, int]]:
    """(start, end) of each `data:` field value in the event, without its line ending."""
    if b"\r" in event:
        return [m.span(1) for m in _DATA_LINE.finditer(event)]
    # Without `\r` lines end at `\n` alone: bytes.find, as in event_spans (the regex
    # stepped byte by byte: 1.5 -> 0.5 us for one chat chunk).
    spans = []
    at = event.find(b"data:")
    while at >= 0:
        if at and event[at - 1] != 10:  # not at a line's start
            at = event.find(b"data:", at + 1)
            continue
        start = at + 6 if event[at + 5 : at + 6] == b" " else at + 5
        end = event.find(b"\n", start)
        if end < 0:
            end = len(event)
        spans.append((start, end))
        at = event.find(b"data:", end)
    return spans


def splice_model(event: bytes, model_json: bytes) -> bytes:
    """Replace the top-level `model` value in each JSON `data:` line of the event."""
    if MODEL_KEY not in event:
        return event
    out = event
    # Work backwards so earlier spans stay valid after a splice changes the length.
    for start, end in reversed(data_payloads(event)):
        line = out[start:end]
        # The JSON may start after more spaces than the one the field syntax eats.
        if line.lstrip(b" \t")[:1] == b"{":
            new = replace_value(line, MODEL_KEY, model_json)
            if new is not line:
                out = out[:start] + new + out[end:]
    return out


def splice_nested(line: bytes, path: tuple[bytes, ...], model_json: bytes) -> bytes:
    """Replace `model` in the object at `path` (raw keys, e.g. (b'"response"',)) of one
    data line's JSON: the responses and messages families keep it there."""
    start: int | None = 0
    for raw_key in path:
        start = object_start(line, raw_key, start or 0)
        if start is None:
            return line
    return replace_value(line, MODEL_KEY, model_json, start or 0)


class NestedSplicer:
    """Splicer's counterpart for events whose `model` sits in a nested object. Only the
    few events that name a `model` at all (a stream's lifecycle events) are looked at:
    every other block passes with one bytes search."""

    __slots__ = ("model_json", "path")

    def __init__(self, model_json: bytes, path: tuple[str, ...]) -> None:
        self.model_json = model_json
        self.path = tuple(orjson.dumps(name) for name in path)

    def event(self, event: bytes) -> bytes:
        if MODEL_KEY not in event:
            return event
        out = event
        for start, end in reversed(data_payloads(event)):
            line = out[start:end]
            stripped = line.lstrip(b" \t")
            if stripped[:1] == b"{":
                new = splice_nested(stripped, self.path, self.model_json)
                if new is not stripped:
                    out = out[:start] + line[: len(line) - len(stripped)] + new + out[end:]
        return out

    def block(self, block: bytes) -> bytes:
        """Only the `data:` lines that name a `model` are cut out and rewritten (a
        stream's lifecycle events); everything between them passes as one slice. A line,
        not its event, is the unit: the rewrite reads one line's JSON (see event())."""
        at = block.find(MODEL_KEY)
        if at < 0:
            return block
        parts: list[bytes] = []
        done = 0
        while at >= 0:
            start = max(block.rfind(b"\n", done, at), block.rfind(b"\r", done, at)) + 1
            end = _line_end(block, at)
            if block.startswith(b"data:", start):
                json_at = start + 5
                while json_at < end and block[json_at] in b" \t":
                    json_at += 1
                if block.startswith(b"{", json_at):
                    line = block[json_at:end]
                    new = splice_nested(line, self.path, self.model_json)
                    if new is not line:
                        parts += (block[done:json_at], new)
                        done = end
            at = block.find(MODEL_KEY, end)
        if not parts:
            return block
        parts.append(block[done:])
        return b"".join(parts)


def _line_end(block: bytes, at: int) -> int:
    """Where the line holding `at` ends (its CR or LF), or the block's end."""
    lf = block.find(b"\n", at)
    cr = block.find(b"\r", at, lf if lf >= 0 else len(block))
    if cr >= 0:
        return cr
    return lf if lf >= 0 else len(block)


def splicer_for(path: tuple[str, ...] | None, model_json: bytes) -> Splicer | NestedSplicer:
    """The splicer for a family's events: top-level `model` (chat) or nested."""
    if path:
        return NestedSplicer(model_json, path)
    return Splicer(model_json)


# What an event means to the relay before commit.
NOTHING, CONTENT, ERROR, DONE = 0, 1, 2, 3
_CONTENT_FIELDS = (
    "content",
    "tool_calls",
    "function_call",
    "refusal",
    "reasoning_content",
    "reasoning",
)


def payload_of(event: bytes) -> bytes | None:
    """The event's data (several `data:` lines joined by newlines); None without any."""
    spans = data_payloads(event)
    if len(spans) == 1:
        start, end = spans[0]
        return event[start:end]
    if not spans:
        return None
    return b"\n".join(event[s:e] for s, e in spans)


def read_payload(event: bytes) -> int | dict[str, Any]:
    """An event's data as a JSON object, or what it means without one: NOTHING (no data),
    DONE (`[DONE]`), CONTENT (data that is not a JSON object: not ours to judge, relay
    it). The first step of every family's classification."""
    payload = payload_of(event)
    if payload is None:
        return NOTHING
    if payload.strip() == b"[DONE]":
        return DONE
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return CONTENT
    return obj if isinstance(obj, dict) else CONTENT


def classify(event: bytes) -> int:
    """CONTENT once the model said something (text, tool calls, reasoning, a finish)."""
    obj = read_payload(event)
    if isinstance(obj, int):
        return obj
    if obj.get("error") is not None:
        return ERROR
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return NOTHING if "usage" in obj else CONTENT
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("text"):
            return CONTENT
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(f) for f in _CONTENT_FIELDS):
            return CONTENT
    return NOTHING
