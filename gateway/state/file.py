"""Spend that survives a restart (SPEC §11): the keys' periods (requests, tokens, cost)
in a local file, loaded at start and synchronised at least once a second while spend
changes, and on drain. A file that cannot be read as state is moved aside and reported,
never silently replaced.

Every process serving (one, or each of `--workers N`) adds what it spent since its last
sync to the file's totals under an exclusive lock, writes them atomically, and takes the
totals back as its own view: all workers' spend counts, each seeing the others' at most
a second late. A SIGKILL loses at most the last second of that process's spend.

The file is JSON: {"version": 1, "keys": {NAME: {"spent": N, "periods": {KIND: [PERIOD,
REQUESTS, TOKENS, USD]}}}}, every count a whole number of at least 0. Valid JSON of any
other shape is not state: it is set aside like a corrupt file (SPEC §13). Deltas are
taken on the event loop; reading, merging, writing and fsync run in a thread. A sync
that fails is logged and tried again at the next tick.

Writes go through a temp file of a fresh name created exclusively beside the state file
(O_EXCL|O_NOFOLLOW: a symlink planted at a temp path is never followed), then renamed
over it, so a reader or a crash sees the old file or the new one, never half.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import secrets
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


# What to do about a state path that cannot be used, said with every refusal to start.
WRITABLE_HINT = (
    "pass --state with a path in a writable directory "
    "(e.g. --state /var/lib/gateway/gateway.state) or --state none"
)


class StateError(Exception):
    """The state file cannot be read or written: the gateway does not start over it."""


class NotState(ValueError):
    """Bytes that are not version 1 gateway state (not JSON, or JSON of another shape)."""


class StateFile:
    def __init__(self, path: str, limiter: Limiter) -> None:
        self.path = Path(path)
        self.limiter = limiter
        self.set_aside: Path | None = None  # where a corrupt file went
        self.base: Counts = {}  # the totals as of the last sync: what is not ours to add
        self._task: asyncio.Task[None] | None = None

    # -- start

    def load(self) -> int:
        """Take the keys' spend from the file; how many keys it held. A file that is
        not state is set aside and reported; one that cannot be read refuses."""
        if self.path.is_dir():
            raise StateError(
                f"the state path {self.path} is a directory; pass a file in it "
                f"(--state {self.path / 'gateway.state'}) or --state none"
            )
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StateError(
                f"cannot read the state file {self.path}: {exc.strerror}; "
                "fix or move it, or serve with --state none"
            ) from None
        try:
            usage = _decode(raw)
        except NotState as exc:
            try:
                self._set_aside(exc)
            except OSError as err:
                raise StateError(
                    f"the state file {self.path} is not gateway state ({exc}) and cannot "
                    f"be set aside: {err.strerror}; move it, or serve with --state none"
                ) from None
            return 0
        self.limiter.usage.update(usage)
        self.base = _counts(usage, usage.keys())
        return len(usage)

    def check_writable(self) -> None:
        """Refuse, before serving, a path no sync could write (a missing or read-only
        directory): a temp file is made and removed the way a sync does, and the lock
        file opened."""
        folder = self.path.parent
        if not folder.is_dir():
            raise StateError(
                f"cannot write the state file {self.path}: the directory {folder} does "
                f"not exist; {WRITABLE_HINT}"
            )
        try:
            fd, tmp = self._create_temp()
            os.close(fd)
            os.unlink(tmp)
            os.close(self._open_lock())
        except OSError as exc:
            raise StateError(
                f"cannot write the state file {self.path}: {exc.strerror} in {folder}; "
                f"{WRITABLE_HINT}"
            ) from None

    def _set_aside(self, why: NotState) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():  # two in one second: the first is kept too
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        os.replace(self.path, aside)
        self.set_aside = aside
        log.error(
            "state file %s is not gateway state (%s): kept as %s; spend starts from %s",
            self.path,
            why,
            aside,
            "the totals this process last synced" if self.base else "zero",
        )

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
        keys that changed (here or in the file), never for every key. A failure of any
        kind is logged and the same spend goes out at the next sync."""
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
            log.error("cannot sync the state file %s: %s; trying again", self.path, text)
            return
        except Exception:
            # Not a condition of the file: a fault here. Still the timer must go on, or
            # spend would silently stop being saved.
            limiter.dirty |= dirty
            log.exception("cannot sync the state file %s; trying again", self.path)
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
        Without a delta the file is only read (it is only ever replaced whole). A file
        found replaced by something that is not state is set aside under the lock, and
        the totals this process last synced are written in its place."""
        merged: Counts | None = None
        if not delta:
            try:
                merged = self._read()
            except NotState:
                merged = None  # looked at again under the lock (another may be on it)
        if merged is None:
            fd = self._open_lock()
            try:
                _lock(fd)  # released when the descriptor closes
                try:
                    found = self._read()
                except NotState as exc:
                    self._set_aside(exc)
                    found = base
                merged = _plus(found, delta)
                if delta or found is base:
                    self._write(_encode(merged))
            finally:
                os.close(fd)
        return merged, [w for w, v in merged.items() if base.get(w) != v]

    def _read(self) -> Counts:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        usage = _decode(raw)
        return _counts(usage, usage.keys())

    def snapshot(self) -> bytes:
        return _encode(_counts(self.limiter.usage, self.limiter.usage.keys()))

    def _write(self, data: bytes) -> None:
        """Atomic: a reader (or a crash) sees the old file or the new one, never half."""
        fd, tmp = self._create_temp()
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def _create_temp(self) -> tuple[int, Path]:
        """A new file of a fresh name beside the state file, never one already there:
        O_EXCL fails on any existing name (a planted symlink included) and O_NOFOLLOW
        refuses a symlink outright."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(tmp, flags, 0o644), tmp

    def _open_lock(self) -> int:
        lock = self.path.with_name(self.path.name + ".lock")
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)

    async def close(self) -> None:
        """On drain: stop the timer, write what changed."""
        await cancel(self._task)
        await self.save()


