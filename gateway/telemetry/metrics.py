"""Prometheus metrics, kept as plain numbers and rendered in the text format on scrape.

A counter is a float on a slotted object: one addition on the request path, where
prometheus-client's validate-and-lock layers cost ~10 % of a whole relayed request and
its import ~50 ms of start-up.

With --workers N each worker also writes its values to a file in GATEWAY_METRICS_DIR,
at most half a second after they change, and a scrape adds up the other workers' files
to its own live values: counters and histograms of every worker that ever wrote, gauges
of the workers still running.
"""

from __future__ import annotations

import asyncio
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Generic, TypeVar

import orjson

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
EVENT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
DIR_ENV = "GATEWAY_METRICS_DIR"
DUMP_AFTER = 0.5  # seconds from a worker's first unwritten change to its file write
RENDER_CHUNK = 4000  # series per piece of a scrape (~8 ms of the loop here)


class Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def state(self) -> Any:
        return self.value


class Gauge(Counter):
    __slots__ = ()

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def state(self) -> Any:
        return [*self.counts, self.sum]


C = TypeVar("C", Counter, Gauge, Histogram)


class Family(Generic[C]):
    """One metric name; a child per combination of label values."""

    def __init__(
        self,
        name: str,
        help_text: str,
        kind: str,
        make: Callable[[], C],
        labels: tuple[str, ...] = (),
        merge: str = "sum",
    ) -> None:
        self.name = name
        self.help = help_text
        self.kind = kind  # counter, gauge or histogram
        self.make: Callable[[], C] = make
        self.labels = labels
        self.merge = merge  # across workers: "sum", or "min" (a gauge)
        self.children: dict[tuple[str, ...], C] = {}
        # Each series' `{label="value",...}` text, built once: a scrape of 100k keys'
        # series spent most of its time escaping and formatting the same labels again.
        self.label_text: dict[tuple[str, ...], str] = {}

    def labels_of(self, values: tuple[str, ...]) -> str:
        text = self.label_text.get(values)
        if text is None:
            text = _labels(list(zip(self.labels, values, strict=True)))
            if len(self.label_text) < 2 * len(self.children) + 64:  # other workers' too
                self.label_text[values] = text
        return text

    def forget(self, values: tuple[str, ...]) -> None:
        self.children.pop(values, None)
        self.label_text.pop(values, None)

    def __call__(self, *values: str) -> C:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.make()
        return child


class Served:
    """The series one kind of served request writes, found together: (key, slug,
    provider, status, stream) -> its children, so Runtime.served makes one dict lookup
    where it made six Family calls (each packing its labels into a new tuple)."""

    __slots__ = ("completion", "duration", "prompt", "requests", "ttfb", "uncached")

    def __init__(self, m: Metrics, owner: str, label: str, provider: str, status: str,
                 stream: str) -> None:  # fmt: skip
        self.requests = m.requests(label, provider, status, stream)
        self.duration = m.duration(label)
        self.ttfb = m.ttfb(label, provider) if provider else None
        # Made on first use, so a kind with no tokens shows no series.
        self.prompt: Counter | None = None
        self.completion: Counter | None = None
        self.uncached: Counter | None = None


MAX_SERVED = 4096  # Served bundles kept; past it they are made again (they only point)


