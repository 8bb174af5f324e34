"""Per-key rpm / tpm / token_quota / budget, in memory, O(1) per request.

Requests and tokens per minute are token buckets (capacity = the per-minute limit,
refilled continuously): checked before a request, charged after it with the upstream's
`usage`, so the last admitted request may overshoot.

A token quota and a budget reserve instead (SPEC §13): a request is admitted when its
prompt estimate fits what remains of the period after the reservations of requests still
running, and holds its prompt estimate plus its output allowance, capped at what
remains; its Reservation is settled with the real charge (or released) when it ends. At
most one capped ("partial") reservation per key runs at a time, so requests running
together pass the limit by at most one request's real charge minus its reservation.
Nothing awaits between a check and its update, so concurrent requests on one event
loop cannot lose updates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.config.keys import Key
from gateway.errors import QuotaExhausted, RateLimited
from gateway.reservation import NOTHING, Ask, Reservation
from gateway.types import Headers


@dataclass(slots=True)
class Bucket:
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float, capacity: float) -> None:
        if capacity != self.capacity:  # the limit changed on reload
            self.level = min(self.level, capacity)
            self.capacity = capacity
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.capacity / 60.0)
        self.stamp = now

    def seconds_until(self, amount: float) -> float:
        """Seconds until the level reaches `amount`."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.capacity


@dataclass(slots=True)
class Period:
    """A key's use in one calendar period (UTC): `day` 2026-11-25, `month` 2026-11, or
    `total`. A new period starts the counts afresh."""

    name: str  # which one of its kind: "2026-11-25", "2026-11", "total"
    requests: int = 0
    tokens: int = 0
    usd: float = 0.0


def period_name(kind: str, now: datetime) -> str:
    if kind == "day":
        return now.strftime("%Y-%m-%d")
    if kind == "month":
        return now.strftime("%Y-%m")
    return "total"


class PeriodNames:
    """period_name, its strings made once a day (strftime cost 1 us a call, several
    times a request for a key with a quota and a budget). One per backend."""

    def __init__(self) -> None:
        self._names: tuple[int, str, str] | None = None  # (date ordinal, day, month)

    def __call__(self, kind: str, now: datetime) -> str:
        if kind == "total":
            return "total"
        day = now.toordinal()
        names = self._names
        if names is None or names[0] != day:
            names = self._names = (day, period_name("day", now), period_name("month", now))
        return names[1] if kind == "day" else names[2]


def period_end(kind: str, now: datetime) -> datetime | None:
    """When the current period of this kind ends (None: never)."""
    if kind == "day":
        return datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    if kind == "month":
        year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
        return datetime(year, month, 1, tzinfo=UTC)
    return None


@dataclass(slots=True)
class KeyUsage:
    requests: Bucket | None = None
    tokens: Bucket | None = None
    spent: int = 0  # tokens charged since the process started
    periods: dict[str, Period] = field(default_factory=dict)  # by kind: day, month, total
    # What running requests hold of the quota and the budget (their Reservations), and
    # how many of those were capped at what remained.
    held_tokens: int = 0
    held_usd: float = 0.0
    partial: int = 0
    count_calls: Bucket | None = None  # count_tokens requests' own per-minute limit


