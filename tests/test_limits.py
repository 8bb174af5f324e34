"""gateway/limits.py's reservations (SPEC §13), from values: any interleaving of
admissions and settlements keeps a quota and a budget within one request's overshoot."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config.keys import Key
from gateway.config.routes import Price
from gateway.errors import QuotaExhausted
from gateway.limits import Limiter
from gateway.reservation import Ask, Hold, Reservation, ask_for

QUOTA = 1_000
BUDGET = 0.01
PRICE = Price(input=1.0, output=2.0)  # USD per 1M tokens


def limiter() -> Limiter:
    return Limiter(clock=lambda: 1000.0, wall=lambda: datetime(2026, 12, 7, tzinfo=UTC))


def quota_key() -> Key:
    return Key("k", b"", token_quota=QUOTA, quota_period="day")


def budget_key() -> Key:
    return Key("k", b"", budget_usd=BUDGET, budget_period="month")


def spent_tokens(lim: Limiter) -> int:
    return lim.usage["k"].periods["day"].tokens


def spent_usd(lim: Limiter) -> float:
    return lim.usage["k"].periods["month"].usd


# A request: its prompt estimate, its output allowance, and how much of prompt +
# allowance it really costs (an honest upstream keeps to max_tokens).
_REQUEST = st.tuples(
    st.integers(0, 600), st.integers(0, 4096), st.floats(0.0, 1.0, allow_nan=False)
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_REQUEST, min_size=1, max_size=40), st.lists(st.booleans(), max_size=120))
def test_any_interleaving_passes_the_quota_by_at_most_one_requests_overshoot(
    requests: list[tuple[int, int, float]], order: list[bool]
) -> None:
    lim, key = limiter(), quota_key()
    running: list[tuple[Reservation, int]] = []
    worst = 0  # the largest real charge minus its reservation
    waiting = list(requests)
    steps = iter(order)
    while waiting or running:
        admit = next(steps, not running) if waiting and running else bool(waiting)
        if admit:
            prompt, allowance, share = waiting.pop(0)
            held = lim.usage["k"].held_tokens if "k" in lim.usage else 0
            remaining = QUOTA - (spent_tokens(lim) if "k" in lim.usage else 0)
            try:
                _, hold = lim.reserve(key, Ask(prompt, prompt + allowance))
            except QuotaExhausted:
                # Never refused when nothing else holds and the prompt fits.
                assert held > 0 or prompt > remaining or remaining <= 0
                continue
            real = prompt + round(allowance * share)
            worst = max(worst, real - hold.tokens)
            running.append((hold, real))
        else:
            hold, real = running.pop(0)
            hold.settle(real, 0.0)
            assert hold.state is Hold.SETTLED
        assert spent_tokens(lim) <= QUOTA + worst
    assert lim.usage["k"].held_tokens == 0 and lim.usage["k"].partial == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(_REQUEST, min_size=1, max_size=30), st.lists(st.booleans(), max_size=90))
def test_any_interleaving_passes_the_budget_by_at_most_one_requests_overshoot(
    requests: list[tuple[int, int, float]], order: list[bool]
) -> None:
    lim, key = limiter(), budget_key()
    running: list[tuple[Reservation, float]] = []
    worst = 0.0
    waiting = list(requests)
    steps = iter(order)
    while waiting or running:
        admit = next(steps, not running) if waiting and running else bool(waiting)
        if admit:
            prompt, allowance, share = waiting.pop(0)
            ask = ask_for(key, prompt * 20, allowance * 20, [PRICE, None])
            try:
                _, hold = lim.reserve(key, ask)
            except QuotaExhausted:
                continue
            real = PRICE.cost(prompt * 20, 0, round(allowance * 20 * share))
            worst = max(worst, real - hold.usd)
            running.append((hold, real))
        else:
            hold, real = running.pop(0)
            hold.settle(1, real)
        assert spent_usd(lim) <= BUDGET + worst + 1e-12
    assert lim.usage["k"].held_usd == pytest.approx(0.0, abs=1e-12)


def test_a_small_quota_serves_one_request_at_a_time() -> None:
    lim, key = limiter(), quota_key()
    _, first = lim.reserve(key, Ask(10, 10 + 4096))
    assert first.tokens == QUOTA and first.partial  # capped at what remains
    with pytest.raises(QuotaExhausted) as refused:
        lim.reserve(key, Ask(10, 10 + 4096))
    assert refused.value.details["held"] == QUOTA
    first.settle(50, 0.0)
    _, second = lim.reserve(key, Ask(10, 10 + 4096))
    assert second.tokens == QUOTA - 50


def test_a_prompt_that_does_not_fit_what_remains_is_refused() -> None:
    lim, key = limiter(), quota_key()
    with pytest.raises(QuotaExhausted):
        lim.reserve(key, Ask(QUOTA + 1, QUOTA + 1))
    _, hold = lim.reserve(key, Ask(QUOTA, QUOTA))  # exactly what remains fits
    assert hold.tokens == QUOTA and not hold.partial


def test_one_capped_hold_at_a_time() -> None:
    """A second request that would also be held short waits for the first, even when
    its prompt fits: two short holds could each overshoot."""
    lim, key = limiter(), quota_key()
    _, small = lim.reserve(key, Ask(100, 300))  # a full hold
    _, capped = lim.reserve(key, Ask(100, 900))  # 700 remain: capped
    assert capped.partial and capped.tokens == 700
    small.settle(100, 0.0)  # 200 come free
    with pytest.raises(QuotaExhausted):
        lim.reserve(key, Ask(100, 900))  # would be capped too
    _, fits = lim.reserve(key, Ask(100, 150))  # a full hold still passes
    assert not fits.partial


def test_release_charges_nothing_and_ends_once() -> None:
    lim, key = limiter(), quota_key()
    _, hold = lim.reserve(key, Ask(10, 100))
    hold.release()
    hold.settle(500, 0.0)  # a second end is a no-op
    assert hold.state is Hold.RELEASED
    assert spent_tokens(lim) == 0 and lim.usage["k"].held_tokens == 0


def test_a_budget_prices_the_ask_at_the_dearest_candidate() -> None:
    key = budget_key()
    cheap, dear = Price(1.0, 1.0), Price(1.0, 10.0)
    ask = ask_for(key, 1000, 1000, [cheap, None, dear])
    assert ask.price is dear
    assert ask.prompt_usd == pytest.approx(0.001)
    assert ask.hold_usd == pytest.approx(0.011)
    assert ask_for(key, 1000, 1000, [None]).hold_usd == 0.0  # unpriced: nothing to hold
