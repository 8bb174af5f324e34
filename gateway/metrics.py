"""Prometheus metrics. With --workers N the values live in prometheus-client's
multiprocess files (PROMETHEUS_MULTIPROC_DIR) so any worker's /metrics sees them all."""

from __future__ import annotations

import os
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
EVENT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
M = TypeVar("M", Counter, Gauge, Histogram)
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class Labelled(Generic[M]):
    """A labelled metric whose children are kept here: prometheus-client's `labels()`
    validates and takes a lock on every call, a dict lookup does not."""

    __slots__ = ("children", "metric")

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self.children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


class Metrics:
    def __init__(self) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        # One registry per app: tests run several gateways in one process.
        r = self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Labelled(
            Counter(
                "gateway_requests",
                "Requests answered, by model slug, provider, status and stream",
                ["slug", "provider", "status", "stream"],
                registry=r,
            )
        )
        self.duration = Labelled(
            Histogram(
                "gateway_request_duration_seconds",
                "Time from request to the end of the response",
                ["slug"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.ttfb = Labelled(
            Histogram(
                "gateway_time_to_first_byte_seconds",
                "Time from the serving attempt's start to the upstream's first content",
                ["slug", "provider"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            )
        )
        self.event_delay = Histogram(
            "gateway_event_relay_delay_seconds",
            "Time from an upstream chunk's arrival to its hand-off to the client",
            buckets=EVENT_BUCKETS,
            registry=r,
        )
        self.attempts = Labelled(
            Counter(
                "gateway_upstream_attempts",
                "Upstream attempts started, by provider",
                ["provider"],
                registry=r,
            )
        )
        self.failovers = Labelled(
            Counter(
                "gateway_failovers",
                "Requests that needed more than one attempt, by slug",
                ["slug"],
                registry=r,
            )
        )
        self.hedges = Counter(
            "gateway_hedged_requests", "Requests that started a hedge", registry=r
        )
        self.tokens = Labelled(
            Counter(
                "gateway_tokens",
                "Tokens charged, by key and kind (prompt, completion, estimated)",
                ["key", "kind"],
                registry=r,
            )
        )
        self.in_flight = Gauge(
            "gateway_in_flight_requests",
            "Requests being relayed",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.provider_up = Labelled(
            Gauge(
                "gateway_provider_up",
                "1 while a provider entry takes traffic, 0 while it cools down",
                ["provider", "model"],
                registry=r,
                multiprocess_mode="min",
            )
        )
        self.rejections = Labelled(
            Counter(
                "gateway_limit_rejections",
                "Requests refused by a key limit, by key and limit",
                ["key", "limit"],
                registry=r,
            )
        )

    def render(self) -> bytes:
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)