def _decode(raw: bytes) -> dict[str, KeyUsage]:
    """Version 1 state, checked whole: anything else raises NotState saying what."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise NotState("not JSON") from None
    if not isinstance(data, dict) or data.keys() != {"version", "keys"}:
        raise NotState('not an object of "version" and "keys"')
    if data["version"] != VERSION or not isinstance(data["keys"], dict):
        raise NotState('not version 1 state with an object of "keys"')
    out: dict[str, KeyUsage] = {}
    for name, entry in data["keys"].items():
        if not isinstance(entry, dict) or entry.keys() != {"spent", "periods"}:
            raise NotState(f'key {name!r} is not an object of "spent" and "periods"')
        spent, periods = entry["spent"], entry["periods"]
        if not _count(spent) or not isinstance(periods, dict):
            raise NotState(f"key {name!r}: spent is not a count or periods not an object")
        usage = KeyUsage(spent=spent)
        for kind, value in periods.items():
            if kind not in ("day", "month", "total"):
                raise NotState(f"key {name!r}: unknown period {kind!r}")
            if not (isinstance(value, list) and len(value) == 4 and isinstance(value[0], str)):
                raise NotState(f"key {name!r}: {kind} is not [PERIOD, REQUESTS, TOKENS, USD]")
            period, requests, tokens, usd = value
            if not (_count(requests) and _count(tokens) and _usd(usd)):
                raise NotState(f"key {name!r}: {kind} holds a count that is not 0 or more")
            usage.periods[kind] = Period(period, requests, tokens, float(usd))
        out[name] = usage
    return out


def _count(value: object) -> bool:
    return type(value) is int and value >= 0  # not bool, not a string of digits


def _usd(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < math.inf


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
