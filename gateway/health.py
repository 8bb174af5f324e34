"""Per provider-entry health from live traffic: failures, cooldown, in-flight, latency.

Entries are keyed by (provider name, upstream model, wildcard pattern), so the state
carries over a config reload for every entry that still exists. An entry whose upstream
model a client chose (what a wildcard's `*` captured) lives in its pattern's bounded
LRU: at most MAX_CAPTURED per pattern, whatever clients send.
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from gateway.config.routes import Cooldown

# (provider, upstream model, the wildcard pattern that captured the model or "").
EntryKey = tuple[str, str, str]
EWMA_ALPHA = 0.2
MAX_CAPTURED = 1000  # entries tracked per wildcard pattern, least recently used dropped


@dataclass(slots=True)
class EntryState:
    failures: int = 0  # consecutive
    open_until: float = 0.0  # cooling down until this clock value
    probing: bool = False  # half-open: one live request is testing the entry
    in_flight: int = 0
    latency: float | None = None  # moving average of time to first byte, seconds
    throughput: float | None = None  # moving average of output tokens per second
    error_rate: float = 0.0  # moving average of failed attempts (0..1), for the console
    last_error: str = ""  # the last failure, said briefly (the console)
    last_error_at: float = 0.0  # wall-clock seconds


class Breaker(enum.Enum):
    """An entry's circuit as an operator reads it. CLOSED -> OPEN when failures reach
    the cooldown's threshold (or a probe fails); OPEN -> HALF_OPEN when the cooldown has
    passed (one live request may probe); HALF_OPEN -> CLOSED on a success."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


def breaker(entry: EntryState, now: float) -> Breaker:
    if not entry.open_until:
        return Breaker.CLOSED
    return Breaker.OPEN if now < entry.open_until else Breaker.HALF_OPEN


class Health:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_captured: int = MAX_CAPTURED
    ) -> None:
        self.clock = clock
        self.max_captured = max_captured
        self.entries: dict[EntryKey, EntryState] = {}  # configured entries
        self.captured: dict[str, OrderedDict[EntryKey, EntryState]] = {}  # per pattern

    def _find_captured(self, key: EntryKey) -> EntryState | None:
        bucket = self.captured.get(key[2])
        return None if bucket is None else bucket.get(key)

    def state(self, key: EntryKey) -> EntryState:
        if not key[2]:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = EntryState()
            return entry
        bucket = self.captured.get(key[2])
        if bucket is None:
            bucket = self.captured[key[2]] = OrderedDict()
        entry = bucket.get(key)
        if entry is None:
            entry = bucket[key] = EntryState()
            if len(bucket) > self.max_captured:
                bucket.popitem(last=False)
        else:
            bucket.move_to_end(key)
        return entry

    def size(self) -> int:
        return len(self.entries) + sum(len(b) for b in self.captured.values())

    def available(self, key: EntryKey) -> bool:
        """Closed, or cooled down and nobody probing it yet."""
        entry = self.entries.get(key) if not key[2] else self._find_captured(key)
        if entry is None or entry.open_until == 0.0:
            return True
        return not entry.probing and self.clock() >= entry.open_until

    def retry_at(self, key: EntryKey) -> float:
        entry = self.entries.get(key) if not key[2] else self._find_captured(key)
        return entry.open_until if entry else 0.0

    def begin(self, key: EntryKey) -> None:
        entry = self.state(key)
        entry.in_flight += 1
        if entry.open_until and self.clock() >= entry.open_until:
            entry.probing = True

    def end(self, key: EntryKey) -> None:
        entry = self.entries.get(key) if not key[2] else self._find_captured(key)
        if entry is not None:  # an evicted captured entry has nothing left to count
            entry.in_flight -= 1

    def succeeded(self, key: EntryKey, latency: float | None = None) -> None:
        entry = self.state(key)
        entry.failures = 0
        entry.open_until = 0.0
        entry.probing = False
        if entry.error_rate:  # most entries never fail: no float work for them
            rate = entry.error_rate * (1.0 - EWMA_ALPHA)
            entry.error_rate = rate if rate > 1e-4 else 0.0
        if latency is not None:
            entry.latency = (
                latency
                if entry.latency is None
                else entry.latency + EWMA_ALPHA * (latency - entry.latency)
            )

    def failed(self, key: EntryKey, cooldown: Cooldown, retry_after: float | None = None) -> None:
        entry = self.state(key)
        entry.failures += 1
        entry.error_rate += EWMA_ALPHA * (1.0 - entry.error_rate)
        # A failed half-open probe reopens at once; otherwise wait for the threshold.
        if entry.probing or entry.failures >= cooldown.failures:
            seconds = max(cooldown.seconds, retry_after or 0.0)
            entry.open_until = self.clock() + seconds
            entry.probing = False

    def note(self, key: EntryKey, what: str) -> None:
        """The last failure's description (the relay's, once an attempt has failed)."""
        entry = self.state(key)
        entry.last_error = what[:300]
        entry.last_error_at = time.time()


def observe_throughput(entry: EntryState, tokens_per_second: float) -> None:
    """One answer's output tokens per second into the entry's moving average."""
    old = entry.throughput
    entry.throughput = (
        tokens_per_second if old is None else old + EWMA_ALPHA * (tokens_per_second - old)
    )
