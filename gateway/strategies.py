"""Routing strategies: the order in which a model's provider entries are tried."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gateway.config.routes import Model, Target
from gateway.health import EntryKey, Health

EXPLORE_RATE = 0.05  # `latency`: share of requests that try a random entry first


class Strategies:
    """Holds what strategies remember between requests (round-robin positions)."""

    def __init__(self, health: Health, rng: random.Random | None = None) -> None:
        self.health = health
        self.rng = rng or random.Random()
        self._turns: dict[str, int] = {}

    def order(self, model: Model, slug: str, keys: Sequence[EntryKey]) -> list[int]:
        """Indexes into model.targets, best first."""
        n = len(model.targets)
        indexes = list(range(n))
        strategy = model.strategy
        if n < 2 or strategy == "fallback":
            return indexes
        if strategy == "round_robin":
            turn = self._turns.get(model.slug, 0)
            self._turns[model.slug] = turn + 1
            start = turn % n
            return indexes[start:] + indexes[:start]
        if strategy == "weighted":
            return self._weighted(model.targets)
        if strategy == "least_busy":
            return sorted(indexes, key=lambda i: self.health.state(keys[i]).in_flight)
        # latency: unmeasured entries first (so they get measured), then the fastest.
        if self.rng.random() < EXPLORE_RATE:
            self.rng.shuffle(indexes)
            return indexes

        def latency(i: int) -> float:
            value = self.health.state(keys[i]).latency
            return -1.0 if value is None else value

        return sorted(indexes, key=latency)

    def _weighted(self, targets: Sequence[Target]) -> list[int]:
        # Weighted order without replacement; weight 0 is never picked.
        pool = [(i, t.weight) for i, t in enumerate(targets) if t.weight > 0]
        out: list[int] = []
        while pool:
            total = sum(w for _, w in pool)
            pick = self.rng.random() * total
            for j, (i, w) in enumerate(pool):
                pick -= w
                if pick < 0 or j == len(pool) - 1:
                    out.append(i)
                    pool.pop(j)
                    break
        return out
