"""Run the attempts (with hedging), hold the commit, then relay the winner to the client.

Before the client has seen content, any failure moves on to the next candidate. A
stream's status line waits for the first content-bearing event (late commit), bounded
by the model's `commit_after`; past it the 200 goes out with `: keep-alive` comments.
Once content has gone out, a failure can only be told by one final error event.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.attempt import AttemptCancelled, open_attempt, traced_attempt
from gateway.errors import (
    GatewayError,
    UpstreamDisconnected,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.exchange import Exchange, Failure, Opened
from gateway.families import RESPONSES, Envelope
from gateway.families.responses import ResponseIds, first_id
from gateway.health import Health, observe_throughput
from gateway.latecommit import KEEPALIVE, KeepAlive
from gateway.plan import Candidate
from gateway.respond import send_bytes, send_error, server_timing
from gateway.telemetry.metrics import Metrics
from gateway.types import Headers
from gateway.upstream.client import Upstream
from gateway.wire.sse import EventSplitter, splicer_for
from gateway.wire.usage import usage_parts

NO_RETRY = (b"x-should-retry", b"false")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
ANTHROPIC = Envelope.ANTHROPIC
HEDGE_SHARE = 0.1  # at most this share of hedge-eligible requests start a second attempt


@dataclass(slots=True)
class Tried:
    """What a request's failed attempts come to: the failure to report (the last one with
    an HTTP status, else the last one) and whether any timed out."""

    last: Failure | None = None
    timed_out: bool = False

    def add(self, failure: Failure) -> None:
        if failure.error is None:
            self.last = failure
            return
        self.timed_out = self.timed_out or isinstance(failure.error, UpstreamTimeout)
        if self.last is None or self.last.error is not None:
            self.last = failure


class Relay:
    def __init__(
        self,
        upstream: Upstream,
        health: Health,
        metrics: Metrics,
        response_ids: ResponseIds | None = None,
        hedge_share: float = HEDGE_SHARE,
        traced: bool = False,
    ) -> None:
        # Chosen once: with tracing off no request pays for the choice.
        self.open = traced_attempt if traced else open_attempt
        self.upstream = upstream
        self.health = health
        self.metrics = metrics
        self.response_ids = ResponseIds() if response_ids is None else response_ids
        self.hedge_share = hedge_share
        self._hedge_allowance = 1.0
        self._up: dict[tuple[str, str], float] = {}

    def _take_hedge(self) -> bool:
        if self._hedge_allowance >= 1.0:
            self._hedge_allowance -= 1.0
            return True
        return False

    def run(self, ex: Exchange, plan: list[Candidate]) -> Awaitable[None]:
        """The coroutine that relays `ex`: a plain function, so one coroutine level
        fewer for every resume of the request to pass through."""
        model = plan[0].model
        ex.label = model.slug
        hedge_after = (
            model.hedge_after_ms / 1000 if model.hedge_after_ms and len(plan) > 1 else None
        )
        return self._run(ex, plan, hedge_after)

    async def _run(self, ex: Exchange, plan: list[Candidate], hedge_after: float | None) -> None:
        """The attempts, then the answer or the failure. Without hedging they run one
        after another, awaited directly (no task per attempt). A stream's late commit
        and keep-alives come from KeepAlive in either case."""
        model = plan[0].model
        keepalive = None
        if ex.parsed.stream:
            keepalive = KeepAlive(ex, model.commit_after, lambda: self._keepalive_commit(ex))
        winner: Opened | None = None
        tried = Tried()
        try:
            if hedge_after is not None:
                winner = await self._race(ex, plan, hedge_after, tried)
            else:
                count = len(plan)

                def is_last() -> bool:
                    return ex.attempts == count

                # The request's time bound travels with each attempt as a deadline: no
                # timer context of its own around the loop.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + model.attempts_timeout
                for cand in plan:
                    if loop.time() >= deadline:
                        tried.timed_out = True
                        break
                    self._count_attempt(ex, cand)
                    result = await self.open(
                        self.upstream, self.health, ex, cand, is_last, deadline
                    )
                    if isinstance(result, Opened):
                        winner = result
                        break
                    self._gauge(cand)
                    tried.add(result)
                    self.health.note(cand.key, result.describe())
        finally:
            if keepalive is not None:
                await keepalive.stop()
        if winner is None:
            await self._give_up(ex, tried.last, tried.timed_out)
        else:
            # attempts_timeout bounds the tries, not an answer that has started.
            winner.resp.relax()
            await self._serve(ex, winner)

    async def _race(
        self, ex: Exchange, plan: list[Candidate], hedge_after: float, tried: Tried
    ) -> Opened | None:
        """Attempts as tasks: a second one starts when the first is slower than
        `hedge_after` (within the hedge share), the first to open wins."""
        loop = asyncio.get_running_loop()
        pending = list(plan)
        running: dict[asyncio.Task[Opened | Failure], Candidate] = {}
        self._hedge_allowance = min(1.0, self._hedge_allowance + self.hedge_share)
        give_up_at = loop.time() + plan[0].model.attempts_timeout
        hedge_at = math.inf
        winner: Opened | None = None

        def is_last() -> bool:
            return not pending and len(running) <= 1

        def start() -> None:
            nonlocal hedge_at
            cand = pending.pop(0)
            self._count_attempt(ex, cand)
            attempt = self.open(self.upstream, self.health, ex, cand, is_last)
            running[asyncio.ensure_future(attempt)] = cand
            hedge_at = loop.time() + hedge_after if pending else math.inf

        try:
            start()
            while running:
                wake = min(hedge_at, give_up_at)
                timeout = None if wake == math.inf else max(0.0, wake - loop.time())
                done, _ = await asyncio.wait(
                    running, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    now = loop.time()
                    if now >= give_up_at:
                        # The request's time is up: the attempts still running are
                        # cancelled below and the client hears of a timeout.
                        tried.timed_out = True
                        break
                    if now >= hedge_at:
                        hedge_at = math.inf
                        if pending and self._take_hedge():
                            ex.hedged = True
                            start()
                    continue
                for task in done:
                    cand = running.pop(task)
                    result = task.result()
                    if isinstance(result, Opened):
                        if winner is None:
                            winner = result
                        else:
                            self._discard(result)
                        continue
                    self._gauge(cand)
                    tried.add(result)
                    self.health.note(cand.key, result.describe())
                if winner is not None:
                    break
                if not running and pending:
                    start()
        finally:
            if running:
                # Hedge losers, or every attempt when the client left: close them now.
                for task in running:
                    task.cancel()
                for outcome in await asyncio.gather(*running, return_exceptions=True):
                    if isinstance(outcome, Opened):
                        self._discard(outcome)
        return winner

    def _count_attempt(self, ex: Exchange, cand: Candidate) -> None:
        ex.attempts += 1
        self.metrics.attempts(cand.target.provider.name).inc()

    def _gauge(self, cand: Candidate) -> None:
        """gateway_provider_up for the entry, written only when it changes."""
        up = 1.0 if self.health.available(cand.key) else 0.0
        label = cand.label  # bounded: a wildcard entry is labelled by its pattern
        if self._up.get(label) != up:
            self._up[label] = up
            self.metrics.provider_up(*label).set(up)

    def _discard(self, opened: Opened) -> None:
        opened.resp.close()
        self.health.end(opened.cand.key)
        if opened.span is not None:
            opened.span.end(opened.resp.status, AttemptCancelled("a hedge's loser"))

    async def _keepalive_commit(self, ex: Exchange) -> None:
        """The 200 before any upstream answered: the gateway's own stream headers."""
        await self._start(ex, [*SSE_HEADERS, *ex.extra_headers], None)
        await ex.send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})

    async def _start(self, ex: Exchange, headers: Headers, upstream: float | None) -> None:
        head = [*headers, *_own_headers(ex, upstream)]
        await ex.send({"type": "http.response.start", "status": 200, "headers": head})
        # Only once sent: a keep-alive task cancelled inside the send started nothing.
        ex.commit(200)

    def _headers(self, ex: Exchange, opened: Opened) -> Headers:
        cand = opened.cand
        return [
            *opened.resp.headers,
            *ex.extra_headers,
            (b"x-gateway-provider", cand.target.provider.name.encode()),
            (b"x-upstream-model", cand.upstream_model.encode()),
            (b"x-gateway-attempts", str(ex.attempts).encode()),
        ]

    async def _serve(self, ex: Exchange, opened: Opened) -> None:
        cand, resp = opened.cand, opened.resp
        ex.slug, ex.label, ex.price = cand.slug, cand.model.slug, cand.target.price
        ex.provider, ex.upstream_model, ex.ttfb = (
            cand.target.provider.name,
            cand.upstream_model,
            opened.ttfb,
        )
        broke = False
        if ex.family is RESPONSES and resp.status < 300:
            self._remember_id(opened, ex.owner)
        try:
            if opened.body is not None:
                if ex.started:
                    # A stream was committed, then the upstream answered with a whole
                    # body (no SSE): it can only travel as one event.
                    await ex.send(
                        {"type": "http.response.body", "body": b"data: " + opened.body + b"\n\n"}
                    )
                else:
                    ex.commit(resp.status)
                    headers = [*self._headers(ex, opened), *_own_headers(ex, opened.latency)]
                    _settle(ex, opened)
                    if ex.cost_usd is not None:
                        headers.append((b"x-gateway-cost-usd", usd(ex.cost_usd).encode()))
                    await send_bytes(ex.send, resp.status, opened.body, headers, None)
                return
            if not ex.started:
                # The head goes out with the first body bytes (gateway/server/protocol.py).
                headers = [*self._headers(ex, opened), *SSE_HEADERS[1:]]
                await self._start(ex, headers, opened.latency)
            first = b"".join(opened.held)
            if opened.ended:
                await ex.send({"type": "http.response.body", "body": first})
            else:
                broke = not await self._pump(ex, opened, first)
        finally:
            key = cand.key
            if broke:
                self.health.failed(key, cand.model.cooldown)
            else:
                self.health.succeeded(key, opened.latency)
            self.health.end(key)
            self._gauge(cand)
            resp.close()
            if opened.span is not None:
                opened.span.end(resp.status, UpstreamDisconnected("broke") if broke else None)
            if opened.body is None:  # a whole answer was settled before it went out
                _settle(ex, opened)
                if ex.usage is not None and not broke:
                    self._throughput(opened, ex.usage)  # streams: generation is timed apart

    def _throughput(self, opened: Opened, usage: dict[str, Any]) -> None:
        """A stream's output tokens per second after its first content, for
        provider.sort: throughput (a whole answer's time mixes in the wait for it)."""
        # Two gets, not usage_parts: this runs for every answer with usage.
        completion = usage.get("completion_tokens") or usage.get("output_tokens")
        if completion.__class__ is not int:
            return
        seconds = time.monotonic() - opened.started_at - (opened.ttfb or 0.0)
        if completion > 0 and seconds > 0.001:
            observe_throughput(self.health.state(opened.cand.key), completion / seconds)

    def _remember_id(self, opened: Opened, owner: str) -> None:
        """A created response's id -> the entry and the key that made it (SPEC §9, §13)."""
        first = opened.body if opened.body is not None else b"".join(opened.held)
        found = first_id(first)
        if found is not None:
            cand = opened.cand
            self.response_ids.remember(
                found, cand.slug, cand.target.provider.name, cand.upstream_model, owner
            )

    async def _pump(self, ex: Exchange, opened: Opened, held: bytes) -> bool:
        """Relay `held` and the rest of the stream, and end the response; False when it
        broke (the error event was sent).

        Bytes leave as soon as nothing more is already waiting behind them: what has
        arrived together (a fast upstream's whole stream, its end included) goes out in
        one write, and nothing waits for bytes still to come."""
        send, resp, tally = ex.send, opened.resp, opened.tally
        splitter = opened.splitter or EventSplitter()
        splicer = opened.splicer or splicer_for(
            ex.family.event_model, orjson.dumps(opened.cand.slug)
        )
        delay = self.metrics.event_delay
        clock = time.perf_counter
        pending = [held] if held else []
        arrived = clock()
        while True:
            if pending and not resp.ready():
                out = b"".join(pending) if len(pending) > 1 else pending[0]
                pending.clear()
                await send({"type": "http.response.body", "body": out, "more_body": True})
                delay.observe(clock() - arrived)
            try:
                chunk = await resp.next_chunk()
                block = splitter.feed_block(chunk) if chunk else b""
            except GatewayError as exc:
                if pending:
                    await send(
                        {"type": "http.response.body", "body": b"".join(pending), "more_body": True}
                    )
                await self._break(ex, exc)
                return False
            if not pending:
                arrived = clock()
            if not chunk:
                rest = splitter.rest()
                if rest:
                    pending.append(splicer.event(rest))
                await send({"type": "http.response.body", "body": b"".join(pending)})
                return True
            if block:
                if tally is not None:
                    block = tally.block(block)
                out = splicer.block(block)
                if out:
                    pending.append(out)

    async def _give_up(self, ex: Exchange, last: Failure | None, timed_out: bool) -> None:
        attempts = (b"x-gateway-attempts", str(ex.attempts).encode())
        answered = last is not None and last.error is None
        if ex.started:
            # Committed on keep-alives and every candidate failed before content: the
            # stream can only end with the error event, coded as the SPEC's two causes.
            if timed_out and not answered:
                await self._break(ex, UpstreamTimeout("every provider timed out"))
            else:
                status = f"; the last answered {last.status}" if last and answered else ""
                await self._break(ex, UpstreamDisconnected(f"every provider failed{status}"))
            return
        if last is not None and answered:
            ex.commit(last.status)
            # The gateway's own x-should-retry wins: the SDK must not multiply its retries.
            kept = [h for h in last.headers if h[0] != NO_RETRY[0]]
            headers = [*kept, *ex.extra_headers, attempts, NO_RETRY]
            headers += _own_headers(ex, None)
            await send_bytes(ex.send, last.status, last.body, headers, None)
            return
        exc: GatewayError
        if last is not None and isinstance(last.error, UpstreamResponseTooLarge):
            exc = last.error  # the answer came, but over a limit: said as such
        elif timed_out:
            exc = UpstreamTimeout("every provider timed out", {"attempts": ex.attempts})
        else:
            cause = last.error.details.get("cause") if last and last.error else None
            exc = UpstreamUnavailable(
                "no provider could be reached", {"attempts": ex.attempts, "cause": cause}
            )
        ex.commit(exc.status)
        extra = [NO_RETRY, attempts, *ex.extra_headers, server_timing(ex.t0)]
        await send_error(ex.send, exc, ex.request_id, extra, ex.family.envelope is ANTHROPIC)

    async def internal_error(self, ex: Exchange) -> None:
        """A bug inside the gateway: a 500 if nothing went out yet (else the stream
        just ends)."""
        if ex.started:
            return
        ex.commit(500)
        exc = GatewayError("internal gateway error")
        anthropic = ex.family.envelope is ANTHROPIC
        await send_error(ex.send, exc, ex.request_id, [server_timing(ex.t0)], anthropic)

    async def _break(self, ex: Exchange, exc: GatewayError) -> None:
        """After commit a failure can only be told in-band, then the stream ends: in the
        family's own error event (chat: a data line; responses and messages: `event:
        error`)."""
        family = ex.family
        if family.envelope is ANTHROPIC:
            event = b"event: error\ndata: " + exc.body(anthropic=True) + b"\n\n"
        elif family.content_types:
            typed = {"type": "error", "code": exc.code, "message": exc.message, "param": None}
            event = b"event: error\ndata: " + orjson.dumps(typed) + b"\n\n"
        else:
            error = {"error": {"message": exc.message, "type": exc.type, "code": exc.code}}
            event = b"data: " + orjson.dumps(error) + b"\n\n"
        await ex.send({"type": "http.response.body", "body": event, "more_body": False})


def _own_headers(ex: Exchange, upstream: float | None) -> Headers:
    """What the gateway adds to every answer it relays: the request id and Server-Timing."""
    return [(b"x-request-id", ex.request_id), server_timing(ex.t0, upstream)]


def _settle(ex: Exchange, opened: Opened) -> None:
    """The answer's usage, relayed text and cost into the exchange, once."""
    tally = opened.tally
    if tally is None:
        return
    ex.usage = tally.usage
    ex.content_chars = tally.content_chars
    if ex.price is not None and ex.usage is not None:
        ex.cost_usd = ex.price.cost(*usage_parts(ex.usage))


def usd(amount: float) -> str:
    """A cost as plain decimal dollars (no exponent), to the micro-cent."""
    return f"{amount:.8f}".rstrip("0").rstrip(".") or "0"
