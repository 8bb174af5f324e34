"""A request's hold on its key's quota and budget (SPEC §13): what it asks at admission
(its prompt estimate, and that plus its output allowance, priced at the dearest candidate
for a budget), and the Reservation the endpoint ends exactly once, settled with the real
charge or released. Both backends (limits.Limiter in memory, state.redis.RedisState)
keep the holds; this is what they share."""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from gateway.config.keys import Key
from gateway.config.routes import Price


@dataclass(frozen=True, slots=True)
class Ask:
    """What a request asks of its key's quota and budget at admission: its prompt
    estimate (what must fit) and that plus its output allowance (what it holds), in
    tokens and in USD at the dearest candidate entry's prices."""

    prompt_tokens: int = 0
    hold_tokens: int = 0
    prompt_usd: float = 0.0
    hold_usd: float = 0.0
    # The dearest candidate's prices: what a request that was never served but must be
    # charged (its client left) is charged at.
    price: Price | None = None


NOTHING = Ask()


def ask_for(key: Key, prompt: int, allowance: int, prices: Iterable[Price | None]) -> Ask:
    """A request's ask of its key: for a budget its tokens are priced at the dearest of
    its candidate entries (the one it might end up served by)."""
    hold = prompt + allowance
    if key.budget_usd is None:
        return Ask(prompt, hold)
    priced = [price for price in prices if price is not None]
    if not priced:
        return Ask(prompt, hold)
    dearest = max(priced, key=lambda price: price.cost(prompt, 0, allowance))
    return Ask(
        prompt, hold, dearest.cost(prompt, 0, 0), dearest.cost(prompt, 0, allowance), dearest
    )


class Hold(enum.Enum):
    """A reservation's life: HELD from admission until the request ends, then SETTLED
    (replaced by the real charge) or RELEASED (nothing was served: nothing charged).
    Both ends are final; a second settle is a no-op."""

    HELD = "held"
    SETTLED = "settled"
    RELEASED = "released"


class Settles(Protocol):
    """A limits backend that settles reservations (limits.Limiter, state.redis.RedisState)."""

    def settle(self, reservation: Reservation, tokens: int, usd: float) -> None: ...


@dataclass(slots=True)
class Reservation:
    """One request's hold on its key's limits, its one owner from admission to the end
    of the request: the endpoint settles or releases it exactly once."""

    backend: Settles
    key: Key
    tokens: int = 0  # held of the quota
    usd: float = 0.0  # held of the budget
    partial: bool = False  # capped at what remained
    id: str = ""  # the hold's name where it is kept outside this process (Redis)
    state: Hold = Hold.HELD

    def settle(self, tokens: int, usd: float) -> None:
        """The request ended: its hold is replaced by what it really cost."""
        if self.state is Hold.HELD:
            self.state = Hold.SETTLED
            self.backend.settle(self, tokens, usd)

    def release(self) -> None:
        """The request ended with nothing served: its hold goes, nothing is charged."""
        if self.state is Hold.HELD:
            self.state = Hold.RELEASED
            self.backend.settle(self, 0, 0.0)


def hold_id() -> str:
    return os.urandom(9).hex()
