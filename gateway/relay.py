"""Attempts up to the commit point, then the relay, then the error event if it breaks.

Before the client has been sent anything, every failure may move on to the next
candidate. For streams the status line is held until the first content-bearing event
(late commit), bounded by the model's `commit_after`; after that, failures become one
final `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.body import ParsedBody
from gateway.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable
from gateway.health import Health
from gateway.jsonscan import member_value, replace_value
from gateway.plan import Candidate
from gateway.respond import Send, send_bytes, send_error
from gateway.sse import MODEL_KEY, EventSplitter, data_payloads, splice_model
from gateway.upstream import Headers, Upstream, UpstreamResponse

KEEPALIVE_EVERY = 10.0
KEEPALIVE = b": keep-alive\n\n"
NO_RETRY = (b"x-should-retry", b"false")
_SSE_EXTRA = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_CONTENT_FIELDS = (
    "content",
    "tool_calls",
    "function_call",
    "refusal",
    "reasoning_content",
    "reasoning",
)

# Event kinds seen before commit.
NOTHING, CONTENT, ERROR, DONE = 0, 1, 2, 3


def retryable(status: int) -> bool:
    return status == 408 or status == 429 or status >= 500


def classify(event: bytes) -> int:
    spans = data_payloads(event)
    if not spans:
        return NOTHING
    payload = b"\n".join(event[s:e] for s, e in spans)
    if payload.strip() == b"[DONE]":
        return DONE
    try:
        obj = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return CONTENT  # not ours to judge: relay it
    if not isinstance(obj, dict):
        return CONTENT
    if obj.get("error") is not None:
        return ERROR
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return NOTHING if "usage" in obj else CONTENT
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason") or choice.get("text"):
            return CONTENT
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(f) for f in _CONTENT_FIELDS):
            return CONTENT
    return NOTHING


@dataclass(slots=True)
class Failure:
    """Why one attempt did not serve."""

    error: GatewayError | None = None  # transport error: no HTTP status from upstream
    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    retry_after: float | None = None


@dataclass(slots=True)
class Exchange:
    """One client request on its way through the relay; also what gets logged."""

    send: Send
    request_id: bytes
    path: str
    client_headers: Headers
    parsed: ParsedBody
    started: bool = False  # response start sent to the client
    status: int = 0
    attempts: int = 0
    provider: str | None = None
    upstream_model: str | None = None
    ttfb: float | None = None
    client_gone: bool = False
    usage: dict[str, Any] | None = None
    last_attempt: bool = False  # no candidate left after this one
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # rate limits
    count_tokens: bool = False  # the key has token limits: read `usage` from the answer
    inject_usage: bool = False  # ask streams for usage the client did not ask for
    injected: bool = False  # this attempt asked: hide the usage-only chunk
    content_chars: int = 0  # relayed content, for an estimate when no usage came

    def tokens(self) -> int:
        """Tokens to charge: the upstream's usage, else a quarter of the characters."""
        usage = self.usage
        if usage is not None:
            total = usage.get("total_tokens")
            if isinstance(total, int) and total >= 0:
                return total
            parts = (usage.get("prompt_tokens"), usage.get("completion_tokens"))
            return sum(p for p in parts if isinstance(p, int) and p > 0)
        if self.provider is None and not self.client_gone:
            return 0  # nothing was served
        return max(1, (self.parsed.prompt_chars() + self.content_chars) // 4)


def _usage_of(raw: bytes | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        usage = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return usage if isinstance(usage, dict) else None


def _content_length(choices: Any) -> int:
    total = 0
    if isinstance(choices, list):
        for choice in choices:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                    total += len(delta["content"])
                if isinstance(choice.get("text"), str):
                    total += len(choice["text"])
    return total


def _account(ex: Exchange, events: list[bytes]) -> list[bytes]:
    """Note usage and content size; drop the usage-only chunk the gateway asked for."""
    kept = []
    for event in events:
        spans = data_payloads(event)
        if spans:
            try:
                obj = orjson.loads(b"\n".join(event[s:e] for s, e in spans))
            except orjson.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    ex.usage = usage
                    if ex.injected and not obj.get("choices"):
                        continue
                ex.content_chars += _content_length(obj.get("choices"))
        kept.append(event)
    return kept


def _retry_after(headers: Headers) -> float | None:
    for name, value in headers:
        if name == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


class Relay:
    def __init__(self, upstream: Upstream, health: Health) -> None:
        self.upstream = upstream
        self.health = health

    async def run(self, ex: Exchange, plan: list[Candidate]) -> None:
        last: Failure | None = None
        timed_out = False
        for i, cand in enumerate(plan):
            ex.attempts += 1
            ex.last_attempt = i == len(plan) - 1
            failure = await self._attempt(ex, cand)
            if failure is None:
                return
            if ex.started:
                return
            if failure.error is not None:
                timed_out = timed_out or isinstance(failure.error, UpstreamTimeout)
                if last is None or last.error is not None:
                    last = failure
            else:
                last = failure
        await self._give_up(ex, last, timed_out)

    async def _give_up(self, ex: Exchange, last: Failure | None, timed_out: bool) -> None:
        ex.provider = None
        if last is not None and last.error is None:
            ex.status = last.status
            headers = [*last.headers, *ex.extra_headers, (b"x-request-id", ex.request_id), NO_RETRY]
            headers.append((b"x-gateway-attempts", str(ex.attempts).encode()))
            ex.started = True
            await send_bytes(ex.send, last.status, last.body, headers, content_type=None)
            return
        if timed_out:
            exc: GatewayError = UpstreamTimeout(
                "every provider timed out", {"attempts": ex.attempts}
            )
        else:
            cause = last.error.details.get("cause") if last and last.error else None
            exc = UpstreamUnavailable(
                "no provider could be reached", {"attempts": ex.attempts, "cause": cause}
            )
        ex.status = exc.status
        ex.started = True
        await send_error(
            ex.send,
            exc,
            ex.request_id,
            [NO_RETRY, (b"x-gateway-attempts", str(ex.attempts).encode()), *ex.extra_headers],
        )

    def _headers(
        self, ex: Exchange, cand: Candidate, upstream: Headers
    ) -> list[tuple[bytes, bytes]]:
        return [
            *upstream,
            *ex.extra_headers,
            (b"x-request-id", ex.request_id),
            (b"x-gateway-provider", cand.target.provider.name.encode()),
            (b"x-upstream-model", cand.upstream_model.encode()),
            (b"x-gateway-attempts", str(ex.attempts).encode()),
        ]

    async def _attempt(self, ex: Exchange, cand: Candidate) -> Failure | None:
        key = cand.key
        health = self.health
        health.begin(key)
        t0 = time.monotonic()
        resp: UpstreamResponse | None = None
        try:
            ex.injected = ex.inject_usage and cand.target.provider.stream_usage
            body = ex.parsed.for_upstream(cand.upstream_model, ex.injected)
            try:
                resp = await self.upstream.send(
                    cand.target.provider, ex.path, body, ex.client_headers
                )
            except GatewayError as exc:
                health.failed(key, cand.model.cooldown)
                return Failure(error=exc)
            latency = time.monotonic() - t0
            if retryable(resp.status):
                try:
                    err_body = await resp.read()
                except GatewayError as exc:
                    health.failed(key, cand.model.cooldown)
                    return Failure(error=exc)
                retry_after = _retry_after(resp.headers)
                health.failed(key, cand.model.cooldown, retry_after)
                return Failure(
                    status=resp.status, headers=resp.headers, body=err_body, retry_after=retry_after
                )
            if resp.is_sse and resp.status < 300:
                failure = await self._stream(ex, cand, resp, t0)
            else:
                failure = await self._whole(ex, cand, resp)
            if failure is None:
                health.succeeded(key, latency)
            else:
                health.failed(key, cand.model.cooldown)
            return failure
        finally:
            health.end(key)
            if resp is not None:
                resp.close()

    async def _whole(self, ex: Exchange, cand: Candidate, resp: UpstreamResponse) -> Failure | None:
        try:
            body = await resp.read()
        except GatewayError as exc:
            return Failure(error=exc)
        if resp.status < 300:
            body = replace_value(body, MODEL_KEY, orjson.dumps(cand.slug))
            if ex.count_tokens:
                ex.usage = _usage_of(member_value(body, b'"usage"'))
        ex.status = resp.status
        ex.provider, ex.upstream_model = cand.target.provider.name, cand.upstream_model
        ex.started = True
        await send_bytes(ex.send, resp.status, body, self._headers(ex, cand, resp.headers), None)
        return None

    async def _stream(
        self, ex: Exchange, cand: Candidate, resp: UpstreamResponse, t0: float
    ) -> Failure | None:
        send = ex.send
        splitter = EventSplitter()
        model_json = orjson.dumps(cand.slug)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cand.model.commit_after
        held: list[bytes] = []
        content = False
        read: asyncio.Task[bytes] | None = None

        async def commit(first: bytes) -> None:
            ex.status = 200
            ex.provider, ex.upstream_model = cand.target.provider.name, cand.upstream_model
            ex.started = True
            headers = self._headers(ex, cand, resp.headers) + _SSE_EXTRA
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": first, "more_body": True})

        try:
            while True:
                if content:
                    try:
                        chunk = await resp.next_chunk()
                    except GatewayError as exc:
                        await self._break(ex, exc)
                        return None
                else:
                    # Before content: wait without cancelling the read, so the hold can
                    # end in a commit (or a keep-alive) and the same read go on.
                    if read is None:
                        read = asyncio.ensure_future(resp.next_chunk())
                    wait = KEEPALIVE_EVERY if ex.started else deadline - loop.time()
                    done, _ = await asyncio.wait((read,), timeout=max(wait, 0.0))
                    if not done:
                        if ex.started:
                            await send(
                                {"type": "http.response.body", "body": KEEPALIVE, "more_body": True}
                            )
                        else:
                            await commit(KEEPALIVE + b"".join(held))
                            held = []
                        continue
                    finished, read = read, None
                    try:
                        chunk = finished.result()
                    except GatewayError as exc:
                        if ex.started:
                            await self._break(ex, exc)
                            return None
                        return Failure(error=exc)
                if not chunk:
                    rest = splitter.rest()
                    tail = splice_model(rest, model_json) if rest else b""
                    if not content and not ex.started and not ex.last_attempt:
                        return Failure(
                            error=UpstreamUnavailable(
                                "the stream ended before any content", {"cause": "empty_stream"}
                            )
                        )
                    if not ex.started:
                        await commit(b"".join(held) + tail)
                    elif tail or held:
                        await send(
                            {
                                "type": "http.response.body",
                                "body": b"".join(held) + tail,
                                "more_body": True,
                            }
                        )
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    return None
                events = splitter.feed(chunk)
                if ex.count_tokens:
                    events = _account(ex, events)
                if not events:
                    continue
                if content:
                    out = b"".join([splice_model(e, model_json) for e in events])
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                    continue
                for event in events:
                    kind = classify(event)
                    if kind == ERROR and not ex.started:
                        return self._inband(event)
                    held.append(splice_model(event, model_json))
                    if kind in (CONTENT, ERROR):
                        content = True
                        ex.ttfb = time.monotonic() - t0
                if content:
                    if ex.started:
                        await send(
                            {
                                "type": "http.response.body",
                                "body": b"".join(held),
                                "more_body": True,
                            }
                        )
                    else:
                        await commit(b"".join(held))
                    held = []
        finally:
            if read is not None:
                read.cancel()

    def _inband(self, event: bytes) -> Failure:
        """A 200 stream whose first event is an error: fail over, or answer with an HTTP error."""
        spans = data_payloads(event)
        payload = b"\n".join(event[s:e] for s, e in spans)
        status = 502
        try:
            code = orjson.loads(payload)["error"].get("code")
            if isinstance(code, int) and 400 <= code <= 599:
                status = code
        except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError):
            pass
        return Failure(
            status=status, headers=[(b"content-type", b"application/json")], body=payload
        )

    async def _break(self, ex: Exchange, exc: GatewayError) -> None:
        """After commit a failure can only be told in-band, then the stream ends."""
        ex.status = 200
        error = {"error": {"message": exc.message, "type": exc.type, "code": exc.code}}
        event = b"data: " + orjson.dumps(error) + b"\n\n"
        await ex.send({"type": "http.response.body", "body": event, "more_body": False})
