"""gateway/wire/estimate.py: the prompt estimate reads every string the upstream reads."""

from __future__ import annotations

import json

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from gateway.wire.estimate import (
    DEFAULT_OUTPUT,
    MEDIA_TOKENS,
    output_allowance,
    prompt_tokens,
    text_tokens,
)

BIG = "x" * 400_000  # 400 KB of text: 100,000 tokens wherever it hides


def tokens_of(body: object) -> int:
    return prompt_tokens(json.loads(json.dumps(body)))


def test_text_is_four_bytes_a_token_rounded_up() -> None:
    assert text_tokens(0) == 0
    assert text_tokens(1) == 1
    assert text_tokens(4) == 1
    assert text_tokens(5) == 2


def test_message_text_counts_by_utf8_bytes() -> None:
    # "role" "user" "content" are read too: 15 bytes; "é" is two bytes, "💡" four.
    assert tokens_of({"model": "m", "messages": [{"role": "user", "content": "é💡"}]}) == 6


def test_the_gateways_own_members_and_model_are_not_prompt() -> None:
    body = {"model": "m" * 400, "models": ["a" * 400], "session_id": "s" * 100,
            "route": "fallback", "provider": {"order": ["p" * 400]}, "input": "hi"}  # fmt: skip
    assert tokens_of(body) == 1


def test_a_prompt_hidden_anywhere_is_counted() -> None:
    """Tools, system, instructions, tool results, unknown members: all read upstream."""
    hidden = [
        {"model": "m", "messages": [{"role": "user", "content": "hi"}],
         "tools": [{"type": "function", "function": {"name": "f", "description": BIG}}]},
        {"model": "m", "system": BIG, "messages": [{"role": "user", "content": "hi"}]},
        {"model": "m", "instructions": BIG, "input": "hi"},
        {"model": "m", "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": BIG}]}
        ]}]},
        {"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": BIG}]},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "x_unknown": {"a": BIG}},
    ]  # fmt: skip
    for body in hidden:
        assert tokens_of(body) >= 100_000, body


def test_images_and_audio_count_a_flat_thousand_whatever_their_size() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + BIG}}
    audio = {"type": "input_audio", "input_audio": {"data": BIG, "format": "wav"}}
    claude = {"type": "image", "source": {"type": "base64", "data": BIG}}
    body = {"model": "m", "messages": [{"role": "user", "content": [image, audio, claude]}]}
    assert tokens_of(body) == 3 * MEDIA_TOKENS + text_tokens(len("roleusercontent"))


def test_deep_nesting_costs_no_recursion() -> None:
    body: object = "deep"
    for _ in range(900):  # about msgspec's depth limit
        body = [body]
    assert prompt_tokens({"input": body}) == 1


def test_unhashable_type_values_are_text() -> None:
    assert tokens_of({"input": [{"type": ["image"], "text": "abcd"}]}) > 0


def test_output_allowance_is_the_declared_limit_else_the_default() -> None:
    assert output_allowance({"max_tokens": 10}) == 10
    assert output_allowance({"max_completion_tokens": 20}) == 20
    assert output_allowance({"max_output_tokens": 30}) == 30
    assert output_allowance({}) == DEFAULT_OUTPUT
    assert output_allowance({"max_tokens": "9"}) == DEFAULT_OUTPUT  # not a number
    assert output_allowance({"max_tokens": True}) == DEFAULT_OUTPUT
    assert output_allowance([]) == DEFAULT_OUTPUT


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=30,
)


@given(_JSON, st.text(min_size=1, max_size=50))
def test_adding_text_anywhere_never_lowers_the_estimate(body: object, extra: str) -> None:
    """The property a budget needs: more text in a request never makes it cheaper."""
    decoded = msgspec.json.decode(msgspec.json.encode({"input": body}))
    wider = msgspec.json.decode(msgspec.json.encode({"input": body, "more": extra}))
    assert prompt_tokens(wider) >= prompt_tokens(decoded)
    assert prompt_tokens(wider) >= text_tokens(len(extra.encode()))
