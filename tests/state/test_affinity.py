"""gateway/state/affinity.py and the plan's use of it (SPEC §14, prompt-cache affinity): from
values, with an injected clock."""

from __future__ import annotations

import random

import orjson

from gateway.body import parse_body
from gateway.config.routes import Model, Provider, Routes, Target, WildcardIndex
from gateway.families import CHAT
from gateway.health import Health
from gateway.plan import build_plan
from gateway.state.affinity import Affinity
from gateway.strategies import Strategies
from tests.test_health import Clock


def _model(slug: str = "m", n: int = 2, strategy: str = "round_robin", **opts: float) -> Model:
    targets = tuple(
        Target(Provider(name=f"p{i}", base_url=f"http://127.0.0.1:{9000 + i}"), f"up{i}")
        for i in range(n)
    )
    return Model(slug=slug, id=slug, name=slug, targets=targets, strategy=strategy, **opts)


def _routes(*models: Model) -> Routes:
    by_slug = {m.slug: m for m in models}
    return Routes({}, by_slug, (), WildcardIndex({}, ()), by_slug)


class Now:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


async def test_a_pin_is_scoped_to_its_owner_session_and_slug_and_expires() -> None:
    now = Now()
    routes = _routes(_model("m", affinity_seconds=60.0), _model("n"))
    pins = Affinity(10, clock=now)
    pins.record(routes, "team", "s1", "m", ("p1", "up1"))
    assert await pins.lookup(routes, "team", "s1", ["m"]) == {"m": ("p1", "up1")}
    # Another key with the same session id, or another slug, is not pinned by it.
    assert await pins.lookup(routes, "other", "s1", ["m"]) is None
    assert await pins.lookup(routes, "team", "s1", ["n"]) is None
    assert await pins.lookup(routes, "team", "s2", ["m"]) is None
    now.t += 59.9
    assert await pins.lookup(routes, "team", "s1", ["m"]) == {"m": ("p1", "up1")}
    pins.record(routes, "team", "s1", "m", ("p1", "up1"))  # each request renews it
    now.t += 59.9
    assert await pins.lookup(routes, "team", "s1", ["m"]) == {"m": ("p1", "up1")}
    now.t += 0.2
    assert await pins.lookup(routes, "team", "s1", ["m"]) is None
    pins.record(routes, "team", "s1", "m", ("p0", "up0"))  # a new request: a new pin
    assert await pins.lookup(routes, "team", "s1", ["m"]) == {"m": ("p0", "up0")}
    assert len(pins) == 1


async def test_pins_are_bounded_least_recently_used_first() -> None:
    routes = _routes(_model())
    pins = Affinity(3)
    for i in range(3):
        pins.record(routes, "k", f"s{i}", "m", ("p0", "up0"))
    pins.record(routes, "k", "s0", "m", ("p1", "up1"))  # s0 used again: s1 is the oldest
    pins.record(routes, "k", "s3", "m", ("p0", "up0"))
    assert len(pins) == 3
    assert await pins.lookup(routes, "k", "s1", ["m"]) is None
    assert await pins.lookup(routes, "k", "s0", ["m"]) == {"m": ("p1", "up1")}
    for i in range(100_000):
        pins.record(routes, "k", f"flood{i}", "m", ("p0", "up0"))
    assert len(pins) == 3


async def test_no_pin_where_there_is_nothing_to_choose_or_affinity_is_off() -> None:
    routes = _routes(_model("one", n=1), _model("off", affinity_seconds=0.0))
    pins = Affinity(10)
    pins.record(routes, "k", "s", "one", ("p0", "up0"))
    pins.record(routes, "k", "s", "off", ("p0", "up0"))
    pins.record(routes, "k", "s", "unknown", ("p0", "up0"))
    assert len(pins) == 0
    assert await pins.lookup(routes, "k", "s", ["one", "off", "unknown"]) is None


def _plan(
    routes: Routes, body: dict[str, object], pins: dict[str, tuple[str, str]] | None
) -> list[str]:
    parsed = parse_body(orjson.dumps(body), CHAT)
    health = Health(Clock())
    strategies = Strategies(health, random.Random(7))
    plan = build_plan(routes, parsed, None, health, strategies, CHAT, None, pins)
    return [c.target.provider.name for c in plan]


def test_the_pinned_entry_goes_first_whatever_the_strategy() -> None:
    for strategy in ("round_robin", "weighted", "fallback", "least_busy", "latency"):
        routes = _routes(_model(n=3, strategy=strategy))
        health = Health(Clock())
        strategies = Strategies(health, random.Random(1))
        parsed = parse_body(
            b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', CHAT
        )
        firsts = set()
        for _ in range(50):
            plan = build_plan(
                routes, parsed, None, health, strategies, CHAT, None, {"m": ("p2", "up2")}
            )
            firsts.add(plan[0].target.provider.name)
            assert sorted(c.target.provider.name for c in plan) == ["p0", "p1", "p2"]
        assert firsts == {"p2"}, strategy


def test_the_requests_own_choices_come_first() -> None:
    routes = _routes(_model(n=3, strategy="fallback"))
    pin = {"m": ("p2", "up2")}
    body: dict[str, object] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert _plan(routes, body, pin) == ["p2", "p0", "p1"]
    # provider.only / ignore leave the pin out: the strategy places what is left.
    assert _plan(routes, {**body, "provider": {"ignore": ["p2"]}}, pin) == ["p0", "p1"]
    assert _plan(routes, {**body, "provider": {"only": ["p1", "p2"]}}, pin) == ["p2", "p1"]
    # An explicit order or a sort outranks the pin.
    order = {"order": ["p1", "p0", "p2"]}
    assert _plan(routes, {**body, "provider": order}, pin) == ["p1", "p0", "p2"]
    assert _plan(routes, {**body, "provider": {"sort": "price"}}, pin) == ["p0", "p1", "p2"]
    # A pin to an entry the model no longer has changes nothing.
    assert _plan(routes, body, {"m": ("gone", "up9")}) == ["p0", "p1", "p2"]
    # Under `models`, a pin orders its own slug's entries, never the slugs.
    two = _routes(_model("m", n=2, strategy="fallback"), _model("n", n=2, strategy="fallback"))
    both = {"models": ["m", "n"], "messages": [{"role": "user", "content": "hi"}]}
    plan = _plan(two, both, {"n": ("p1", "up1")})
    assert plan == ["p0", "p1", "p1", "p0"]
