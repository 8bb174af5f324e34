"""gateway/health.py: the circuit breaker and latency scores, on an injected clock."""

from __future__ import annotations

import pytest

from gateway.config.routes import Cooldown
from gateway.health import Health

MODEL = b'"model"'


# --------------------------------------------------------------------------- health


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


E = ("p", "m", "")


def test_health_circuit_breaker_cycle() -> None:
    clock = Clock()
    health = Health(clock)
    cd = Cooldown(failures=3, seconds=30)
    assert health.available(E)
    # Closed: below the threshold the entry stays usable.
    for _ in range(2):
        health.begin(E)
        health.failed(E, cd)
        health.end(E)
        assert health.available(E)
    health.begin(E)
    health.failed(E, cd)
    health.end(E)
    assert not health.available(E)  # open
    assert health.retry_at(E) == pytest.approx(1030.0)
    clock.now = 1029.9
    assert not health.available(E)
    clock.now = 1030.0
    assert health.available(E)  # half-open: one probe may go
    health.begin(E)
    assert not health.available(E)  # while the probe runs nobody else gets it
    health.failed(E, cd)
    health.end(E)
    assert not health.available(E)  # failed probe: open again at once
    assert health.retry_at(E) == pytest.approx(1060.0)
    clock.now = 1059.0
    assert not health.available(E)
    clock.now = 1060.0
    assert health.available(E)
    health.begin(E)
    assert not health.available(E)
    health.succeeded(E, 0.1)
    health.end(E)
    assert health.available(E)  # closed
    # Closed again: the count starts over.
    for _ in range(2):
        health.begin(E)
        health.failed(E, cd)
        health.end(E)
    assert health.available(E)
    health.failed(E, cd)
    assert not health.available(E)


def test_health_failed_probe_reopens_even_below_threshold() -> None:
    clock = Clock()
    health = Health(clock)
    cd = Cooldown(failures=1, seconds=5)
    health.failed(E, cd)
    assert not health.available(E)
    clock.now += 5
    health.begin(E)
    # Far below a threshold of 100, yet the failed probe reopens the breaker.
    health.failed(E, Cooldown(failures=100, seconds=5))
    health.end(E)
    assert not health.available(E)


def test_health_success_resets_consecutive_failures() -> None:
    health = Health(Clock())
    cd = Cooldown(failures=2, seconds=30)
    health.failed(E, cd)
    health.succeeded(E)
    health.failed(E, cd)
    assert health.available(E)
    health.failed(E, cd)
    assert not health.available(E)


def test_health_retry_after_extends_cooldown() -> None:
    clock = Clock()
    health = Health(clock)
    health.failed(E, Cooldown(failures=1, seconds=10), retry_after=60)
    clock.now += 59
    assert not health.available(E)
    clock.now += 1
    assert health.available(E)


def test_health_entries_are_independent_and_track_in_flight() -> None:
    health = Health(Clock())
    other = ("p", "other", "")
    health.failed(E, Cooldown(failures=1, seconds=30))
    assert not health.available(E)
    assert health.available(other)
    health.begin(other)
    health.begin(other)
    assert health.state(other).in_flight == 2
    health.end(other)
    assert health.state(other).in_flight == 1


def test_health_latency_ewma() -> None:
    health = Health(Clock())
    health.succeeded(E, 1.0)
    assert health.state(E).latency == pytest.approx(1.0)
    health.succeeded(E, 2.0)
    assert 1.0 < health.state(E).latency < 2.0  # type: ignore[operator]
    health.succeeded(E)  # no measurement: unchanged
    value = health.state(E).latency
    for _ in range(50):
        health.succeeded(E, 0.1)
    assert health.state(E).latency == pytest.approx(0.1, abs=0.01)
    assert value is not None and value > 0.1
