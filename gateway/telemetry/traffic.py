"""The console's last 15 minutes (SPEC §12): a ring of 90 ten-second points, each the
difference between two samples of the counters /metrics already keeps (requests,
their duration histogram, tokens and cost by key). The request path does no work for
it: a timer takes a sample every STEP seconds, and a read adds the point in progress.

Each point holds requests per second, errors, latency p50/p99 (from the histogram's
buckets: the upper bound of the bucket the quantile falls in), and tokens and cost for
the TOP_KEYS keys that used most in it, the rest summed as "(other)". With
`--workers N` a worker's console shows that worker's traffic.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.tasks import cancel
from gateway.telemetry.metrics import LATENCY_BUCKETS, Metrics

STEP = 10.0  # seconds per point
POINTS = 90  # 15 minutes
TOP_KEYS = 8


@dataclass(slots=True)
class Totals:
    """The counters at one instant."""

    at: float  # wall-clock seconds
    requests: float = 0.0
    errors: float = 0.0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    tokens: dict[str, float] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)


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
        out.tokens[key or "(none)"] = out.tokens.get(key or "(none)", 0.0) + counter.value
    for (key, _, _), counter in metrics.cost.children.items():
        out.cost[key or "(none)"] = out.cost.get(key or "(none)", 0.0) + counter.value
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
        out["(other)"] = round(rest, digits)
    return out


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
    }


class Traffic:
    def __init__(
        self, metrics: Metrics, step: float = STEP, wall: Callable[[], float] = time.time
    ) -> None:
        self.metrics = metrics
        self.step = step
        self.wall = wall
        self.points: deque[dict[str, Any]] = deque(maxlen=POINTS)  # written by sample()
        self.last = totals(metrics, wall())
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        now = totals(self.metrics, self.wall())
        self.points.append(point(now, self.last))
        self.last = now

    def view(self) -> list[dict[str, Any]]:
        """The finished points and the one in progress."""
        return [*self.points, point(totals(self.metrics, self.wall()), self.last)]

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.step)
            self.sample()

    async def stop(self) -> None:
        await cancel(self._task)
