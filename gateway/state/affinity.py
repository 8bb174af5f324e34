"""Prompt-cache affinity (SPEC §14): a session's requests go back to the provider entry
that served it last, so the provider's prompt cache for its long shared prefix hits.

One table, one writer (`record`, called once per served request that carries a
session); the plan reads it (`lookup`) before ordering a slug's entries. A pin is
scoped to the key that made it (one tenant's session id never steers another's
requests) and to the slug (Claude Code sends its small model's requests under the
same session id). In Redis mode the pins live in Redis, shared by every replica, and
this process keeps none.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from gateway.config.routes import Routes

Entry = tuple[str, str]  # (provider name, upstream model): the entry a pin names
PinKey = tuple[str, str, str]  # (owner, session, slug)


class SharedPins(Protocol):
    """The Redis side (state.redis.RedisState), when the gateway runs with one."""

    async def pinned(self, keys: Sequence[PinKey]) -> list[Entry | None]: ...

    def pin(self, key: PinKey, entry: Entry, seconds: float) -> None: ...


class Affinity:
    def __init__(
        self,
        capacity: int,
        shared: SharedPins | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.shared = shared
        self.clock = clock
        # (owner, session, slug) -> (entry, expires at); least recently used first.
        self._pins: OrderedDict[PinKey, tuple[Entry, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pins)

    @staticmethod
    def wanted(routes: Routes, slugs: Sequence[str]) -> list[str]:
        """The slugs whose pins matter: a model with affinity on and a choice of
        entries (one entry has nothing to pick)."""
        out = []
        for slug in slugs:
            model = routes.resolve(slug)
            if model is not None and model.affinity_seconds and len(model.targets) > 1:
                out.append(slug)
        return out

    async def lookup(
        self, routes: Routes, owner: str, session: str, slugs: Sequence[str]
    ) -> Mapping[str, Entry] | None:
        """Each slug's pinned entry, for build_plan; None when there is none."""
        wanted = self.wanted(routes, slugs)
        if not wanted:
            return None
        keys = [(owner, session, slug) for slug in wanted]
        if self.shared is not None:
            found = await self.shared.pinned(keys)
        else:
            found = [self._get(key) for key in keys]
        pins = {key[2]: entry for key, entry in zip(keys, found, strict=True) if entry}
        return pins or None

    def _get(self, key: PinKey) -> Entry | None:
        held = self._pins.get(key)
        if held is None:
            return None
        entry, expires = held
        # An expired pin is only not read: record() (the one writer) replaces it, or the
        # LRU bound drops it.
        return None if self.clock() >= expires else entry

    def record(self, routes: Routes, owner: str, session: str, slug: str, entry: Entry) -> None:
        """The entry that served this session's request on `slug`: its pin, for the
        model's affinity_seconds from now (each request renews it)."""
        model = routes.resolve(slug)
        if model is None or not model.affinity_seconds or len(model.targets) < 2:
            return
        key = (owner, session, slug)
        seconds = model.affinity_seconds
        if self.shared is not None:
            self.shared.pin(key, entry, seconds)
            return
        pins = self._pins
        pins[key] = (entry, self.clock() + seconds)
        pins.move_to_end(key)
        while len(pins) > self.capacity:
            pins.popitem(last=False)
