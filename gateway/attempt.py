"""One upstream attempt, up to the point where it can serve: nothing is sent to the client.

An attempt ends in a Failure (the next candidate may be tried) or an Opened response:
a whole answer, or a stream read up to its first content-bearing event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson

from gateway.config.shaping import Shaping
from gateway.errors import GatewayError, UpstreamResponseTooLarge, UpstreamUnavailable
from gateway.exchange import Failure, Opened, Request
from gateway.families import Body, Family
from gateway.health import Health
from gateway.plan import Candidate
from gateway.types import Headers
from gateway.upstream.client import Upstream, UpstreamResponse
from gateway.wire.estimate import prompt_tokens, text_tokens
from gateway.wire.jsonscan import MODEL_KEY, replace_value
from gateway.wire.shaping import DROPPED, drop_betas, drop_members, dropped_header
from gateway.wire.sse import CONTENT, ERROR, EventSplitter, event_spans, payload_of, splicer_for
from gateway.wire.usage import Tally, content_pattern, usage_in_body

if TYPE_CHECKING:
    from gateway.telemetry.tracing import AttemptSpan


# An upstream without a token-counting endpoint answers these to one: the gateway counts
# instead (SPEC §14).
NO_COUNTING = frozenset({404, 405, 501})
ESTIMATED = (b"x-gateway-count-tokens", b"estimate")  # the count is the gateway's own


def retryable(status: int) -> bool:
    return status == 408 or status == 429 or status >= 500


def retry_after(headers: Headers) -> float | None:
    for name, value in headers:
        if name == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def _is_json(headers: Headers) -> bool:
    return any(name == b"content-type" and b"json" in value for name, value in headers)


def inband_failure(family: Family, event: bytes) -> Failure:
    """A 200 stream whose first event is an error: an HTTP error if nothing else serves."""
    payload = payload_of(event) or b""
    status = family.inband_status(payload)
    return Failure(status=status, headers=[(b"content-type", b"application/json")], body=payload)


async def open_attempt(
    upstream: Upstream,
    health: Health,
    req: Request,
    cand: Candidate,
    is_last: Callable[[], bool],
    deadline: float = math.inf,
    headers: Headers | None = None,
    span: AttemptSpan | None = None,
) -> Opened | Failure:
    """Send the request and read until the answer can be relayed (with `headers` and
    `span`, the client's headers as traced_attempt changed them and the attempt's span).

    On an Opened result the caller owns it and must `close` it; a Failure (or a
    cancellation) is closed here, in the one `finally`. A transport failure is raised
    inside (a GatewayError) and becomes the Failure there."""
    health.begin(cand.key)
    t0 = time.monotonic()
    opened = Opened(cand, health, t0, span)
    failure: Failure | None = None
    try:
        priced = req.may_inject and cand.target.price is not None
        injected = (req.inject_usage or priced) and cand.target.provider.stream_usage
        family = req.family
        body = req.parsed.for_upstream(cand.upstream_model, injected) if req.parsed.raw else b""
        sent = req.client_headers if headers is None else headers
        dropped = None
        shaping = cand.target.shaping  # None unless the entry removes something
        if shaping is not None:
            sent, body, dropped = shape(shaping, sent, body, family.body is Body.JSON)
        socket = req.socket
        resp: UpstreamResponse
        if socket is not None and cand.target.websocket:
            # A WebSocket turn to an entry that speaks it: over the socket's own link.
            resp = opened.resp = await socket.send(cand.target.provider, body, sent, deadline)
        else:
            resp = opened.resp = await upstream.send(
                cand.target.provider, req.path, body, sent, deadline, req.method
            )
        if dropped is not None:
            # With the upstream's own headers, so the answer that reaches the client says
            # it, whether it is relayed as served or as the last failure (SPEC §14).
            resp.headers = [*resp.headers, (DROPPED, dropped)]
        opened.latency = time.monotonic() - t0
        # A counting call's 501 is no failure of the entry: the gateway counts (below).
        if retryable(resp.status) and not (family.counts_only and resp.status in NO_COUNTING):
            failure = Failure(status=resp.status, headers=resp.headers, body=await resp.read())
            return failure
        model_json = orjson.dumps(cand.slug)
        if not resp.is_sse or resp.status >= 300:
            raw = await resp.read()
            if resp.status < 300 and not (family.binary_answer and not _is_json(resp.headers)):
                raw = replace_value(raw, MODEL_KEY, model_json)
                opened.tally = Tally(False)
                opened.tally.usage = usage_in_body(raw)
            elif resp.status in NO_COUNTING and family.counts_only:
                # The entry has no counting endpoint: the gateway's estimate, never a 404.
                opened.resp = Estimated(resp)
                raw = count_estimate(req)
            opened.body = raw
            opened.ttfb = time.monotonic() - t0
            return opened

        opened.tally = Tally(injected, req.count_tokens, content_pattern(family.content_fields))
        splicer = opened.splicer = splicer_for(family.event_model, model_json)
        splitter = opened.splitter = EventSplitter(upstream.max_event_bytes)
        held = opened.held
        # Events held before content count together toward the one-event limit.
        room = upstream.max_event_bytes
        while True:
            chunk = await resp.next_chunk()
            if not chunk:
                rest = splitter.rest()
                if rest:
                    held.append(splicer.event(rest))
                if not is_last():
                    raise UpstreamUnavailable(
                        "the stream ended before any content", {"cause": "empty_stream"}
                    )
                opened.ended = True
                return opened
            block = splitter.feed_block(chunk)
            room -= len(block)
            if room < 0:
                raise UpstreamResponseTooLarge(
                    "the events before the first content are over the event limit",
                    {"limit": upstream.max_event_bytes, "cause": "held_too_large"},
                )
            if not block:
                continue
            if opened.tally is not None:
                block = opened.tally.block(block)
            for start, end in event_spans(block):
                event = block[start:end]
                kind = family.classify(event)
                if kind == ERROR:
                    failure = inband_failure(family, event)
                    return failure
                # One event is a block: the learnt line head makes it a bytes.replace.
                held.append(splicer.block(event))
                if kind == CONTENT:
                    # What came after the first content in the same read goes out as is.
                    held.append(splicer.block(block[end:]))
                    opened.ttfb = time.monotonic() - t0
                    return opened
    except GatewayError as exc:
        failure = Failure(error=exc)
        return failure
    except BaseException:
        opened.close(False, AttemptCancelled("the attempt was cancelled"), 0)
        raise
    finally:
        if failure is not None:
            # Only an upstream's own error answer carries a Retry-After.
            opened.close(True, failure.error, failure.status, retry_after(failure.headers))


def shape(
    shaping: Shaping, headers: Headers, body: bytes, json_body: bool
) -> tuple[Headers, bytes, bytes | None]:
    """The entry's removals (SPEC §14): betas out of the headers, members out of a JSON
    body; and the x-gateway-dropped value, None when nothing was there to remove."""
    betas: list[str] = []
    if shaping.drop_betas or shaping.allow_betas is not None:
        headers, betas = drop_betas(headers, shaping.drop_betas, shaping.allow_betas)
    fields: list[str] = []
    if shaping.drop_fields and json_body and body:
        body, fields = drop_members(body, shaping.drop_fields)
    return headers, body, dropped_header(betas, fields)


def count_estimate(req: Request) -> bytes:
    """A counting call's answer from the gateway's estimate (SPEC §14): the same prompt
    estimate admission reserves by (SPEC §13), in the family's shape."""
    try:
        tokens = prompt_tokens(orjson.loads(req.parsed.raw))
    except orjson.JSONDecodeError:  # nested past orjson's depth, though msgspec took it
        tokens = text_tokens(len(req.parsed.raw))
    return req.family.count_answer(tokens)


