"""Limits shared by every worker and replica (SPEC §11, `--state redis://HOST:PORT/DB`).

A limited key's request is checked and taken in Redis by one Lua script, one round trip:
its period quota and budget, its requests per minute and its tokens per minute. Both
rates are GCRA: one number per key and rate, the theoretical arrival time (TAT) in
milliseconds on Redis's own clock, so every replica judges by the same time. This is the
in-memory token bucket's rule (capacity = the per-minute limit, refilled continuously)
kept as a single value:

    level = limit - (TAT - now) * limit / 60000      (TAT never below now)

A request takes one from the request level; an answer's tokens are taken from the token
level after it (charge-after, as SPEC §5: the last admitted request may overshoot). An
unlimited key costs no round trip at all.

Charges (tokens and cost, known after the answer) wait here and go with the key's next
check, inside the same script call, or, within CHARGE_EVERY, with every other pending
charge and new Responses id in one pipelined round trip. So this process's own spend is
always in Redis before its next check of that key, and other replicas see it within
CHARGE_EVERY plus a round trip.

Redis unreachable (refused, reset, or slower than DEADLINE): the link is DOWN and Redis
is left alone for RETRY_EVERY; meanwhile requests are served without limits, each
counted (`gateway_state_unavailable_total`) and logged, or with `--state-fail closed`
refused with 503 `state_unavailable`. Pending charges are kept and sent once it answers.

A key with a token quota or a budget reserves at admission (SPEC §13): the check-and-take
script also holds the request's ask against what remains after the holds of requests
still running (every replica's), and the charge that settles it lets its hold go
(state.scripts).

Layout (one Redis database, keys prefixed `gateway:`; a key's entries share the hash tag
`{NAME}`): `gateway:{NAME}:rpm` and `:tpm` (TAT, expiring once at rest),
`gateway:{NAME}:held` and `:held:exp` (the running requests' holds),
`gateway:{NAME}:day:2026-11-25`, `:month:2026-11` and `:total` (hashes of requests,
tokens and usd; day and month expire after their period has gone),
`gateway:response:ID` (`owner NL slug NL provider NL upstream model`, 24 h) and
`gateway:{NAME}:responses` (the owner's ids by last use, at most its share).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.config.keys import Key
from gateway.errors import StateUnavailable
from gateway.families.responses import TTL as RESPONSE_TTL
from gateway.families.responses import Creator, not_found
from gateway.limits import (
    Bucket,
    KeyUsage,
    Period,
    PeriodNames,
    budget_spent,
    header_map,
    over_rpm,
    over_tpm,
    period_kinds,
    quota_spent,
    report,
)
from gateway.reservation import NOTHING, Ask, Reservation, hold_id
from gateway.state.pipeline import AutoPipeline, pack
from gateway.state.scripts import ADMIT_SCRIPT, CHARGE_SCRIPT, FIND_SCRIPT, REMEMBER_SCRIPT
from gateway.tasks import cancel
from gateway.types import Headers

if TYPE_CHECKING:
    from gateway.state.affinity import Entry, PinKey

log = logging.getLogger("gateway")

T = TypeVar("T")

PREFIX = "gateway:"
TIMEOUT = 1.0  # connect and each reply, seconds
DEADLINE = 2.0  # one whole call, waiting for a pooled connection included
RETRY_EVERY = 1.0  # seconds Redis is left alone after it failed
CHARGE_EVERY = 0.05  # longest a charge waits for a key's next check before it is sent
MAX_CONNECTIONS = 64  # per process; a request waits (within DEADLINE) for a free one
MAX_PENDING_IDS = 10_000  # new Responses ids waiting while Redis is away; oldest dropped
# Seconds a period's hash outlives its period (day, month; total never expires).
PERIOD_TTL = {"day": 3 * 86400, "month": 70 * 86400, "total": 0}

# The served-without-limits answer of admit(): empty headers, told apart by identity.
UNENFORCED: Headers = []


class Link(enum.Enum):
    """Whether Redis answers. UP -> DOWN on a failed call (logged once); DOWN -> UP on
    the first call that succeeds after RETRY_EVERY (logged once)."""

    UP = "up"
    DOWN = "down"


@dataclass(slots=True)
class Charge:
    key: Key
    tokens: int = 0
    usd: float = 0.0
    holds: list[str] = field(default_factory=list)  # the holds this charge settles


class _Unreachable:
    """The reply of a call Redis did not answer."""


UNREACHABLE = _Unreachable()


def _utc_now() -> datetime:
    return datetime.now(UTC)


class RedisState:
    def __init__(
        self,
        url: str,
        fail_closed: bool = False,
        on_round_trip: Callable[[], None] | None = None,
        wall: Callable[[], datetime] = _utc_now,
        clock: Callable[[], float] = time.monotonic,
        ids_per_key: int = 10_000,
        on_unavailable: Callable[[], None] | None = None,
        on_id_dropped: Callable[[str], None] | None = None,
        on_id_taken: Callable[[str, str], None] | None = None,
    ) -> None:
        # The optional extra, imported only when configured (SPEC §11).
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import NoScriptError, ResponseError

        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=DEADLINE,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            # One more try at once: a pooled connection Redis closed since (a restart).
            retry=Retry(NoBackoff(), 1),
        )
        self.client = aioredis.Redis.from_pool(pool)  # for SCRIPT LOAD and closing
        self.pipeline = AutoPipeline(pool, DEADLINE, ResponseError, on_round_trip or _nothing)
        self.url = _without_password(url)
        self.fail_closed = fail_closed
        self.wall = wall  # the UTC calendar the periods follow (tests inject one)
        self._period_name = PeriodNames()
        self.clock = clock
        self._no_script = NoScriptError
        self._sha = {
            script: _sha1(script)
            for script in (ADMIT_SCRIPT, CHARGE_SCRIPT, REMEMBER_SCRIPT, FIND_SCRIPT)
        }
        self.ids_per_key = ids_per_key
        # gateway_state_unavailable_total, for a request refused for lack of Redis.
        self.on_unavailable = on_unavailable or _nothing
        self.on_id_dropped = on_id_dropped or _dropped
        # An id this process made for an owner that another replica had already made
        # for another (an upstream repeating ids): this process's copy must go.
        self.on_id_taken = on_id_taken or _taken
        self._response_error = ResponseError
        # Written by _round_trip alone.
        self.link = Link.UP
        self.retry_at = 0.0
        # Written by charge()/remember() (add) and admit()/flush() (take).
        self.pending: dict[str, Charge] = {}
        self.pending_ids: dict[str, tuple[str, bytes]] = {}  # id -> (owner, value)
        self.pending_pins: dict[str, tuple[bytes, int]] = {}  # pin key -> (entry, seconds)
        self.last_headers: dict[str, Headers] = {}  # by key name: for error answers
        self._wake = asyncio.Event()
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._errors: tuple[type[BaseException], ...] = (
            aioredis.RedisError,
            OSError,
            TimeoutError,
        )

    # -- every call goes through here: the one place Redis's failures are translated

    async def _round_trip(self, call: Callable[[], Awaitable[T]]) -> T | _Unreachable:
        if self.link is Link.DOWN and self.clock() < self.retry_at:
            return UNREACHABLE
        try:
            async with asyncio.timeout(DEADLINE):
                result = await call()
        except self._errors as exc:
            if self.link is Link.UP:
                log.error(
                    "redis at %s is unreachable (%s: %s); %s until it answers",
                    self.url,
                    type(exc).__name__,
                    exc,
                    "answering 503" if self.fail_closed else "serving without limits",
                )
            self.link = Link.DOWN
            self.retry_at = self.clock() + RETRY_EVERY
            return UNREACHABLE
        if self.link is Link.DOWN:
            log.warning("redis at %s answers again; limits are enforced", self.url)
            self.link = Link.UP
        return result

    async def _calls(self, commands: list[bytes]) -> list[Any]:
        """Commands sent together (one batch unless a batch is on the wire already);
        their replies in order."""
        if len(commands) == 1:  # a check: gather's task per command cost 12 of 113 us
            return [await self.pipeline.call(commands[0])]
        return list(await asyncio.gather(*(self.pipeline.call(c) for c in commands)))

    async def _script(self, script: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """EVALSHA each (keys, args); a Redis without the script (restarted, flushed)
        is given it, and the calls are sent again: a NOSCRIPT reply ran nothing."""
        sha = self._sha[script]
        commands = [pack(b"EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        try:
            return await self._calls(commands)
        except self._no_script:
            await self.client.script_load(script)
            return await self._calls(commands)

    async def _script_one(self, script: str, call: tuple[list[str], list[Any]]) -> Any:
        return (await self._script(script, [call]))[0]

    def _unreachable(self) -> Headers:
        if self.fail_closed:
            self.on_unavailable()
            raise StateUnavailable(
                "the gateway's state store (Redis) is unreachable, so this key's limits "
                "cannot be checked; try again shortly"
            )
        return UNENFORCED

    # -- limits

    async def admit(self, key: Key) -> Headers:
        """reserve() asking nothing of the quota and budget: the headers alone."""
        return (await self.reserve(key, NOTHING))[0]

    async def reserve(self, key: Key, ask: Ask) -> tuple[Headers, Reservation]:
        """Check and take one request for a limited key in one round trip (carrying the
        key's pending charge), holding what it asks of the quota and budget; the
        rate-limit headers (UNENFORCED when Redis is away and the state fails open) and
        the hold to settle when the request ends."""
        wall = self.wall()
        kinds = period_kinds(key)
        keys = self._keys(key, kinds, wall)
        pending = self.pending.pop(key.name, None)
        quota_at = 5 + kinds.index(key.quota_period) if key.token_quota is not None else 0
        budget_at = 5 + kinds.index(key.budget_period) if key.budget_usd is not None else 0
        new_hold = hold_id()
        args = [
            key.rpm or 0,
            key.tpm or 0,
            -1 if key.token_quota is None else key.token_quota,
            quota_at,
            -1 if key.budget_usd is None else repr(key.budget_usd),
            budget_at,
            0 if pending is None else pending.tokens,
            "0" if pending is None else repr(pending.usd),
            ask.prompt_tokens,
            ask.hold_tokens,
            repr(ask.prompt_usd),
            repr(ask.hold_usd),
            new_hold,
            len(kinds),
            *(PERIOD_TTL[kind] for kind in kinds),
            *(() if pending is None else pending.holds),
        ]
        reply = await self._round_trip(lambda: self._script(ADMIT_SCRIPT, [(keys, args)]))
        if isinstance(reply, _Unreachable):
            if pending is not None:
                self._add(key, pending.tokens, pending.usd, pending.holds)
            return self._unreachable(), Reservation(self, key)
        verdict, amount, requests_full, tokens_full, held, held_usd, partial = (
            part.decode() for part in reply[0]
        )
        headers = self._headers(key, float(requests_full), float(tokens_full))
        self.last_headers[key.name] = headers
        if verdict == "ok":
            tokens, usd, part = int(held), float(held_usd), partial == "1"
            return headers, Reservation(
                self, key, tokens, usd, part, new_hold if tokens or usd or part else ""
            )
        if verdict == "quota":
            raise quota_spent(key, int(float(amount)), int(held))
        if verdict == "budget":
            raise budget_spent(key, float(amount), float(held_usd))
        if verdict == "rpm":
            raise over_rpm(key, float(amount) / 1000)
        raise over_tpm(key, float(amount) / 1000)

    def headers(self, key: Key) -> Headers:
        """The rate-limit headers of the key's last check here (no round trip: for the
        answers to requests refused before their check)."""
        return list(self.last_headers.get(key.name, ()))

    def charge(self, key: Key, tokens: int, usd: float = 0.0) -> None:
        """After the answer: its tokens and cost, sent with the key's next check or the
        next batch."""
        if tokens <= 0 and usd <= 0:
            return
        self._add(key, tokens, usd)
        self._wake.set()

    def settle(self, reservation: Reservation, tokens: int, usd: float) -> None:
        """A request ended: its charge, and its hold let go, with the key's next check
        or the next batch (until then the hold still counts: the safe side)."""
        holds = [reservation.id] if reservation.id else []
        if tokens <= 0 and usd <= 0 and not holds:
            return
        self._add(reservation.key, max(0, tokens), max(0.0, usd), holds)
        self._wake.set()

    def _add(self, key: Key, tokens: int, usd: float, holds: list[str] | None = None) -> None:
        pending = self.pending.get(key.name)
        if pending is None:
            self.pending[key.name] = Charge(key, tokens, usd, list(holds or ()))
        else:
            pending.key = key
            pending.tokens += tokens
            pending.usd += usd
            if holds:
                pending.holds.extend(holds)

    def forget(self, names: set[str]) -> None:
        """Keys gone on reload: their last headers go (their pending spend is still sent)."""
        for name in names:
            self.last_headers.pop(name, None)

    async def report(self, key: Key) -> dict[str, Any]:
        """GET /v1/key from Redis: one pipelined round trip."""
        wall = self.wall()
        kinds = period_kinds(key)
        keys = self._keys(key, kinds, wall)

        commands = [pack(b"TIME"), *(pack(b"GET", name) for name in keys[:2])]
        commands += [pack(b"HGETALL", name) for name in keys[4:]]
        await self.flush_key(key)
        reply = await self._round_trip(lambda: self._calls(commands))
        if isinstance(reply, _Unreachable):
            raise StateUnavailable(
                "the gateway's state store (Redis) is unreachable; try again shortly"
            )
        seconds, micros = reply[0]
        now = int(seconds) * 1000 + int(micros) / 1000
        usage = KeyUsage(
            requests=_bucket(key.rpm, reply[1], now, self.clock()),
            tokens=_bucket(key.tpm, reply[2], now, self.clock()),
        )
        for kind, name, flat in zip(kinds, keys[4:], reply[3:], strict=True):
            # A map under RESP3, a flat list of pairs under RESP2.
            found = (
                flat if isinstance(flat, dict) else dict(zip(flat[::2], flat[1::2], strict=True))
            )
            usage.periods[kind] = Period(
                name.rsplit(":", 1)[-1] if kind != "total" else "total",
                int(found.get(b"requests", 0)),
                int(found.get(b"tokens", 0)),
                float(found.get(b"usd", 0.0)),
            )
        return report(key, usage, wall)

    async def flush_key(self, key: Key) -> None:
        """Send this key's pending charge now (before reading its use)."""
        pending = self.pending.pop(key.name, None)
        if pending is None:
            return
        done = await self._round_trip(
            lambda: self._script(CHARGE_SCRIPT, [self._charge_call(pending)])
        )
        if isinstance(done, _Unreachable):
            self._add(pending.key, pending.tokens, pending.usd, pending.holds)

    def _charge_call(self, pending: Charge) -> tuple[list[str], list[Any]]:
        key = pending.key
        kinds = period_kinds(key)
        args: list[Any] = [key.tpm or 0, pending.tokens, repr(pending.usd), len(kinds)]
        args += [PERIOD_TTL[kind] for kind in kinds]
        args += pending.holds
        return self._keys(key, kinds, self.wall()), args

    def _keys(self, key: Key, kinds: tuple[str, ...], wall: datetime) -> list[str]:
        base = f"{PREFIX}{{{key.name}}}:"
        names = [base + "rpm", base + "tpm", base + "held", base + "held:exp"]
        for kind in kinds:
            names.append(base + "total" if kind == "total" else
                         f"{base}{kind}:{self._period_name(kind, wall)}")  # fmt: skip
        return names

    def _headers(self, key: Key, requests_full_ms: float, tokens_full_ms: float) -> Headers:
        usage = KeyUsage()
        if key.rpm is not None:
            level = key.rpm - requests_full_ms * key.rpm / 60000
            usage.requests = Bucket(key.rpm, level, 0.0)
        if key.tpm is not None:
            level = key.tpm - tokens_full_ms * key.tpm / 60000
            usage.tokens = Bucket(key.tpm, level, 0.0)
        return [(k.encode(), v.encode()) for k, v in header_map(key, usage).items()]

    # -- the Responses id map (SPEC §9)

    def remember(self, response_id: str, creator: Creator) -> None:
        """A new id, sent at once in the next batch (another replica may be asked for it
        by the client's very next request)."""
        ids = self.pending_ids
        if response_id in ids:
            return  # the first creator keeps it
        ids[response_id] = (creator.owner, "\n".join((creator.owner, creator.slug,
                            creator.provider, creator.upstream_model)).encode())  # fmt: skip
        while len(ids) > MAX_PENDING_IDS:
            self.on_id_dropped(next(iter(ids)))
            del ids[next(iter(ids))]
        self._wake.set()

    async def find(self, response_id: str, owner: str) -> Creator | None:
        """The creator of an id `owner` made; None for an id never seen; ResponseNotFound
        for another tenant's (SPEC §13)."""
        keys = [PREFIX + "response:" + response_id, _owner_ids(owner)]
        args = [owner, int(RESPONSE_TTL)]
        replies = await self._round_trip(lambda: self._script(FIND_SCRIPT, [(keys, args)]))
        if isinstance(replies, _Unreachable):
            self._unreachable()
            return None
        reply = replies[0]
        if reply is None:
            return None
        text = reply if isinstance(reply, str) else reply.decode()
        if not text:
            raise not_found(response_id)  # another tenant's
        parts = text.split("\n")
        if len(parts) != 4 or parts[0] != owner:
            return None
        return Creator(parts[1], parts[2], parts[3], self.clock(), parts[0])

    # -- the batch: pending charges and ids, one pipelined round trip

    # -- prompt-cache affinity (gateway.state.affinity): pins every replica shares

    def pin(self, key: PinKey, entry: Entry, seconds: float) -> None:
        """Sent at once in the next batch, with its TTL: the session's next request
        may reach another replica."""
        pins = self.pending_pins
        name = _pin_key(key)
        pins.pop(name, None)  # the newest is sent last
        pins[name] = ("\n".join(entry).encode(), max(1, math.ceil(seconds)))
        while len(pins) > MAX_PENDING_IDS:
            del pins[next(iter(pins))]
        self._wake.set()

    async def pinned(self, keys: Sequence[PinKey]) -> list[Entry | None]:
        """Each key's pinned entry; one not sent yet is this process's newest. Redis
        away: only those (affinity is a preference, never a refusal)."""
        names = [_pin_key(key) for key in keys]
        replies = await self._round_trip(lambda: self._calls([pack(b"MGET", *names)]))
        found: list[Any] = [None] * len(names) if isinstance(replies, _Unreachable) else replies[0]
        out: list[Entry | None] = []
        for name, reply in zip(names, found, strict=True):
            pending = self.pending_pins.get(name)
            raw = pending[0] if pending is not None else reply
            parts = bytes(raw).decode().split("\n") if raw else []
            out.append((parts[0], parts[1]) if len(parts) == 2 else None)
        return out

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            if not self.pending_ids and not self.pending_pins:
                # A charge waits a little: the key's next check may carry it for free.
                await asyncio.sleep(CHARGE_EVERY)
            self._wake.clear()
            if not await self.flush():
                self._wake.set()
                await asyncio.sleep(RETRY_EVERY)

    async def flush(self) -> bool:
        """Send every pending charge and id; False (all kept for later) if Redis is away.
        One batch at a time: a flush waits for the one on the wire (so after it returns,
        everything pending when it was called is in Redis, or kept)."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        charges, self.pending = self.pending, {}
        ids, self.pending_ids = self.pending_ids, {}
        pins, self.pending_pins = self.pending_pins, {}
        if not charges and not ids and not pins:
            return True
        pin_calls = [
            pack(b"SET", name, value, b"EX", seconds) for name, (value, seconds) in pins.items()
        ]

        id_calls = [
            ([PREFIX + "response:" + response_id, _owner_ids(owner)],
             [value, self.ids_per_key, int(RESPONSE_TTL)])
            for response_id, (owner, value) in ids.items()
        ]  # fmt: skip
        calls = [self._charge_call(pending) for pending in charges.values()]

        async def send() -> list[Any]:
            # Both go in one batch: the ids are queued before the charges' first await.
            # An id's own error reply (OOM: Redis full) fails that id alone; the limits'
            # scripts are allowed past maxmemory and go on.
            stored = asyncio.gather(
                *(self._script_one(REMEMBER_SCRIPT, call) for call in id_calls),
                return_exceptions=True,
            )
            # A pin Redis cannot store (full) is only a preference lost.
            pinned = asyncio.gather(
                *(self.pipeline.call(call) for call in pin_calls), return_exceptions=True
            )
            await self._script(CHARGE_SCRIPT, calls)
            results = list(await stored)
            for result in (*results, *await pinned):
                if isinstance(result, BaseException) and not isinstance(
                    result, self._response_error
                ):
                    raise result  # the link itself failed: translated by _round_trip
            return results

        done = await self._round_trip(send)
        if not isinstance(done, _Unreachable):
            for (response_id, (owner, _)), result in zip(ids.items(), done, strict=True):
                if isinstance(result, self._response_error):
                    self.on_id_dropped(response_id)
                elif result != 1:
                    text = result if isinstance(result, str) else bytes(result).decode()
                    if text != owner:
                        self.on_id_taken(response_id, owner)
            return True
        for pending in charges.values():
            self._add(pending.key, pending.tokens, pending.usd, pending.holds)
        ids.update(self.pending_ids)
        self.pending_ids = ids
        pins.update(self.pending_pins)
        self.pending_pins = pins
        return False

    async def close(self) -> None:
        """On drain: stop the batch, send what is pending, close the connections."""
        await cancel(self._task)
        await self.flush()
        await self.pipeline.drop()
        await self.client.aclose()


def _nothing() -> None:
    pass


def _dropped(response_id: str) -> None:
    log.warning("responses id %s was not stored in redis", response_id)


def _taken(response_id: str, owner: str) -> None:
    pass


def _pin_key(key: PinKey) -> str:
    # Hashed: a session id is the client's (up to MAX_SESSION_ID characters).
    return PREFIX + "pin:" + hashlib.sha1("\n".join(key).encode()).hexdigest()


def _owner_ids(owner: str) -> str:
    """The sorted set of an owner's ids (by last use), under the owner's hash tag."""
    return f"{PREFIX}{{{owner}}}:responses"


def _sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


def _bucket(limit: int | None, tat: bytes | None, now: float, stamp: float) -> Bucket | None:
    if limit is None:
        return None
    ahead = max(0.0, float(tat) - now) if tat is not None else 0.0
    return Bucket(limit, limit - ahead * limit / 60000, stamp)


def _without_password(url: str) -> str:
    """The URL for log lines: a password in it is a secret (SPEC: never logged)."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest
