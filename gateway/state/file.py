"""Spend that survives a restart (SPEC §11): the keys' periods (requests, tokens, cost)
in a local file, loaded at start and synchronised at least once a second while spend
changes, and on drain. A file that cannot be read as state is moved aside and reported,
never silently replaced.

Every process serving (one, or each of `--workers N`) adds what it spent since its last
sync to the file's totals under an exclusive lock, writes them atomically, and takes the
totals back as its own view: all workers' spend counts, each seeing the others' at most
a second late. A SIGKILL loses at most the last second of that process's spend.

The file is JSON: {"version": 1, "keys": {NAME: {"spent": N, "periods": {KIND: [PERIOD,
REQUESTS, TOKENS, USD]}}}}. Deltas are taken on the event loop; reading, merging, writing
and fsync run in a thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.limits import KeyUsage, Limiter, Period
from gateway.tasks import cancel

log = logging.getLogger("gateway")

VERSION = 1
EVERY = 1.0  # seconds between writes while spend changes


class StateError(Exception):
    """The state file exists but cannot be read: the gateway does not start over it."""


class StateFile:
    def __init__(self, path: str, limiter: Limiter) -> None:
        self.path = Path(path)
        self.limiter = limiter
        self.set_aside: Path | None = None  # where a corrupt file went
        self.base: Counts = {}  # the totals as of the last sync: what is not ours to add
        self._task: asyncio.Task[None] | None = None

    # -- start

    def load(self) -> int:
        """Take the keys' spend from the file; how many keys it held."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StateError(f"cannot read the state file {self.path}: {exc.strerror}") from None
        try:
            usage = _decode(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
            os.replace(self.path, aside)
            self.set_aside = aside
            log.error(
                "state file %s is not gateway state (%s): kept as %s; spend starts from zero",
                self.path,
                type(exc).__name__,
                aside,
            )
            return 0
        self.limiter.usage.update(usage)
        self.base = _counts(usage, usage.keys())
        return len(usage)

    # -- while serving

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(EVERY)
            await self.save(pull=True)

    async def save(self, pull: bool = False) -> None:
        """Add this process's spend since the last sync to the file's totals, then take
        the totals (everyone's spend) as this process's view. `pull`: read the others'
        spend even when this process spent nothing. The work on the event loop is for the
        keys that changed (here or in the file), never for every key."""
        limiter = self.limiter
        if not limiter.dirty and not pull:
            return
        dirty, limiter.dirty = limiter.dirty, set()
        captured = _counts(limiter.usage, dirty)
        delta = _minus(captured, self.base)
        base = self.base
        try:
            merged, changed = await asyncio.to_thread(self._merge, delta, base)
        except (OSError, StateError) as exc:
            limiter.dirty |= dirty  # tried again at the next sync
            text = exc.strerror if isinstance(exc, OSError) else str(exc)
            log.error("cannot sync the state file %s: %s", self.path, text)
            return
        # What was charged while the thread ran stays on top of the new totals (and
        # those keys stay dirty: their delta goes out at the next sync).
        during = _counts(limiter.usage, limiter.dirty)
        before = {w: captured.get(w) or base[w] for w in during if w in captured or w in base}
        since = _minus(during, before)
        self.base = merged
        _apply(limiter.usage, {w: merged[w] for w in changed if w not in since})
        _apply(limiter.usage, _plus({w: merged[w] for w in since if w in merged}, since))

    def _merge(self, delta: Counts, base: Counts) -> tuple[Counts, list[Where]]:
        """(the file's totals with `delta` added, the entries that differ from `base`).
        Without a delta the file is only read (it is only ever replaced whole)."""
        if delta:
            with open(self.path.with_name(self.path.name + ".lock"), "a+b") as lock:
                _lock(lock.fileno())  # released when the file closes
                merged = _plus(self._read(), delta)
                self._write(_encode(merged))
        else:
            merged = self._read()
        return merged, [w for w, v in merged.items() if base.get(w) != v]

    def _read(self) -> Counts:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            usage = _decode(raw)
        except (orjson.JSONDecodeError, ValueError, TypeError, KeyError):
            raise StateError(f"state file {self.path} changed into something else") from None
        return _counts(usage, usage.keys())

    def snapshot(self) -> bytes:
        return _encode(_counts(self.limiter.usage, self.limiter.usage.keys()))

    def _write(self, data: bytes) -> None:
        """Atomic: a reader (or a crash) sees the old file or the new one, never half."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def close(self) -> None:
        """On drain: stop the timer, write what changed."""
        await cancel(self._task)
        await self.save()


def _decode(raw: bytes) -> dict[str, KeyUsage]:
    data = orjson.loads(raw)
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError("not version 1 state")
    out: dict[str, KeyUsage] = {}
    for name, entry in data["keys"].items():
        usage = KeyUsage(spent=int(entry["spent"]))
        for kind, (period, requests, tokens, usd) in entry["periods"].items():
            if kind not in ("day", "month", "total"):
                raise ValueError(f"unknown period {kind!r}")
            usage.periods[kind] = Period(str(period), int(requests), int(tokens), float(usd))
        out[str(name)] = usage
    return out


# (key, kind) -> [period, requests, tokens, usd]; (key, "") -> [_, 0, spent, 0.0]
Where = tuple[str, str]
Counts = dict[Where, tuple[str, int, int, float]]


def _counts(usage: dict[str, KeyUsage], names: Iterable[str]) -> Counts:
    out: Counts = {}
    for name in names:
        state = usage.get(name)
        if state is None:
            continue
        if state.spent:
            out[(name, "")] = ("", 0, state.spent, 0.0)
        for kind, p in state.periods.items():
            out[(name, kind)] = (p.name, p.requests, p.tokens, p.usd)
    return out


def _plus(a: Counts, b: Counts) -> Counts:
    """b added to a; a period of b that is newer than a's replaces it, an older one is
    past and dropped."""
    out = dict(a)
    for where, (period, requests, tokens, usd) in b.items():
        have = out.get(where)
        if have is None or period > have[0]:
            out[where] = (period, requests, tokens, usd)
        elif period == have[0]:
            out[where] = (period, have[1] + requests, have[2] + tokens, have[3] + usd)
    return out


def _minus(a: Counts, b: Counts) -> Counts:
    """What a holds beyond b (a's newer periods whole)."""
    out: Counts = {}
    for where, (period, requests, tokens, usd) in a.items():
        have = b.get(where)
        if have is None or have[0] != period:
            out[where] = (period, requests, tokens, usd)
        elif (requests, tokens, usd) != have[1:]:
            out[where] = (period, requests - have[1], tokens - have[2], usd - have[3])
    return out


def _apply(usage: dict[str, KeyUsage], counts: Counts) -> None:
    for (name, kind), (period, requests, tokens, usd) in counts.items():
        state = usage.get(name)
        if state is None:
            state = usage[name] = KeyUsage()
        if kind:
            state.periods[kind] = Period(period, requests, tokens, usd)
        else:
            state.spent = tokens


def _encode(counts: Counts) -> bytes:
    keys: dict[str, Any] = {}
    for (name, kind), (period, requests, tokens, usd) in counts.items():
        entry = keys.setdefault(name, {"spent": 0, "periods": {}})
        if kind:
            entry["periods"][kind] = [period, requests, tokens, usd]
        else:
            entry["spent"] = tokens
    return orjson.dumps({"version": VERSION, "keys": keys})


LOCK_WAIT = 5.0  # seconds a sync waits for another process's; then it tries next time


def _lock(fd: int) -> None:
    """An exclusive lock, waited for at most LOCK_WAIT (a process stuck holding it must
    not stall this one's syncs for ever)."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StateError(
                    f"the state file's lock was held for over {LOCK_WAIT:g} s"
                ) from None
            time.sleep(0.01)
