"""gateway/wire/usage.py: prompt tokens by kind from every family's usage object."""

from __future__ import annotations

from gateway.wire.usage import prompt_kinds


def test_openai_chat_totals_hold_their_cached_part() -> None:
    usage = {"prompt_tokens": 1000, "completion_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 800}}  # fmt: skip
    assert prompt_kinds(usage) == (800, 0, 200)


def test_responses_totals_hold_their_cached_part() -> None:
    usage = {"input_tokens": 1000, "output_tokens": 5,
             "input_tokens_details": {"cached_tokens": 600}}  # fmt: skip
    assert prompt_kinds(usage) == (600, 0, 400)


def test_anthropic_input_tokens_hold_neither_reads_nor_writes() -> None:
    usage = {"input_tokens": 12, "output_tokens": 5, "cache_read_input_tokens": 900,
             "cache_creation_input_tokens": 300}  # fmt: skip
    assert prompt_kinds(usage) == (900, 300, 12)


def test_no_cache_is_all_uncached_and_junk_counts_nothing() -> None:
    assert prompt_kinds({"prompt_tokens": 7, "completion_tokens": 1}) == (0, 0, 7)
    assert prompt_kinds({"input_tokens": "x", "cache_read_input_tokens": -3}) == (0, 0, 0)
    assert prompt_kinds({}) == (0, 0, 0)
