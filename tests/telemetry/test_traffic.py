"""The console's 15 minutes (telemetry/traffic.py) from values: points from the metrics
on an injected wall clock, and the prompt cache per key and per session (SPEC §14) from
usage of every family handed to Runtime.served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.body import ParsedBody
from gateway.config import load_config
from gateway.config.keys import Key
from gateway.config.settings import Settings
from gateway.exchange import Outcome, Request
from gateway.runtime import Runtime
from gateway.telemetry.metrics import Metrics
from gateway.telemetry.traffic import (
    MAX_SESSIONS,
    OTHER,
    SESSION_CHARS,
    TOP_KEYS,
    TOP_SESSIONS,
    TOP_WINDOW,
    Traffic,
)

# The same 1,000 prompt tokens in each family's words.
OPENAI = {"prompt_tokens": 1000, "completion_tokens": 5,
          "prompt_tokens_details": {"cached_tokens": 800}}  # fmt: skip
ANTHROPIC = {"input_tokens": 50, "cache_read_input_tokens": 900,
             "cache_creation_input_tokens": 50, "output_tokens": 5}  # fmt: skip
RESPONSES = {"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 600},
             "output_tokens": 5}  # fmt: skip


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    routes, keys = tmp_path / "routes.yaml", tmp_path / "keys.yaml"
    routes.write_text(
        "providers:\n  p: {base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n  m:\n    providers:\n      - {provider: p}\n"
    )
    keys.write_text("keys:\n  - {name: team, key: sk-team}\n  - {name: ops, key: sk-ops}\n")
    runtime = Runtime(Settings(), load_config(str(routes), str(keys)))
    # The access line is not these tests' concern: an earlier test in this process may
    # have left its logger writing to a stream pytest has closed since.
    runtime.access.enabled = lambda: False  # type: ignore[method-assign]
    return runtime


def key(runtime: Runtime, name: str) -> Key:
    return next(k for k in runtime.config.keys.entries if k.name == name)


def serve(
    runtime: Runtime, key: Key | None, usage: dict[str, Any] | None, session: str | None
) -> None:
    async def send(message: Any) -> None:
        pass

    parsed = ParsedBody(b"{}", ("m",), False, session, None, False)
    req = Request(send=send, request_id=b"r", path="/chat/completions", client_headers=[],
                  parsed=parsed)  # fmt: skip
    out = Outcome(status=200, slug="m", label="m", provider="p", usage=usage)
    runtime.served(req, out, key, 0, 0.01)


def with_clock(runtime: Runtime) -> Clock:
    clock = Clock()
    runtime.traffic = Traffic(runtime.metrics, wall=clock)
    return clock


def test_every_familys_cached_tokens_reach_the_key_and_session_ratios(
    runtime: Runtime,
) -> None:
    clock = with_clock(runtime)
    team = key(runtime, "team")
    serve(runtime, team, OPENAI, "s-openai")
    serve(runtime, team, ANTHROPIC, "s-anthropic")
    clock.now += 10
    runtime.traffic.sample()  # a finished point, then the point in progress
    serve(runtime, team, RESPONSES, "s-responses")
    serve(runtime, team, OPENAI, "s-openai")
    serve(runtime, key(runtime, "ops"), RESPONSES, None)  # no session: the key's only
    serve(runtime, None, ANTHROPIC, "anonymous")  # no key: "(none)", as tokens are
    clock.now += 4

    points = runtime.traffic.view()
    assert [p["t"] for p in points] == [1_000_010.0, 1_000_014.0]
    assert points[0]["prompt_cache"] == {"team": {"prompt": 2000, "cache_read": 1700}}
    assert points[1]["prompt_cache"] == {
        "team": {"prompt": 2000, "cache_read": 1400},
        "ops": {"prompt": 1000, "cache_read": 600},
        "(none)": {"prompt": 1000, "cache_read": 900},
    }
    window = runtime.traffic.prompt_cache(points)
    assert window["keys"] == [
        {"key": "team", "prompt": 4000, "cache_read": 3100, "hit_ratio": 0.775},
        {"key": "(none)", "prompt": 1000, "cache_read": 900, "hit_ratio": 0.9},
        {"key": "ops", "prompt": 1000, "cache_read": 600, "hit_ratio": 0.6},
    ]
    assert window["sessions"] == [
        {"key": "team", "session": "s-openai", "prompt": 2000, "cache_read": 1600,
         "hit_ratio": 0.8},
        {"key": "(none)", "session": "anonymous", "prompt": 1000, "cache_read": 900,
         "hit_ratio": 0.9},
        {"key": "team", "session": "s-anthropic", "prompt": 1000, "cache_read": 900,
         "hit_ratio": 0.9},
        {"key": "team", "session": "s-responses", "prompt": 1000, "cache_read": 600,
         "hit_ratio": 0.6},
    ]  # fmt: skip


def test_a_request_without_a_session_or_usage_adds_no_session(runtime: Runtime) -> None:
    def refuse(*args: Any) -> None:
        raise AssertionError("prompted without a session")

    runtime.traffic.prompted = refuse  # type: ignore[method-assign]
    serve(runtime, key(runtime, "team"), OPENAI, None)
    runtime.traffic = Traffic(runtime.metrics)
    serve(runtime, key(runtime, "team"), None, "s")  # no usage: nothing to divide
    serve(runtime, key(runtime, "team"), {"completion_tokens": 3}, "s")  # no prompt
    assert runtime.traffic.sessions.pairs == {}
    assert runtime.traffic.prompt_cache(runtime.traffic.view())["sessions"] == []


def test_a_key_without_cache_reads_has_a_zero_ratio_and_no_prompt_none() -> None:
    metrics = Metrics()
    traffic = Traffic(metrics, wall=Clock())
    metrics.prompt_tokens("team", "m", "p", "uncached").inc(300)
    traffic.prompted("team", "s", 0, 300)
    window = traffic.prompt_cache(traffic.view())
    assert window["keys"] == [{"key": "team", "prompt": 300, "cache_read": 0, "hit_ratio": 0.0}]
    assert window["sessions"][0]["hit_ratio"] == 0.0
    empty = Traffic(Metrics(), wall=Clock())
    assert empty.prompt_cache(empty.view()) == {"keys": [], "sessions": []}


def test_a_point_counts_at_most_max_sessions_apart_and_keeps_its_top() -> None:
    clock = Clock()
    traffic = Traffic(Metrics(), wall=clock)
    # More distinct sessions than a point counts apart: the later ones go to "(other)"
    # whatever their size, so memory holds MAX_SESSIONS pairs at most.
    for i in range(MAX_SESSIONS):
        traffic.prompted("team", f"s{i}", i % 2, 10 + i)
    for i in range(500):
        traffic.prompted("team", f"late{i}", 1, 100_000)
    traffic.prompted("team", "s0", 5, 10)  # a counted pair keeps counting
    assert len(traffic.sessions.pairs) == MAX_SESSIONS
    assert traffic.sessions.rest == [500 * 100_000, 500]

    clock.now += 10
    traffic.sample()
    kept = traffic.session_points[-1]
    assert len(kept) == TOP_SESSIONS + 1
    top = [session for _, session in list(kept)[:TOP_SESSIONS]]
    assert top == [f"s{i}" for i in range(MAX_SESSIONS - 1, MAX_SESSIONS - 1 - TOP_SESSIONS, -1)]
    # Nothing lost: "(other)" holds the pairs below the top and the ones never counted.
    total_prompt = sum(10 + i for i in range(MAX_SESSIONS)) + 10 + 500 * 100_000
    total_read = sum(i % 2 for i in range(MAX_SESSIONS)) + 5 + 500
    assert sum(p for p, _ in kept.values()) == total_prompt
    assert sum(r for _, r in kept.values()) == total_read
    assert list(kept)[-1] == (OTHER, OTHER)
    assert traffic.sessions.pairs == {}  # the next point starts empty


def test_the_window_sums_points_and_shows_its_top_then_other() -> None:
    clock = Clock()
    traffic = Traffic(Metrics(), wall=clock)
    # A client may call its session "(other)": it stays a session of its key, apart
    # from the "(other)" row of the sessions past the top (whose key is "(other)").
    traffic.prompted("team", OTHER, 250, 500)
    for point in range(3):
        for i in range(10):
            traffic.prompted("team", f"s{point}-{i}", 5, 10 + i)
        clock.now += 10
        traffic.sample()
    traffic.prompted("team", "s0-0", 10, 1000)  # the point in progress counts too
    window = traffic.prompt_cache(traffic.view())["sessions"]
    assert len(window) == TOP_WINDOW + 1
    assert window[0] == {"key": "team", "session": "s0-0", "prompt": 1010,
                         "cache_read": 15, "hit_ratio": 0.0149}  # fmt: skip
    assert window[1] == {"key": "team", "session": OTHER, "prompt": 500,
                         "cache_read": 250, "hit_ratio": 0.5}  # fmt: skip
    assert window[-1]["key"] == OTHER and window[-1]["session"] == OTHER
    assert sum(s["prompt"] for s in window) == 500 + sum(10 + i for i in range(10)) * 3 + 1000
    assert sum(s["cache_read"] for s in window) == 250 + 5 * 30 + 10


def test_keys_past_top_keys_are_one_other_per_point() -> None:
    metrics = Metrics()
    clock = Clock()
    traffic = Traffic(metrics, wall=clock)
    for i in range(TOP_KEYS + 3):
        metrics.prompt_tokens(f"k{i}", "m", "p", "uncached").inc(100 + i)
        metrics.prompt_tokens(f"k{i}", "m", "p", "cache_read").inc(100)
    clock.now += 10
    traffic.sample()
    per_key = traffic.points[-1]["prompt_cache"]
    assert len(per_key) == TOP_KEYS + 1
    assert per_key[OTHER] == {"prompt": 200 + 201 + 202, "cache_read": 300}
    assert per_key[f"k{TOP_KEYS + 2}"] == {"prompt": 100 + TOP_KEYS + 2 + 100, "cache_read": 100}
    # The next point is a difference: nothing new, no entry.
    clock.now += 10
    traffic.sample()
    assert traffic.points[-1]["prompt_cache"] == {}


def test_a_long_session_id_is_kept_cut_to_session_chars() -> None:
    traffic = Traffic(Metrics(), wall=Clock())
    long = "x" * 70_000  # a header may carry up to --max-header-bytes
    traffic.prompted("team", long, 1, 2)
    traffic.prompted("team", long + "y", 1, 2)  # the same first SESSION_CHARS: one row
    assert list(traffic.sessions.pairs) == [("team", "x" * SESSION_CHARS)]
    assert traffic.sessions.pairs[("team", "x" * SESSION_CHARS)] == [4, 2]


def test_the_ring_keeps_fifteen_minutes_of_sessions() -> None:
    clock = Clock()
    traffic = Traffic(Metrics(), wall=clock)
    traffic.prompted("team", "old", 1, 1)
    for _ in range(91):
        clock.now += 10
        traffic.sample()
    assert len(traffic.session_points) == 90
    assert traffic.prompt_cache(traffic.view())["sessions"] == []