class Metrics:
    def __init__(self) -> None:
        directory = os.environ.get(DIR_ENV)
        self.directory = Path(directory) if directory else None
        self._dump_due = False
        self._served: dict[tuple[str, str, str, int, bool], Served] = {}

        def histogram(bounds: tuple[float, ...]) -> Callable[[], Histogram]:
            return lambda: Histogram(bounds)

        self.requests = Family(
            "gateway_requests",
            "Requests answered, by model slug, provider, status and stream",
            "counter",
            Counter,
            ("slug", "provider", "status", "stream"),
        )
        self.duration = Family(
            "gateway_request_duration_seconds",
            "Time from request to the end of the response",
            "histogram",
            histogram(LATENCY_BUCKETS),
            ("slug",),
        )
        self.ttfb = Family(
            "gateway_time_to_first_byte_seconds",
            "Time from the serving attempt's start to the upstream's first content",
            "histogram",
            histogram(LATENCY_BUCKETS),
            ("slug", "provider"),
        )
        delay = Family(
            "gateway_event_relay_delay_seconds",
            "Time from an upstream chunk's arrival to its hand-off to the client",
            "histogram",
            histogram(EVENT_BUCKETS),
        )
        self.event_delay = delay()
        self.attempts = Family(
            "gateway_upstream_attempts",
            "Upstream attempts started, by provider",
            "counter",
            Counter,
            ("provider",),
        )
        self.failovers = Family(
            "gateway_failovers",
            "Requests that needed more than one attempt, by slug",
            "counter",
            Counter,
            ("slug",),
        )
        hedges = Family(
            "gateway_hedged_requests", "Requests that started a hedge", "counter", Counter
        )
        self.hedges = hedges()
        self.tokens = Family(
            "gateway_tokens",
            "Tokens charged, by key and kind (prompt, completion, estimated)",
            "counter",
            Counter,
            ("key", "kind"),
        )
        in_flight = Family("gateway_in_flight_requests", "Requests being relayed", "gauge", Gauge)
        self.in_flight = in_flight()
        self.provider_up = Family(
            "gateway_provider_up",
            "1 while a provider entry takes traffic, 0 while it cools down",
            "gauge",
            Gauge,
            ("provider", "model"),
            merge="min",
        )
        self.rejections = Family(
            "gateway_limit_rejections",
            "Requests refused by a key limit, by key and limit",
            "counter",
            Counter,
            ("key", "limit"),
        )
        self.prompt_tokens = Family(
            "gateway_prompt_tokens",
            "Prompt tokens by key, model, provider and kind: cache_read, cache_write, "
            "uncached (the provider's prompt cache at work)",
            "counter",
            Counter,
            ("key", "slug", "provider", "kind"),
        )
        self.cost = Family(
            "gateway_cost_usd",
            "USD spent at the entries' prices, by key, model and provider",
            "counter",
            Counter,
            ("key", "slug", "provider"),
        )
        unenforced = Family(
            "gateway_state_unavailable",
            "Requests of limited keys served without their limits, or refused "
            "(--state-fail closed): Redis was unreachable",
            "counter",
            Counter,
        )
        self.unenforced = unenforced()
        ids_dropped = Family(
            "gateway_response_ids_dropped",
            "Responses ids not stored: Redis refused the write (full) or was away too long",
            "counter",
            Counter,
        )
        self.ids_dropped = ids_dropped()
        round_trips = Family(
            "gateway_state_round_trips",
            "Calls answered by the state store (Redis): checks, batches, reads",
            "counter",
            Counter,
        )
        self.round_trips = round_trips()
        self.families: list[Family[Any]] = [
            self.requests,
            self.duration,
            self.ttfb,
            delay,
            self.attempts,
            self.failovers,
            hedges,
            self.tokens,
            in_flight,
            self.provider_up,
            self.rejections,
            self.prompt_tokens,
            self.cost,
            unenforced,
            ids_dropped,
            round_trips,
        ]

    def forget_keys(self, names: set[str]) -> None:
        """Drop the series of keys that left keys.yaml."""
        for family in self.families:
            if "key" in family.labels:
                at = family.labels.index("key")
                for values in [v for v in family.children if v[at] in names]:
                    family.forget(values)
        # The bundles point at the children just dropped: a key that comes back must
        # count in fresh, exported ones.
        self._served.clear()
        self.changed()

    # --workers N

    def served(self, owner: str, label: str, provider: str, status: int, stream: bool) -> Served:
        kinds = self._served
        found = kinds.get((owner, label, provider, status, stream))
        if found is None:
            if len(kinds) >= MAX_SERVED:
                kinds.clear()
            found = kinds[owner, label, provider, status, stream] = Served(
                self, owner, label, provider, str(status), "true" if stream else "false"
            )
        return found

    def changed(self) -> None:
        """Called after a request's values changed: schedules this worker's file write."""
        if self.directory is not None and not self._dump_due:
            self._dump_due = True
            asyncio.get_running_loop().call_later(DUMP_AFTER, self.dump)

    def dump(self) -> None:
        """Write this worker's values for the others' scrapes: the series are copied on
        the loop (a C copy of each family's dict), turned into JSON and written in a
        thread, so 100k keys' series do not hold the loop for the 140 ms that took."""
        self._dump_due = False
        if self.directory is None:
            return
        copies = [(f.name, f.children.copy()) for f in self.families]
        path = self.directory / f"metrics-{os.getpid()}.json"
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # at shutdown, after the loop: write it here
            _write_snapshot(path, copies)
            return
        loop.run_in_executor(None, _write_snapshot, path, copies)

    def _others(self) -> Iterator[tuple[bool, list[bytes]]]:
        """(still running, lines of its file) of every other worker that wrote one."""
        if self.directory is None:
            return
        mine = os.getpid()
        for path in self.directory.glob("metrics-*.json"):
            pid = int(path.stem.partition("-")[2])
            if pid == mine:
                continue
            try:
                lines = path.read_bytes().splitlines()
            except OSError:
                continue
            yield _running(pid), lines

    # exposition

    def render(self) -> bytes:
        return b"".join(self.render_chunks())

    def render_chunks(self, series_per_chunk: int = RENDER_CHUNK) -> Iterator[bytes]:
        """The exposition in pieces of about `series_per_chunk` series, so a caller can
        hand the loop back between them (MetricsEndpoint): with 100k keys a whole
        render held it for 0.4 s. Other workers' files are merged a line (a piece of
        their series) at a time, with an empty piece after each. Series come in the
        order they were first seen."""
        by_name = {f.name: f for f in self.families}
        merged: dict[str, dict[tuple[str, ...], Any]] = {}
        for running, lines in self._others():
            for line in lines:
                try:
                    name, rows = orjson.loads(line)
                except (orjson.JSONDecodeError, ValueError, TypeError):
                    continue  # a file cut short, or another version's
                family = by_name.get(name)
                if family is None or (family.kind == "gauge" and not running):
                    continue
                into = merged.setdefault(name, {})
                for row in rows:
                    key = tuple(row[:-1])
                    into[key] = _merge(into.get(key), row[-1], family.merge)
                yield b""
        out: list[str] = []
        for f in self.families:
            # A C copy of the family: safe across the pieces' yields.
            children = list(f.children.items())
            others = merged.pop(f.name, None)
            series: Any = children
            if others is not None:
                for i, (key, child) in enumerate(children):
                    others[key] = _merge(others.get(key), child.state(), f.merge)
                    if i % series_per_chunk == series_per_chunk - 1:
                        yield b""
                series = others.items()
            out.append(f"# HELP {f.name} {f.help}\n# TYPE {f.name} {f.kind}\n")
            bounds = _bounds(f)
            suffix = "_total" if f.kind == "counter" else ""
            for key, item in series:
                value = item if others is not None else item.state()
                if bounds:
                    out += _histogram_lines(
                        f.name, list(zip(f.labels, key, strict=True)), bounds, value
                    )
                else:
                    out.append(f"{f.name}{suffix}{f.labels_of(key)} {_number(value)}\n")
                if len(out) >= series_per_chunk:
                    yield "".join(out).encode()
                    out.clear()
        yield "".join(out).encode()


