"""A request's token estimate before any upstream has counted it (SPEC §13): what a
budget or quota reserves at admission, and what is charged when no usage comes back.

The prompt is every text the upstream will read, wherever the body puts it (messages,
input, system, instructions, tools, tool results, documents): every string in the body
but the gateway's own members, at 4 UTF-8 bytes a token, plus a flat 1,000 tokens for each
image and each audio item (their bytes are not text). Counting every string rather than
a list of known fields is the point: a tenant cannot hide a prompt in a member the
estimate does not read.
"""

from __future__ import annotations

from typing import Any

BYTES_PER_TOKEN = 4
MEDIA_TOKENS = 1_000  # each image or audio item
DEFAULT_OUTPUT = 4_096  # the output allowance of a request that declares no limit
# The members that declare an output limit, in each family's spelling.
OUTPUT_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Top-level members the upstream never reads as text: `model` is replaced, the rest are
# the gateway's own (body.GATEWAY_FIELDS) and are removed before the upstream.
_NOT_PROMPT = frozenset({"model", "models", "route", "provider", "session_id"})
# A content item of one of these types is an image or audio: counted flat, not by bytes
# (OpenAI chat's image_url / input_audio, Responses' input_image / input_audio,
# Anthropic's image).
_MEDIA_TYPES = frozenset({"image_url", "input_image", "image", "input_audio", "audio"})


def prompt_tokens(body: Any) -> int:
    """The estimate of a decoded JSON body's prompt, in tokens (at least 1 for a body
    with any text)."""
    if not isinstance(body, dict):
        return _tokens(*_walk(body))
    text = media = 0
    for name, value in body.items():
        if name not in _NOT_PROMPT:
            t, m = _walk(value)
            text += t
            media += m
    return _tokens(text, media)


def text_tokens(byte_count: int) -> int:
    """Relayed output's estimate from its size in bytes."""
    return -(-byte_count // BYTES_PER_TOKEN)


def output_allowance(body: Any) -> int:
    """The request's declared output limit, DEFAULT_OUTPUT when it declares none."""
    if isinstance(body, dict):
        for name in OUTPUT_LIMITS:
            value = body.get(name)
            if value.__class__ is int and value >= 0:
                return int(value)
    return DEFAULT_OUTPUT


def _tokens(text_bytes: int, media: int) -> int:
    return text_tokens(text_bytes) + media * MEDIA_TOKENS


def _walk(value: Any) -> tuple[int, int]:
    """(UTF-8 bytes of every string, media items) below `value`, without recursion: a
    body nested to msgspec's depth limit must not exhaust the interpreter's stack."""
    text = media = 0
    stack = [value]
    pop, push = stack.pop, stack.append
    while stack:
        item = pop()
        kind = item.__class__
        if kind is str:
            text += len(item) if item.isascii() else len(item.encode("utf-8", "replace"))
        elif kind is list:
            stack.extend(item)
        elif kind is dict:
            kind = item.get("type")
            if kind.__class__ is str and kind in _MEDIA_TYPES:
                media += 1
                continue
            for name, member in item.items():
                # Keys are read too (a tool's parameter names are prompt).
                push(name)
                push(member)
    return text, media