def _reset(seconds: float) -> bytes:
    """OpenAI's reset format: `1s`, `6m0s`, `120ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms".encode()
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return (f"{minutes}m{secs}s" if minutes else f"{secs}s").encode()


def period_kinds(key: Key) -> tuple[str, ...]:
    """The calendar periods a key's quota and budget count in."""
    kinds = []
    if key.token_quota is not None:
        kinds.append(key.quota_period)
    if key.budget_usd is not None and key.budget_period not in kinds:
        kinds.append(key.budget_period)
    return tuple(kinds)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Limiter:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.clock = clock
        self.wall = wall  # the UTC calendar the periods follow (tests inject one)
        self.usage: dict[str, KeyUsage] = {}  # by key name: survives a reload
        # Keys whose period counts changed since the state file last took them (its one
        # reader; admit and charge add to it).
        self.dirty: set[str] = set()
        self._period_name = PeriodNames()

    def period(self, state: KeyUsage, kind: str, now: datetime) -> Period:
        """The key's current period of this kind, started afresh when the calendar moved."""
        name = self._period_name(kind, now)
        found = state.periods.get(kind)
        if found is None or found.name != name:
            found = state.periods[kind] = Period(name)
        return found

    def forget(self, names: set[str]) -> None:
        for name in names:
            self.usage.pop(name, None)

    def _state(self, key: Key, now: float) -> KeyUsage:
        state = self.usage.get(key.name)
        if state is None:
            state = self.usage[key.name] = KeyUsage()
        if key.rpm is not None:
            if state.requests is None:
                state.requests = Bucket(key.rpm, key.rpm, now)
            state.requests.refill(now, key.rpm)
        else:
            state.requests = None
        if key.tpm is not None:
            if state.tokens is None:
                state.tokens = Bucket(key.tpm, key.tpm, now)
            state.tokens.refill(now, key.tpm)
        else:
            state.tokens = None
        return state

    @staticmethod
    def limited(key: Key | None) -> bool:
        return key is not None and (
            key.rpm is not None
            or key.tpm is not None
            or key.token_quota is not None
            or key.budget_usd is not None
        )

    @staticmethod
    def counts_tokens(key: Key | None) -> bool:
        return key is not None and (
            key.tpm is not None or key.token_quota is not None or key.budget_usd is not None
        )

    def admit(self, key: Key) -> Headers:
        """Refuse (429) or take one request asking nothing of the quota and budget;
        returns the rate-limit headers to send."""
        return self.reserve(key, NOTHING)[0]

    def reserve(self, key: Key, ask: Ask) -> tuple[Headers, Reservation]:
        """Refuse (429) or take one request and hold what it asks of the quota and
        budget; the rate-limit headers to send, and the hold to settle when it ends.

        A refusal carries only Retry-After: the caller adds `headers(key)` to every
        error answer for a limited key.
        """
        now = self.clock()
        state = self._state(key, now)
        wall = self.wall()
        tokens, usd, partial = 0, 0.0, False
        used, spent = 0, 0.0  # this period's, read below for the limits the key has
        if key.token_quota is not None:
            used = self.period(state, key.quota_period, wall).tokens
            left = key.token_quota - used - state.held_tokens
            if left <= 0 or ask.prompt_tokens > left:
                raise quota_spent(key, used, state.held_tokens)
            tokens = min(ask.hold_tokens, left)
            partial = ask.hold_tokens > left
        if key.budget_usd is not None:
            spent = self.period(state, key.budget_period, wall).usd
            left_usd = key.budget_usd - spent - state.held_usd
            if left_usd <= 0 or ask.prompt_usd > left_usd:
                raise budget_spent(key, spent, state.held_usd)
            usd = min(ask.hold_usd, left_usd)
            partial = partial or ask.hold_usd > left_usd
        if partial and state.partial:
            # Another capped hold is running: two would let the limit be passed by two
            # requests' overshoot instead of one.
            if key.token_quota is not None and ask.hold_tokens > tokens:
                raise quota_spent(key, used, state.held_tokens)
            raise budget_spent(key, spent, state.held_usd)
        if state.requests is not None and state.requests.level < 1:
            raise over_rpm(key, state.requests.seconds_until(1))
        if state.tokens is not None and state.tokens.level <= 0:
            raise over_tpm(key, state.tokens.seconds_until(1e-9))
        if state.requests is not None:
            state.requests.level -= 1
        for kind in period_kinds(key):
            self.period(state, kind, wall).requests += 1
            self.dirty.add(key.name)
        state.held_tokens += tokens
        state.held_usd += usd
        state.partial += partial
        headers = [(k.encode(), v.encode()) for k, v in self._header_map(key, state).items()]
        return headers, Reservation(self, key, tokens, usd, partial)

    def settle(self, reservation: Reservation, tokens: int, usd: float) -> None:
        state = self.usage.get(reservation.key.name)
        if state is not None:  # else the key left on reload: its state went with it
            state.held_tokens = max(0, state.held_tokens - reservation.tokens)
            state.held_usd = max(0.0, state.held_usd - reservation.usd)
            state.partial = max(0, state.partial - reservation.partial)
        self.charge(reservation.key, tokens, usd)

    def count_call(self, key: Key) -> None:
        """A count_tokens request: never charged nor counted in rpm, but held to the
        key's own count_tokens_rpm (SPEC §13), here in this process."""
        now = self.clock()
        state = self.usage.get(key.name)
        if state is None:
            state = self.usage[key.name] = KeyUsage()
        limit = key.count_tokens_rpm
        bucket = state.count_calls
        if bucket is None:
            bucket = state.count_calls = Bucket(limit, limit, now)
        bucket.refill(now, limit)
        if bucket.level < 1:
            wait = bucket.seconds_until(1)
            raise RateLimited(
                f"key {key.name!r} is over its limit of {limit} count_tokens requests "
                "per minute",
                {"limit": "count_tokens_rpm", "count_tokens_rpm": limit,
                 "retry_after_seconds": round(wait, 3)},
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )  # fmt: skip
        bucket.level -= 1

    def headers(self, key: Key) -> Headers:
        """The rate-limit headers as they stand, without taking a request."""
        state = self._state(key, self.clock())
        return [(k.encode(), v.encode()) for k, v in self._header_map(key, state).items()]

    def charge(self, key: Key, tokens: int, usd: float = 0.0) -> None:
        """After the answer: its tokens and cost (the last admitted request may go over)."""
        if tokens <= 0 and usd <= 0:
            return
        state = self._state(key, self.clock())
        state.spent += tokens
        if state.tokens is not None:
            state.tokens.level -= tokens
        wall = self.wall()
        for kind in period_kinds(key):
            period = self.period(state, kind, wall)
            period.tokens += tokens
            period.usd += usd
        self.dirty.add(key.name)

    def report(self, key: Key) -> dict[str, Any]:
        """GET /v1/key: the key's limits, its use in the current periods, what remains and
        when each period resets."""
        state = self._state(key, self.clock())
        wall = self.wall()
        for kind in period_kinds(key):
            self.period(state, kind, wall)  # a period the calendar left starts afresh
        return report(key, state, wall)

    def _header_map(self, key: Key, state: KeyUsage) -> dict[str, str]:
        return header_map(key, state)


