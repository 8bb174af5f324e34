"""The console's last 15 minutes (SPEC §12): a ring of 90 ten-second points, each the
difference between two samples of the counters /metrics already keeps (requests,
their duration histogram, tokens, cost and prompt tokens by key). The request path does
no work for them: a timer takes a sample every STEP seconds, and a read adds the point
in progress.

Each point holds requests per second, errors, latency p50/p99 (from the histogram's
buckets: the upper bound of the bucket the quantile falls in), and tokens, cost and
prompt tokens (all of them and those read from the provider's cache) for the TOP_KEYS
keys that used most in it, the rest summed as "(other)". With `--workers N` a worker's
console shows that worker's traffic.

Sessions are no metric label (clients choose them, without bound), so the prompt cache
per session (SPEC §14) is the one thing counted on the request path: `prompted`, called
by Runtime.served for a request with a session and usage, adds to this point's table
of at most MAX_SESSIONS (key, session) pairs (later pairs summed as "(other)"); a
finished point keeps its TOP_SESSIONS by prompt tokens. The window's view sums them.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gateway.tasks import cancel
from gateway.telemetry.metrics import LATENCY_BUCKETS, Metrics

STEP = 10.0  # seconds per point
POINTS = 90  # 15 minutes
TOP_KEYS = 8
MAX_SESSIONS = 1000  # (key, session) pairs counted apart in one point
TOP_SESSIONS = 20  # kept by a finished point
TOP_WINDOW = 20  # keys and sessions shown for the window
SESSION_CHARS = 128  # of a session id kept (body session ids are at most 128 anyway)
OTHER = "(other)"


@dataclass(slots=True)
class Totals:
    """The counters at one instant."""

    at: float  # wall-clock seconds
    requests: float = 0.0
    errors: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    tokens: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    prompt: dict[str, float] = field(default_factory=dict)  # every prompt token, by key
    cache_read: dict[str, float] = field(default_factory=dict)  # those read from a cache


def _add(into: dict[str, float], key: str, value: float) -> None:
    into[key] = into.get(key, 0.0) + value


def totals(metrics: Metrics, at: float) -> Totals:
    out = Totals(at)
    for (_, _, status, _), counter in metrics.requests.children.items():
        out.requests += counter.value
        if status >= "400" and len(status) == 3:
            out.errors += counter.value
    for histogram in metrics.duration.children.values():
        for i, count in enumerate(histogram.counts):
            out.buckets[i] += count
    for (key, _), counter in metrics.tokens.children.items():
        _add(out.tokens, key or "(none)", counter.value)
    for (key, _, _), counter in metrics.cost.children.items():
        _add(out.cost, key or "(none)", counter.value)
    for (key, _, _, kind), counter in metrics.prompt_tokens.children.items():
        _add(out.prompt, key or "(none)", counter.value)
        if kind == "cache_read":
            _add(out.cache_read, key or "(none)", counter.value)
    return out


def _quantile(buckets: list[int], q: float) -> float | None:
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        seen += count
        if seen >= rank:
            bound = LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else LATENCY_BUCKETS[-1]
            return round(bound * 1000, 3)
    return None


def _top(now: dict[str, float], before: dict[str, float], digits: int) -> dict[str, float]:
    diff = {k: v - before.get(k, 0.0) for k, v in now.items()}
    used = sorted(((v, k) for k, v in diff.items() if v > 0), reverse=True)
    out = {k: round(v, digits) for v, k in used[:TOP_KEYS]}
    rest = sum(v for v, _ in used[TOP_KEYS:])
    if rest > 0:
        out[OTHER] = round(rest, digits)
    return out


def _prompt_cache(now: Totals, before: Totals) -> dict[str, dict[str, int]]:
    """{key: {"prompt": n, "cache_read": m}} for the TOP_KEYS keys with most prompt
    tokens in the point, the rest as "(other)"."""
    used = {}
    for key, value in now.prompt.items():
        prompt = int(value - before.prompt.get(key, 0.0))
        if prompt > 0:
            read = int(now.cache_read.get(key, 0.0) - before.cache_read.get(key, 0.0))
            used[key] = [prompt, max(0, read)]
    return {
        key: {"prompt": prompt, "cache_read": read}
        for key, (prompt, read) in _ranked(used, TOP_KEYS, OTHER).items()
    }


def point(now: Totals, before: Totals) -> dict[str, Any]:
    seconds = max(now.at - before.at, 1e-6)
    requests = max(0.0, now.requests - before.requests)
    buckets = [max(0, a - b) for a, b in zip(now.buckets, before.buckets, strict=True)]
    return {
        "t": round(now.at, 3),
        "seconds": round(seconds, 3),
        "requests": int(requests),
        "rps": round(requests / seconds, 3),
        "errors": int(max(0.0, now.errors - before.errors)),
        "p50_ms": _quantile(buckets, 0.5),
        "p99_ms": _quantile(buckets, 0.99),
        "tokens": _top(now.tokens, before.tokens, 0),
        "cost_usd": _top(now.cost, before.cost, 8),
        "prompt_cache": _prompt_cache(now, before),
    }


class Sessions:
    """One point's prompt tokens per (key, session): at most MAX_SESSIONS pairs, what
    comes after them summed in `rest`. Written by Traffic.prompted alone."""

    __slots__ = ("pairs", "rest")

    def __init__(self) -> None:
        self.pairs: dict[tuple[str, str], list[int]] = {}  # -> [prompt, cache_read]
        self.rest = [0, 0]

    def top(self) -> dict[tuple[str, str], list[int]]:
        """The TOP_SESSIONS pairs with most prompt tokens, and (OTHER, OTHER) for the
        rest: marked by its key, since a client may call a session "(other)", not a key."""
        return _ranked(self.pairs, TOP_SESSIONS, (OTHER, OTHER), self.rest)


T = TypeVar("T", str, tuple[str, str])


def _ranked(
    sums: dict[T, list[int]], limit: int, other: T, rest: Sequence[int] = (0, 0)
) -> dict[T, list[int]]:
    """The `limit` entries of `sums` with most prompt tokens, then `other` holding the
    others (its own share in `sums` and `rest` included), when they have any."""
    ranked: list[tuple[T, list[int]]] = sorted(
        ((name, counts) for name, counts in sums.items() if name != other),
        key=lambda item: (-item[1][0], item[0]),  # ties by name: the same order each time
    )
    left = [0, 0]
    for prompt, read in [rest, sums.get(other, (0, 0)), *(counts for _, counts in ranked[limit:])]:
        left[0] += prompt
        left[1] += read
    out = dict(ranked[:limit])
    if left[0]:
        out[other] = left
    return out


def _ratio(cache_read: int, prompt: int) -> float | None:
    return round(cache_read / prompt, 4) if prompt > 0 else None


def prompt_cache_window(
    keys: Iterable[dict[str, dict[str, int]]], sessions: Iterable[dict[tuple[str, str], list[int]]]
) -> dict[str, list[dict[str, Any]]]:
    """Points' prompt tokens summed per key and per (key, session), each with its
    cache-hit ratio (cache_read / all prompt tokens; None without prompt tokens): the
    TOP_WINDOW with most prompt tokens, then "(other)". A session that one point counted
    in its "(other)" is in the window's "(other)" for that point's share."""
    by_key: dict[str, list[int]] = {}
    for per_key in keys:
        for key, counts in per_key.items():
            kept = by_key.setdefault(key, [0, 0])
            kept[0] += counts["prompt"]
            kept[1] += counts["cache_read"]
    by_session: dict[tuple[str, str], list[int]] = {}
    for per_session in sessions:
        for pair, (prompt, read) in per_session.items():
            kept = by_session.setdefault(pair, [0, 0])
            kept[0] += prompt
            kept[1] += read
    key_rows = _ranked(by_key, TOP_WINDOW, OTHER)
    session_rows = _ranked(by_session, TOP_WINDOW, (OTHER, OTHER))
    return {
        "keys": [
            {"key": key, "prompt": p, "cache_read": r, "hit_ratio": _ratio(r, p)}
            for key, (p, r) in key_rows.items()
        ],
        "sessions": [
            {
                "key": key,
                "session": session,
                "prompt": p,
                "cache_read": r,
                "hit_ratio": _ratio(r, p),
            }
            for (key, session), (p, r) in session_rows.items()
        ],
    }


class Traffic:
    def __init__(
        self, metrics: Metrics, step: float = STEP, wall: Callable[[], float] = time.time
    ) -> None:
        self.metrics = metrics
        self.step = step
        self.wall = wall
        self.points: deque[dict[str, Any]] = deque(maxlen=POINTS)  # written by sample()
        # Each finished point's top sessions, beside its point (kept out of the points:
        # the console's JSON carries the window's sums, not 90 lists of them).
        self.session_points: deque[dict[tuple[str, str], list[int]]] = deque(maxlen=POINTS)
        self.last = totals(metrics, wall())
        self.sessions = Sessions()  # the point in progress; replaced by sample()
        self._task: asyncio.Task[None] | None = None

    def prompted(self, key: str, session: str, cache_read: int, prompt: int) -> None:
        """A request of `session` (of key `key`, "" for none) used `prompt` prompt
        tokens, `cache_read` of them read from the provider's cache."""
        # On the request path (a request with a session): one call, no helper's.
        pairs = self.sessions.pairs
        pair = (key or "(none)", session[:SESSION_CHARS])  # short: the same str objects
        counts = pairs.get(pair)
        if counts is None:
            if len(pairs) >= MAX_SESSIONS:
                counts = self.sessions.rest
            else:
                counts = pairs[pair] = [0, 0]
        counts[0] += prompt
        counts[1] += cache_read

    def sample(self) -> None:
        now = totals(self.metrics, self.wall())
        self.points.append(point(now, self.last))
        self.session_points.append(self.sessions.top())
        self.sessions = Sessions()
        self.last = now

    def view(self) -> list[dict[str, Any]]:
        """The finished points and the one in progress."""
        return [*self.points, point(totals(self.metrics, self.wall()), self.last)]

    def prompt_cache(self, points: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """The window's prompt cache per key and per session: `points` (a view()) and
        the sessions of the finished points and of the one in progress."""
        sessions = [*self.session_points, self.sessions.top()]
        return prompt_cache_window((p["prompt_cache"] for p in points), sessions)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.step)
            self.sample()

    async def stop(self) -> None:
        await cancel(self._task)
