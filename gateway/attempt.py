"""One upstream attempt, up to the point where it can serve: nothing is sent to the client.

An attempt ends in a Failure (the next candidate may be tried) or an Opened response:
a whole answer, or a stream read up to its first content-bearing event.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import orjson

from gateway.errors import GatewayError, UpstreamResponseTooLarge, UpstreamUnavailable
from gateway.exchange import Exchange, Failure, Opened
from gateway.health import Health
from gateway.plan import Candidate
from gateway.types import Headers
from gateway.upstream.client import Upstream
from gateway.wire.jsonscan import MODEL_KEY, replace_value
from gateway.wire.sse import CONTENT, ERROR, EventSplitter, event_spans, payload_of, splicer_for
from gateway.wire.usage import Tally, content_pattern, usage_in_body


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


_ANTHROPIC_STATUS = {"overloaded_error": 529, "rate_limit_error": 429, "api_error": 500}


def _is_json(headers: Headers) -> bool:
    return any(name == b"content-type" and b"json" in value for name, value in headers)


def inband_failure(event: bytes) -> Failure:
    """A 200 stream whose first event is an error: an HTTP error if nothing else serves."""
    payload = payload_of(event) or b""
    status = 502
    try:
        error = orjson.loads(payload)["error"]
        code = error.get("code")
        if isinstance(code, int) and 400 <= code <= 599:
            status = code
        elif error.get("type") in _ANTHROPIC_STATUS:  # messages: the type says it
            status = _ANTHROPIC_STATUS[error["type"]]
    except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
        pass
    return Failure(status=status, headers=[(b"content-type", b"application/json")], body=payload)


async def open_attempt(
    upstream: Upstream,
    health: Health,
    ex: Exchange,
    cand: Candidate,
    is_last: Callable[[], bool],
    deadline: float = math.inf,
    headers: Headers | None = None,
) -> Opened | Failure:
    """Send the request and read until the answer can be relayed (with `headers`, the
    client's as traced_attempt changed them).

    On an Opened result the caller owns the response and the health `begin`: it must
    close the one and `end` the other. On a Failure (or cancellation) both are done here.
    """
    key = cand.key
    cooldown = cand.model.cooldown
    health.begin(key)
    t0 = time.monotonic()
    keep = False
    resp = None
    try:
        priced = ex.may_inject and cand.target.price is not None
        injected = (ex.inject_usage or priced) and cand.target.provider.stream_usage
        family = ex.family
        body = ex.parsed.for_upstream(cand.upstream_model, injected) if ex.parsed.raw else b""
        try:
            resp = await upstream.send(
                cand.target.provider,
                ex.path,
                body,
                ex.client_headers if headers is None else headers,
                deadline,
                ex.method,
            )
        except GatewayError as exc:
            health.failed(key, cooldown)
            return Failure(error=exc)
        opened = Opened(cand, resp, t0, injected, latency=time.monotonic() - t0)
        if retryable(resp.status):
            try:
                err_body = await resp.read()
            except GatewayError as exc:
                health.failed(key, cooldown)
                return Failure(error=exc)
            health.failed(key, cooldown, retry_after(resp.headers))
            return Failure(status=resp.status, headers=resp.headers, body=err_body)
        model_json = orjson.dumps(cand.slug)
        if not resp.is_sse or resp.status >= 300:
            try:
                raw = await resp.read()
            except GatewayError as exc:
                health.failed(key, cooldown)
                return Failure(error=exc)
            if resp.status < 300 and not (family.binary_answer and not _is_json(resp.headers)):
                raw = replace_value(raw, MODEL_KEY, model_json)
                opened.tally = Tally(False)
                opened.tally.usage = usage_in_body(raw)
            opened.body = raw
            opened.ttfb = time.monotonic() - t0
            keep = True
            return opened

        opened.tally = Tally(injected, ex.count_tokens, content_pattern(family.content_fields))
        splicer = opened.splicer = splicer_for(family.event_model, model_json)
        splitter = opened.splitter = EventSplitter(upstream.max_event_bytes)
        held = opened.held
        # Events held before content count together toward the one-event limit.
        room = upstream.max_event_bytes
        content = False
        while not content:
            try:
                chunk = await resp.next_chunk()
                block = splitter.feed_block(chunk) if chunk else b""
                room -= len(block)
                if room < 0:
                    raise UpstreamResponseTooLarge(
                        "the events before the first content are over the event limit",
                        {"limit": upstream.max_event_bytes, "cause": "held_too_large"},
                    )
            except GatewayError as exc:
                health.failed(key, cooldown)
                return Failure(error=exc)
            if not chunk:
                rest = splitter.rest()
                if rest:
                    held.append(splicer.event(rest))
                if not is_last():
                    health.failed(key, cooldown)
                    return Failure(
                        error=UpstreamUnavailable(
                            "the stream ended before any content", {"cause": "empty_stream"}
                        )
                    )
                opened.ended = True
                keep = True
                return opened
            if not block:
                continue
            if opened.tally is not None:
                block = opened.tally.block(block)
            for start, end in event_spans(block):
                event = block[start:end]
                kind = family.classify(event)
                if kind == ERROR:
                    health.failed(key, cooldown)
                    return inband_failure(event)
                # One event is a block: the learnt line head makes it a bytes.replace.
                held.append(splicer.block(event))
                if kind == CONTENT:
                    # What came after the first content in the same read goes out as is.
                    content = True
                    held.append(splicer.block(block[end:]))
                    break
        opened.ttfb = time.monotonic() - t0
        keep = True
        return opened
    finally:
        if not keep:
            health.end(key)
            if resp is not None:
                resp.close()


async def traced_attempt(
    upstream: Upstream,
    health: Health,
    ex: Exchange,
    cand: Candidate,
    is_last: Callable[[], bool],
    deadline: float = math.inf,
) -> Opened | Failure:
    """open_attempt inside its own span, the upstream told of it by `traceparent`
    (SPEC §12); the relay picks this one only when the request is traced."""
    assert ex.trace is not None
    provider = cand.target.provider
    origin = upstream.target(provider).origin  # prepared once, not parsed per attempt
    span, headers = ex.trace.attempt(
        provider.name, cand.upstream_model, origin.host, origin.port, ex.client_headers
    )
    try:
        result = await open_attempt(upstream, health, ex, cand, is_last, deadline, headers)
    except BaseException:
        span.end(0, AttemptCancelled("the attempt was cancelled"))
        raise
    if isinstance(result, Failure):
        span.end(result.status, result.error)
    else:
        result.span = span
    return result


class AttemptCancelled(GatewayError):
    """error.type of an attempt abandoned (a hedge's loser, a client that left)."""

    code = "cancelled"