class Estimated:
    """What stands in for an upstream's 404, 405 or 501 to a counting call: a 200 whose
    body is the gateway's estimate. The upstream's answer (read whole) is closed with
    it; of its headers only the gateway's own x-gateway-dropped is kept."""

    __slots__ = ("_answer", "headers", "is_sse", "status")

    def __init__(self, answer: UpstreamResponse) -> None:
        self._answer = answer
        self.status = 200
        self.is_sse = False
        kept = [header for header in answer.headers if header[0] == DROPPED]
        self.headers: Headers = [(b"content-type", b"application/json"), ESTIMATED, *kept]

    async def read(self) -> bytes:
        return b""  # never read: the attempt holds the body (Opened.body)

    async def next_chunk(self) -> bytes:
        return b""

    def ready(self) -> bool:
        return True

    def relax(self) -> None:
        self._answer.relax()

    def relay_inline(self, sink: Callable[[bytes], bool] | None) -> None:
        pass  # never streamed: the attempt holds the body

    def close(self) -> None:
        self._answer.close()


async def traced_attempt(
    upstream: Upstream,
    health: Health,
    req: Request,
    cand: Candidate,
    is_last: Callable[[], bool],
    deadline: float = math.inf,
) -> Opened | Failure:
    """open_attempt inside its own span, the upstream told of it by `traceparent`
    (SPEC §12); the relay picks this one only when the request is traced."""
    assert req.trace is not None
    provider = cand.target.provider
    origin = upstream.target(provider).origin  # prepared once, not parsed per attempt
    span, headers = req.trace.attempt(
        provider.name, cand.upstream_model, origin.host, origin.port, req.client_headers
    )
    return await open_attempt(upstream, health, req, cand, is_last, deadline, headers, span)


class AttemptCancelled(GatewayError):
    """error.type of an attempt abandoned (a hedge's loser, a client that left)."""

    code = "cancelled"