def snapshot_lines(copies: list[tuple[str, dict[tuple[str, ...], Any]]]) -> bytes:
    """A worker's values for the others' scrapes: JSON lines of `[family, [rows]]`, each
    at most RENDER_CHUNK rows, so a scrape merges them a line at a time."""
    lines = []
    for name, children in copies:
        rows = [[*labels, child.state()] for labels, child in children.items()]
        for at in range(0, len(rows), RENDER_CHUNK):
            lines.append(orjson.dumps([name, rows[at : at + RENDER_CHUNK]]))
    return b"\n".join(lines) + b"\n"


def _write_snapshot(path: Path, copies: list[tuple[str, dict[tuple[str, ...], Any]]]) -> None:
    temp = path.with_suffix(".tmp")
    try:
        temp.write_bytes(snapshot_lines(copies))
        temp.replace(path)  # a scrape never reads a half-written file
    except OSError:
        pass  # the directory went away with the supervisor: nothing left to report to


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _merge(mine: Any, other: Any, how: str) -> Any:
    if mine is None:
        return other
    if isinstance(mine, list):
        return [a + b for a, b in zip(mine, other, strict=True)]
    return min(mine, other) if how == "min" else mine + other


def _bounds(family: Family[Any]) -> list[str]:
    """A histogram family's `le` labels, +Inf included; [] for other kinds."""
    if family.kind != "histogram":
        return []
    return [*map(_number, family.make().bounds), "+Inf"]


def _histogram_lines(
    name: str, labels: list[tuple[str, str]], bounds: list[str], value: list[float]
) -> list[str]:
    lines = []
    cumulative = 0.0
    for bound, count in zip(bounds, value[:-1], strict=True):
        cumulative += count
        lines.append(f"{name}_bucket{_labels([*labels, ('le', bound)])} {_number(cumulative)}\n")
    lines.append(f"{name}_count{_labels(labels)} {_number(cumulative)}\n")
    lines.append(f"{name}_sum{_labels(labels)} {_number(value[-1])}\n")
    return lines


def _labels(pairs: list[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in pairs)
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value))
