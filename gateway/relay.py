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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.attempt import (
    ESTIMATED,
    AttemptCancelled,
    count_estimate,
    open_attempt,
    traced_attempt,
)
from gateway.errors import (
    GatewayError,
    UpstreamDisconnected,
    UpstreamResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.exchange import Failure, Opened, Outcome, Request
from gateway.families.responses import ResponseIds, first_id
from gateway.health import Health, observe_throughput
from gateway.latecommit import KEEPALIVE, KeepAlive
from gateway.plan import Candidate
from gateway.respond import send_bytes, send_error, server_timing
from gateway.telemetry.metrics import Histogram, Metrics
from gateway.types import Headers, Writer
from gateway.upstream.client import Upstream, UpstreamResponse
from gateway.wire.sse import EventSplitter, NestedSplicer, Splicer, splicer_for
from gateway.wire.usage import Tally, usage_parts

NO_RETRY = (b"x-should-retry", b"false")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
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

    def run(self, req: Request, out: Outcome, plan: list[Candidate]) -> Awaitable[None]:
        """The coroutine that relays `req`, writing what happens into `out` (its one
        writer): a plain function, so one coroutine level fewer for every resume of the
        request to pass through."""
        model = plan[0].model
        out.label = model.slug
        hedge_after = (
            model.hedge_after_ms / 1000 if model.hedge_after_ms and len(plan) > 1 else None
        )
        return self._run(req, out, plan, hedge_after)

    async def _run(
        self, req: Request, out: Outcome, plan: list[Candidate], hedge_after: float | None
    ) -> None:
        """The attempts, then the answer or the failure. Without hedging they run one
        after another, awaited directly (no task per attempt). A stream's late commit
        and keep-alives come from KeepAlive in either case."""
        model = plan[0].model
        keepalive = None
        if req.parsed.stream:
            keepalive = KeepAlive(
                req.send, out, model.commit_after, lambda: self._keepalive_commit(req, out)
            )
        winner: Opened | None = None
        tried = Tried()
        try:
            if hedge_after is not None:
                winner = await self._race(req, out, plan, hedge_after, tried)
            else:
                count = len(plan)

                def is_last() -> bool:
                    return out.attempts == count

                # The request's time bound travels with each attempt as a deadline: no
                # timer context of its own around the loop.
                loop = asyncio.get_running_loop()
                deadline = loop.time() + model.attempts_timeout
                for cand in plan:
                    if loop.time() >= deadline:
                        tried.timed_out = True
                        break
                    self._count_attempt(out, cand)
                    result = await self.open(
                        self.upstream, self.health, req, cand, is_last, deadline
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
            await self._give_up(req, out, tried.last, tried.timed_out)
        else:
            await self._serve(req, out, winner)

    async def _race(
        self, req: Request, out: Outcome, plan: list[Candidate], hedge_after: float, tried: Tried
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
            self._count_attempt(out, cand)
            attempt = self.open(self.upstream, self.health, req, cand, is_last)
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
                            out.hedged = True
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
                for left in await asyncio.gather(*running, return_exceptions=True):
                    if isinstance(left, Opened):
                        self._discard(left)
        return winner

    def _count_attempt(self, out: Outcome, cand: Candidate) -> None:
        out.attempts += 1
        self.metrics.attempts(cand.target.provider.name).inc()

    def _gauge(self, cand: Candidate) -> None:
        """gateway_provider_up for the entry, written only when it changes."""
        up = 1.0 if self.health.available(cand.key) else 0.0
        label = cand.label  # bounded: a wildcard entry is labelled by its pattern
        if self._up.get(label) != up:
            self._up[label] = up
            self.metrics.provider_up(*label).set(up)

    def _discard(self, opened: Opened) -> None:
        opened.close(False, AttemptCancelled("a hedge's loser"))

    async def _keepalive_commit(self, req: Request, out: Outcome) -> None:
        """The 200 before any upstream answered: the gateway's own stream headers."""
        await self._start(req, out, [*SSE_HEADERS, *req.extra_headers], None)
        await req.send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})

    async def _start(
        self, req: Request, out: Outcome, headers: Headers, upstream: float | None
    ) -> None:
        head = [*headers, *_own_headers(req, upstream)]
        await req.send({"type": "http.response.start", "status": 200, "headers": head})
        # Only once sent: a keep-alive task cancelled inside the send started nothing.
        out.commit(200)

    def _headers(
        self, req: Request, out: Outcome, opened: Opened, resp: UpstreamResponse
    ) -> Headers:
        cand = opened.cand
        return [
            *resp.headers,
            *req.extra_headers,
            (b"x-gateway-provider", cand.target.provider.name.encode()),
            (b"x-upstream-model", cand.upstream_model.encode()),
            (b"x-gateway-attempts", str(out.attempts).encode()),
        ]

    async def _serve(self, req: Request, out: Outcome, opened: Opened) -> None:
        cand, resp = opened.cand, opened.resp
        assert resp is not None  # an Opened result has its response
        # attempts_timeout bounds the tries, not an answer that has started.
        resp.relax()
        out.slug, out.label, out.price = cand.slug, cand.model.slug, cand.target.price
        out.provider, out.upstream_model, out.ttfb = (
            cand.target.provider.name,
            cand.upstream_model,
            opened.ttfb,
        )
        broke = False
        if req.family.remembers_ids and resp.status < 300:
            self._remember_id(opened, req.owner)
        try:
            if opened.body is not None:
                if out.started:
                    # A stream was committed, then the upstream answered with a whole
                    # body (no SSE): it can only travel as one event.
                    await req.send(
                        {"type": "http.response.body", "body": b"data: " + opened.body + b"\n\n"}
                    )
                else:
                    out.commit(resp.status)
                    headers = [
                        *self._headers(req, out, opened, resp),
                        *_own_headers(req, opened.latency),
                    ]
                    _settle(out, opened)
                    if out.cost_usd is not None:
                        headers.append((b"x-gateway-cost-usd", usd(out.cost_usd).encode()))
                    await send_bytes(req.send, resp.status, opened.body, headers, None)
                return
            if not out.started:
                # The head goes out with the first body bytes (ServerProtocol).
                headers = [*self._headers(req, out, opened, resp), *SSE_HEADERS[1:]]
                await self._start(req, out, headers, opened.latency)
            first = b"".join(opened.held)
            if opened.ended:
                await req.send({"type": "http.response.body", "body": first})
            else:
                broke = not await self._pump(req, opened, resp, first)
        finally:
            if not broke:
                self.health.succeeded(cand.key, opened.latency)
            opened.close(broke, UpstreamDisconnected("broke") if broke else None)
            self._gauge(cand)
            if opened.body is None:  # a whole answer was settled before it went out
                _settle(out, opened)
                if out.usage is not None and not broke:
                    self._throughput(opened, out.usage)  # streams: generation is timed apart

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

    async def _pump(
        self, req: Request, opened: Opened, resp: UpstreamResponse, held: bytes
    ) -> bool:
        """Relay `held` and the rest of the stream, and end the response; False when it
        broke (the error event was sent).

        Bytes leave as soon as nothing more is already waiting behind them: what has
        arrived together (a fast upstream's whole stream, its end included) goes out in
        one write, and nothing waits for bytes still to come."""
        send, tally = req.send, opened.tally
        splitter = opened.splitter or EventSplitter()
        splicer = opened.splicer or splicer_for(
            req.family.event_model, orjson.dumps(opened.cand.slug)
        )
        delay = self.metrics.event_delay
        clock = time.perf_counter
        writer = req.writer  # set up after the first write: off the first token's way
        pending = [held] if held else []
        arrived = clock()
        inline = False
        try:
            while True:
                if pending and not resp.ready():
                    out = b"".join(pending) if len(pending) > 1 else pending[0]
                    pending.clear()
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    delay.observe(clock() - arrived)
                    if writer is not None and not inline:
                        inline = True
                        resp.relay_inline(_inline_sink(writer, splitter, tally, splicer, delay))
                try:
                    chunk = await resp.next_chunk()
                    block = splitter.feed_block(chunk) if chunk else b""
                except GatewayError as exc:
                    if pending:
                        await send(
                            {"type": "http.response.body", "body": b"".join(pending),
                             "more_body": True}
                        )  # fmt: skip
                    await self._break(req, exc)
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
        finally:
            if inline:
                resp.relay_inline(None)

    async def _give_up(
        self, req: Request, out: Outcome, last: Failure | None, timed_out: bool
    ) -> None:
        attempts = (b"x-gateway-attempts", str(out.attempts).encode())
        answered = last is not None and last.error is None
        if out.started:
            # Committed on keep-alives and every candidate failed before content: the
            # stream can only end with the error event, coded as the SPEC's two causes.
            if timed_out and not answered:
                await self._break(req, UpstreamTimeout("every provider timed out"))
            else:
                status = f"; the last answered {last.status}" if last and answered else ""
                await self._break(req, UpstreamDisconnected(f"every provider failed{status}"))
            return
        if last is not None and answered:
            out.commit(last.status)
            # The gateway's own x-should-retry wins: the SDK must not multiply its retries.
            kept = [h for h in last.headers if h[0] != NO_RETRY[0]]
            headers = [*kept, *req.extra_headers, attempts, NO_RETRY]
            headers += _own_headers(req, None)
            await send_bytes(req.send, last.status, last.body, headers, None)
            return
        exc: GatewayError
        if last is not None and isinstance(last.error, UpstreamResponseTooLarge):
            exc = last.error  # the answer came, but over a limit: said as such
        elif timed_out:
            exc = UpstreamTimeout("every provider timed out", {"attempts": out.attempts})
        else:
            cause = last.error.details.get("cause") if last and last.error else None
            exc = UpstreamUnavailable(
                "no provider could be reached", {"attempts": out.attempts, "cause": cause}
            )
        out.commit(exc.status)
        extra = [NO_RETRY, attempts, *req.extra_headers, server_timing(req.t0)]
        await send_error(req.send, exc, req.request_id, extra, req.family)

    async def estimate(self, req: Request, out: Outcome, label: str) -> None:
        """A counting call the gateway answers itself, no upstream asked (SPEC §14): none
        of the slug's entries serves the family, or the one that would serve it says
        `count_tokens: estimate`. `label`: the catalog entry (a wildcard's pattern)."""
        out.label = label
        out.slug = req.parsed.slugs[0] if req.parsed.slugs else None
        out.commit(200)
        headers = [ESTIMATED, *req.extra_headers, *_own_headers(req, None)]
        await send_bytes(req.send, 200, count_estimate(req), headers)

    async def internal_error(self, req: Request, out: Outcome) -> None:
        """A bug inside the gateway: a 500 if nothing went out yet (else the stream
        just ends)."""
        if out.started:
            return
        out.commit(500)
        exc = GatewayError("internal gateway error")
        await send_error(req.send, exc, req.request_id, [server_timing(req.t0)], req.family)

    async def _break(self, req: Request, exc: GatewayError) -> None:
        """After commit a failure can only be told in-band, then the stream ends: in the
        family's own error event."""
        event = req.family.error_event(exc)
        await req.send({"type": "http.response.body", "body": event, "more_body": False})


def _inline_sink(
    writer: Writer,
    splitter: EventSplitter,
    tally: Tally | None,
    splicer: Splicer | NestedSplicer,
    delay: Histogram,
) -> Callable[[bytes], bool]:
    """What Relay._pump's loop does with one read, run from the upstream's data_received
    while the loop waits for it (UpstreamResponse.relay_inline): the bytes leave without
    a wake-up of the request's task (58.4 -> 36.9 k instructions per event of a paced
    stream, make bench-instructions ARGS=--paced). False, having changed nothing, when
    the client takes no writes now or the read could pass the event limit: the loop
    has it then."""
    clock = time.perf_counter

    def sink(chunk: bytes) -> bool:
        if not writer.writable() or not splitter.takes(len(chunk)):
            return False
        arrived = clock()
        block = splitter.feed_block(chunk)
        if block:
            if tally is not None:
                block = tally.block(block)
            out = splicer.block(block)
            if out:
                writer.write_now(out)
                delay.observe(clock() - arrived)
        return True

    return sink


def _own_headers(req: Request, upstream: float | None) -> Headers:
    """What the gateway adds to every answer it relays: the request id and Server-Timing."""
    return [(b"x-request-id", req.request_id), server_timing(req.t0, upstream)]


def _settle(out: Outcome, opened: Opened) -> None:
    """The answer's usage, relayed text and cost into the outcome, once."""
    tally = opened.tally
    if tally is None:
        return
    out.usage = tally.usage
    out.content_chars = tally.content_chars
    if out.price is not None and out.usage is not None:
        out.cost_usd = out.price.cost(*usage_parts(out.usage))


def usd(amount: float) -> str:
    """A cost as plain decimal dollars (no exponent), to the micro-cent."""
    return f"{amount:.8f}".rstrip("0").rstrip(".") or "0"
