"""A stream's late commit while its attempts run (the Relay's)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.exchange import Outcome
from gateway.types import Send

KEEPALIVE_EVERY = 10.0
KEEPALIVE = b": keep-alive\n\n"


class KeepAlive:
    """A stream's late commit while its attempts run: once `commit_after`
    passes with no content, the 200 goes out with `: keep-alive`, then one every
    KEEPALIVE_EVERY seconds. A timer until then; a task only if it fires."""

    __slots__ = ("commit", "out", "send", "task", "timer")

    def __init__(
        self, send: Send, out: Outcome, after: float, commit: Callable[[], Awaitable[None]]
    ) -> None:
        self.send, self.out, self.commit = send, out, commit
        self.task: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = loop.call_later(after, self._fire)

    def _fire(self) -> None:
        self.timer = None
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        if not self.out.started:
            await self.commit()
        send = self.send
        while True:
            await asyncio.sleep(KEEPALIVE_EVERY)
            await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})

    async def stop(self) -> None:
        """Before the relay sends anything else: the task is gone when this returns."""
        if self.timer is not None:
            self.timer.cancel()
        task = self.task
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
            failed = None if task.cancelled() else task.exception()
            if failed is not None:
                raise failed
