"""Spend that survives a restart (SPEC §11): the keys' periods (requests, tokens, cost)
in a local file, written atomically at least once a second while it changes and on
drain, loaded at start. A file that cannot be read as state is moved aside and
reported, never silently replaced.

The file is JSON: {"version": 1, "keys": {NAME: {"spent": N, "periods": {KIND: [PERIOD,
REQUESTS, TOKENS, USD]}}}}. The snapshot is built on the event loop (a dict per key);
writing and fsync run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from gateway.limits import KeyUsage, Limiter, Period

log = logging.getLogger("gateway")

VERSION = 1
EVERY = 1.0  # seconds between writes while spend changes


class StateError(Exception):
    """The state file exists but cannot be read: the gateway does not start over it."""


class StateFile:
    def __init__(self, path: str, limiter: Limiter) -> None:
        self.path = Path(path)
        self.limiter = limiter
        self.written = -1  # the limiter's version last written
        self.set_aside: Path | None = None  # where a corrupt file went
        self._task: asyncio.Task[None] | None = None

    # -- start

    def load(self) -> int:
        """Restore the keys' spend from the file; how many keys it held."""
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
        self.written = self.limiter.version
        return len(usage)

    # -- while serving

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(EVERY)
            await self.save()

    async def save(self) -> None:
        version = self.limiter.version
        if version == self.written:
            return
        data = self.snapshot()
        try:
            await asyncio.to_thread(self._write, data)
        except OSError as exc:
            log.error("cannot write the state file %s: %s", self.path, exc.strerror)
            return
        self.written = version

    def snapshot(self) -> bytes:
        keys: dict[str, Any] = {}
        for name, usage in self.limiter.usage.items():
            if usage.periods or usage.spent:
                keys[name] = {
                    "spent": usage.spent,
                    "periods": {
                        kind: [p.name, p.requests, p.tokens, p.usd]
                        for kind, p in usage.periods.items()
                    },
                }
        return orjson.dumps({"version": VERSION, "keys": keys})

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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
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
