"""One client request on its way through the relay (what it is, what happened to it),
and what an attempt comes back with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.body import ParsedBody
from gateway.config.routes import Price
from gateway.errors import GatewayError
from gateway.families import CHAT, Family
from gateway.health import Health
from gateway.plan import Candidate
from gateway.types import Headers, Send, Writer
from gateway.upstream.client import UpstreamResponse
from gateway.wire.estimate import text_tokens
from gateway.wire.sse import EventSplitter, NestedSplicer, Splicer
from gateway.wire.usage import Tally, usage_tokens

if TYPE_CHECKING:
    from gateway.telemetry.tracing import AttemptSpan, RequestTrace
    from gateway.upstream.websocket import UpstreamSockets


@dataclass(slots=True, kw_only=True)
class Request:
    """What one relayed request is: built by keyword by its endpoint, then only read.

    One writer, the endpoint, at construction: nothing assigns a field after. Not frozen:
    a frozen dataclass's __init__ sets each field through object.__setattr__ on every
    request (measured on 3.11 for these 14 fields: 3.2 us against 0.9). Keyword-only, and
    built through __init__ itself (ProxyEndpoint): a class called with 14 keywords costs
    9.5k instructions on 3.11, 4k so, 3.5k positionally."""

    send: Send
    request_id: bytes
    path: str  # sent upstream after the provider's base URL
    client_headers: Headers
    parsed: ParsedBody
    family: Family = CHAT
    method: bytes | None = None  # upstream method other than POST (responses by id)
    extra_headers: Headers = field(default_factory=list)  # rate-limit headers
    t0: float = 0.0  # perf_counter() when the request arrived
    count_tokens: bool = False  # the key has token limits: read `usage` from the answer
    inject_usage: bool = False  # ask streams for usage the client did not ask for
    # The family allows asking a stream for usage and the client did not: a priced entry
    # asks (SPEC §11), as inject_usage does for a token-limited key.
    may_inject: bool = False
    trace: RequestTrace | None = None  # with OpenTelemetry on (telemetry.tracing)
    owner: str = ""  # the key's name (anonymous without keys): who owns the ids made
    # A WebSocket turn's upstream sockets (sockets.py): entries with `websocket: true`
    # are sent the turn over them; None for every HTTP request.
    socket: UpstreamSockets | None = None
    # A stream's client connection, when the gateway's own server holds it (types.WRITER):
    # the relay writes an upstream's events through it as they arrive (relay._pump).
    writer: Writer | None = None


@dataclass(slots=True)
class Outcome:
    """What happened to one request: written by the relay alone, read after it by the
    endpoint for the charge, the metrics and the access log. (The client's leaving is
    the endpoint's own DisconnectWatch's.)"""

    started: bool = False  # response start sent to the client
    status: int = 0
    attempts: int = 0
    hedged: bool = False
    slug: str | None = None  # the slug that served
    label: str = ""  # the catalog entry that served (a wildcard's pattern): metric label
    provider: str | None = None
    upstream_model: str | None = None
    ttfb: float | None = None  # seconds from the serving attempt's start to content
    usage: dict[str, Any] | None = None
    price: Price | None = None  # the serving entry's
    cost_usd: float | None = None  # usage at that price, once both are known (relay)
    content_chars: int = 0  # relayed content, for an estimate when no usage came

    def commit(self, status: int) -> None:
        """The response's status line is on its way: no other answer can follow."""
        self.status = status
        self.started = True

    def charge(
        self, prompt: int, client_gone: bool, unserved: Price | None = None
    ) -> tuple[int, float]:
        """(tokens, USD) this request costs its key (SPEC §13): the upstream's usage at
        the serving entry's price; without usage (the client left, the stream broke, the
        provider sent none) the estimate of its `prompt` and of the output relayed so far,
        at the serving entry's price or, never served, at `unserved`'s. Nothing when no
        upstream served it and its client stayed (every candidate failed, or an
        upstream refused it with an error status)."""
        usage = self.usage
        if usage is not None:
            return usage_tokens(usage), self.cost_usd or 0.0
        if not client_gone and (self.provider is None or self.status >= 400):
            return 0, 0.0
        output = text_tokens(self.content_chars)
        price = self.price or unserved
        return max(1, prompt + output), price.cost(prompt, 0, output) if price else 0.0


@dataclass(slots=True)
class Failure:
    """Why one attempt did not serve."""

    error: GatewayError | None = None  # transport error: no HTTP status from upstream
    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytes = b""

    def describe(self) -> str:
        """For the console's last error: the gateway's code and message, or the status
        (an upstream's error body stays out: it may echo the request)."""
        if self.error is not None:
            return f"{self.error.code}: {self.error.message}"
        return f"HTTP {self.status} from the upstream"


@dataclass(slots=True)
class Opened:
    """One attempt from its start, and the answer it opened: content (or the end) is in.

    It owns what the attempt holds, ended once by `close`: the entry's in-flight count
    (Health.begin at its start), the upstream response, and the attempt's span."""

    cand: Candidate
    health: Health
    started_at: float
    span: AttemptSpan | None = None  # with tracing
    resp: UpstreamResponse | None = None  # once the upstream's head is in
    body: bytes | None = None  # a whole (non-SSE) answer, already spliced
    held: list[bytes] = field(default_factory=list)  # SSE events up to the first content
    splitter: EventSplitter | None = None  # set for SSE by the attempt
    splicer: Splicer | NestedSplicer | None = None  # set for SSE: the slug into `model`
    ended: bool = False  # the stream ended before content (last candidate: relay it)
    latency: float = 0.0  # seconds to the response head
    ttfb: float | None = None  # seconds to the first content
    tally: Tally | None = None  # usage and content size, when the key counts tokens

    def close(
        self,
        failed: bool,
        error: GatewayError | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        """The attempt is done with: `failed` counts against the entry (a served answer's
        success is the relay's to record; a cancelled attempt counts neither). The span
        ends with `status` (default: the response's) and `error`."""
        cand, resp = self.cand, self.resp
        key = cand.key
        if failed:
            self.health.failed(key, cand.model.cooldown, retry_after)
        self.health.end(key)
        if resp is not None:
            resp.close()
        if self.span is not None:
            if status is None:
                status = 0 if resp is None else resp.status
            self.span.end(status, error)
