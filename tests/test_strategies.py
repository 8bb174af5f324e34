"""gateway/strategies.py: how each strategy orders a model's entries."""

from __future__ import annotations

import random
from collections import Counter

import orjson
import pytest

from gateway.body import parse_body
from gateway.config.routes import Model, Provider, Target
from gateway.errors import (
    BadRequest,
    GatewayError,
    ValidationFailed,
)
from gateway.families import CHAT, COMPLETIONS
from gateway.health import Health
from gateway.strategies import Strategies
from tests.test_health import Clock  # the injected clock health reads

MODEL = b'"model"'


# --------------------------------------------------------------------------- strategies


def _model(strategy: str, weights: list[float]) -> Model:
    targets = tuple(
        Target(Provider(name=f"p{i}", base_url=f"http://127.0.0.1:{9000 + i}"), None, w)
        for i, w in enumerate(weights)
    )
    return Model(slug="s", id="s", name="s", targets=targets, strategy=strategy)


def _entry_keys(model: Model) -> list[tuple[str, str, str]]:
    return [(t.provider.name, "s", "") for t in model.targets]


def test_fallback_keeps_file_order() -> None:
    model = _model("fallback", [1, 1, 1])
    strategies = Strategies(Health(Clock()), random.Random(1))
    for _ in range(3):
        assert strategies.order(model, "s", _entry_keys(model)) == [0, 1, 2]


def test_round_robin_rotates() -> None:
    model = _model("round_robin", [1, 1, 1])
    strategies = Strategies(Health(Clock()), random.Random(1))
    orders = [strategies.order(model, "s", _entry_keys(model)) for _ in range(4)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_weighted_respects_weights_and_never_picks_zero() -> None:
    model = _model("weighted", [3, 1, 0])
    strategies = Strategies(Health(Clock()), random.Random(12345))
    firsts: Counter[int] = Counter()
    runs = 4000
    for _ in range(runs):
        order = strategies.order(model, "s", _entry_keys(model))
        assert 2 not in order
        assert sorted(order) == [0, 1]
        firsts[order[0]] += 1
    share = firsts[0] / runs
    assert 0.68 < share < 0.82, share


def test_weighted_all_equal_is_roughly_uniform() -> None:
    model = _model("weighted", [1, 1, 1, 1])
    strategies = Strategies(Health(Clock()), random.Random(99))
    firsts: Counter[int] = Counter(
        strategies.order(model, "s", _entry_keys(model))[0] for _ in range(4000)
    )
    assert set(firsts) == {0, 1, 2, 3}
    assert all(800 < n < 1200 for n in firsts.values()), firsts


def test_least_busy_prefers_fewest_in_flight() -> None:
    health = Health(Clock())
    model = _model("least_busy", [1, 1, 1])
    keys = _entry_keys(model)
    strategies = Strategies(health, random.Random(1))
    for _ in range(3):
        health.begin(keys[0])
    health.begin(keys[1])
    assert strategies.order(model, "s", keys) == [2, 1, 0]
    for _ in range(3):
        health.begin(keys[2])
    health.end(keys[0])
    health.end(keys[0])
    # in flight: 1, 1, 3
    assert strategies.order(model, "s", keys)[-1] == 2


class _NoExplore(random.Random):
    def random(self) -> float:
        return 0.999


def test_latency_prefers_lower_ewma() -> None:
    health = Health(Clock())
    model = _model("latency", [1, 1, 1])
    keys = _entry_keys(model)
    health.succeeded(keys[0], 0.5)
    health.succeeded(keys[1], 0.1)
    health.succeeded(keys[2], 0.3)
    assert Strategies(health, _NoExplore()).order(model, "s", keys) == [1, 2, 0]
    # With real randomness, exploration is occasional: the fastest still leads mostly.
    strategies = Strategies(health, random.Random(5))
    firsts = Counter(strategies.order(model, "s", keys)[0] for _ in range(1000))
    assert firsts[1] > 850
    # The average moves: entry 1 slows down, entry 2 becomes the fastest.
    for _ in range(40):
        health.succeeded(keys[1], 2.0)
    assert Strategies(health, _NoExplore()).order(model, "s", keys)[0] == 2


def test_latency_tries_unmeasured_entries_first() -> None:
    health = Health(Clock())
    model = _model("latency", [1, 1])
    keys = _entry_keys(model)
    health.succeeded(keys[0], 0.01)
    assert Strategies(health, _NoExplore()).order(model, "s", keys) == [1, 0]


def test_single_target_is_trivial_for_every_strategy() -> None:
    for name in ("fallback", "round_robin", "weighted", "least_busy", "latency"):
        model = _model(name, [1])
        assert Strategies(Health(Clock()), random.Random(1)).order(
            model, "s", _entry_keys(model)
        ) == [0]


def test_gateway_errors_envelope() -> None:
    body = orjson.loads(GatewayError("boom", {"x": 1}).body())
    assert body == {
        "error": {
            "message": "boom",
            "type": "server_error",
            "code": "internal_error",
            "param": None,
            "details": {"x": 1},
        }
    }


@pytest.mark.parametrize("bad_at", [0, (1 << 20) - 1, 1 << 20, (3 << 20) - 5])
def test_parse_body_checks_utf8_of_large_bodies_a_window_at_a_time(bad_at: int) -> None:
    """Skipped strings are checked for UTF-8 too, in windows; a character split across
    a window's edge is fine, a bad byte anywhere is 400."""
    text = "é" * (3 << 19)  # 3 MiB of two-byte characters: every window edge splits none
    raw = orjson.dumps({"model": "a", "messages": [{"role": "user", "content": "x" + text}]})
    assert parse_body(raw, CHAT).slugs == ("a",)  # the odd offset splits them
    start = raw.index(b"x") + 1
    broken = raw[: start + bad_at] + b"\xff" + raw[start + bad_at + 1 :]
    with pytest.raises(BadRequest) as info:
        parse_body(broken, CHAT)
    assert info.value.details["cause"] == "json"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"model":"a","messages":[ \n ]}', "messages"),
        (b'{"model":"a","messages":null}', "messages"),
        (b'{"model":"a","messages":{"role":"user"}}', "messages"),
        (b'{"model":"a"}', "messages"),
    ],
)
def test_parse_body_needs_a_non_empty_messages_list(raw: bytes, field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_body(raw, CHAT)
    assert info.value.details["field"] == field


def test_parse_body_needs_a_prompt_that_is_not_null() -> None:
    with pytest.raises(ValidationFailed):
        parse_body(b'{"model":"a","prompt":null}', COMPLETIONS)
    assert parse_body(b'{"model":"a","prompt":""}', COMPLETIONS).slugs == ("a",)


def test_parse_body_counts_the_prompt_only_when_asked() -> None:
    raw = b'{"model":"a","messages":[{"role":"user","content":"abcd"},{"content":[{"text":"ef"}]}]}'
    assert parse_body(raw, CHAT).prompt_tokens == 0
    # Every string the upstream reads (gateway/wire/estimate.py): "role" "user" "content"
    # "abcd" "content" "text" "ef" = 32 bytes, 8 tokens; the allowance by default.
    counted = parse_body(raw, CHAT, count_prompt=True)
    assert (counted.prompt_tokens, counted.output_allowance) == (8, 4096)
