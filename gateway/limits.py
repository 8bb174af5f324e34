"""Per-key rpm / tpm / token_quota, in memory, O(1) per request.

Requests and tokens per minute are token buckets (capacity = the per-minute limit,
refilled continuously): checked before a request, charged after it with the upstream's
`usage`, so the last admitted request may overshoot. Nothing awaits between a check and
its update, so concurrent requests on one event loop cannot lose updates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import QuotaExhausted, RateLimited
from gateway.keys import Key

Headers = list[tuple[bytes, bytes]]


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
class KeyUsage:
    requests: Bucket | None = None
    tokens: Bucket | None = None
    spent: int = 0  # tokens charged since the process started (for token_quota)


def _reset(seconds: float) -> bytes:
    """OpenAI's reset format: `1s`, `6m0s`, `120ms`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms".encode()
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return (f"{minutes}m{secs}s" if minutes else f"{secs}s").encode()


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.usage: dict[str, KeyUsage] = {}  # by key name: survives a reload

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
            key.rpm is not None or key.tpm is not None or key.token_quota is not None
        )

    @staticmethod
    def counts_tokens(key: Key | None) -> bool:
        return key is not None and (key.tpm is not None or key.token_quota is not None)

    def admit(self, key: Key) -> Headers:
        """Refuse (429) or take one request; returns the rate-limit headers to send.

        A refusal carries only Retry-After: the caller adds `headers(key)` to every
        error answer for a limited key.
        """
        now = self.clock()
        state = self._state(key, now)
        if key.token_quota is not None and state.spent >= key.token_quota:
            raise QuotaExhausted(
                f"key {key.name!r} has used its token quota of {key.token_quota}",
                {"token_quota": key.token_quota, "used": state.spent},
            )
        if state.requests is not None and state.requests.level < 1:
            wait = state.requests.seconds_until(1)
            raise RateLimited(
                f"key {key.name!r} is over its limit of {key.rpm} requests per minute",
                {"limit": "rpm", "rpm": key.rpm, "retry_after_seconds": round(wait, 3)},
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )
        if state.tokens is not None and state.tokens.level <= 0:
            wait = state.tokens.seconds_until(1e-9)
            raise RateLimited(
                f"key {key.name!r} is over its limit of {key.tpm} tokens per minute",
                {"limit": "tpm", "tpm": key.tpm, "retry_after_seconds": round(wait, 3)},
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )
        if state.requests is not None:
            state.requests.level -= 1
        return [(k.encode(), v.encode()) for k, v in self._header_map(key, state).items()]

    def headers(self, key: Key) -> Headers:
        """The rate-limit headers as they stand, without taking a request."""
        state = self._state(key, self.clock())
        return [(k.encode(), v.encode()) for k, v in self._header_map(key, state).items()]

    def charge(self, key: Key, tokens: int) -> None:
        if tokens <= 0:
            return
        state = self._state(key, self.clock())
        state.spent += tokens
        if state.tokens is not None:
            state.tokens.level -= tokens

    def _header_map(self, key: Key, state: KeyUsage) -> dict[str, str]:
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