def report(key: Key, state: KeyUsage, wall: datetime) -> dict[str, Any]:
    """The /v1/key document from a key's use (its periods the current ones), whichever
    backend counted it."""
    limits: dict[str, Any] = {"rpm": key.rpm, "tpm": key.tpm, "token_quota": None,
                              "budget": None}  # fmt: skip
    remaining: dict[str, Any] = {}
    kinds = period_kinds(key)
    periods = {kind: state.periods.get(kind) or Period("") for kind in kinds}
    if key.token_quota is not None:
        limits["token_quota"] = {"tokens": key.token_quota, "period": key.quota_period}
        remaining["tokens"] = max(0, key.token_quota - periods[key.quota_period].tokens)
    if key.budget_usd is not None:
        limits["budget"] = {"usd": key.budget_usd, "period": key.budget_period}
        spent = periods[key.budget_period].usd
        remaining["usd"] = round(max(0.0, key.budget_usd - spent), 8)
    usage = {}
    for kind in kinds:
        period = periods[kind]
        end = period_end(kind, wall)
        usage[kind] = {
            "period": period.name or period_name(kind, wall),
            "requests": period.requests,
            "tokens": period.tokens,
            "cost_usd": round(period.usd, 8),
            "resets_at": None if end is None else end.isoformat().replace("+00:00", "Z"),
        }
    return {"object": "key", "name": key.name, "limits": limits, "usage": usage,
            "remaining": remaining}  # fmt: skip


def header_map(key: Key, state: KeyUsage) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers from a key's buckets as they stand."""
    out: dict[str, str] = {}
    if state.requests is not None:
        out["x-ratelimit-limit-requests"] = str(key.rpm)
        out["x-ratelimit-remaining-requests"] = str(max(0, math.floor(state.requests.level)))
        full = state.requests.seconds_until(state.requests.capacity)
        out["x-ratelimit-reset-requests"] = _reset(full).decode()
    if state.tokens is not None:
        out["x-ratelimit-limit-tokens"] = str(key.tpm)
        out["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(state.tokens.level)))
        full = state.tokens.seconds_until(state.tokens.capacity)
        out["x-ratelimit-reset-tokens"] = _reset(full).decode()
    return out


def quota_spent(key: Key, used: int, held: int = 0) -> QuotaExhausted:
    if used >= (key.token_quota or 0):
        message = f"key {key.name!r} has used its token quota of {key.token_quota}"
    else:
        message = (
            f"what remains of key {key.name!r}'s token quota of {key.token_quota} is "
            "held by its requests still running, or is less than this request's prompt"
        )
    return QuotaExhausted(
        message + _this(key.quota_period),
        {"token_quota": key.token_quota, "used": used, "held": held,
         "period": key.quota_period},
    )  # fmt: skip


def budget_spent(key: Key, spent: float, held: float = 0.0) -> QuotaExhausted:
    if spent >= (key.budget_usd or 0.0):
        message = f"key {key.name!r} has spent its budget of ${key.budget_usd:g}"
    else:
        message = (
            f"what remains of key {key.name!r}'s budget of ${key.budget_usd:g} is held by "
            "its requests still running, or is less than this request's prompt"
        )
    return QuotaExhausted(
        message + _this(key.budget_period),
        {"budget_usd": key.budget_usd, "spent_usd": round(spent, 8),
         "held_usd": round(held, 8), "period": key.budget_period},
    )  # fmt: skip


def over_rpm(key: Key, wait: float) -> RateLimited:
    return RateLimited(
        f"key {key.name!r} is over its limit of {key.rpm} requests per minute",
        {"limit": "rpm", "rpm": key.rpm, "retry_after_seconds": round(wait, 3)},
        headers={"retry-after": str(max(1, math.ceil(wait)))},
    )


def over_tpm(key: Key, wait: float) -> RateLimited:
    return RateLimited(
        f"key {key.name!r} is over its limit of {key.tpm} tokens per minute",
        {"limit": "tpm", "tpm": key.tpm, "retry_after_seconds": round(wait, 3)},
        headers={"retry-after": str(max(1, math.ceil(wait)))},
    )


def _this(kind: str) -> str:
    return {"day": " for today (UTC)", "month": " for this month (UTC)"}.get(kind, "")
