"""The relayed paths (families.RELAYED), as plain ASGI callables: no Request/Response
objects of a framework. What the gateway answers itself is in the info module."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from gateway.auth import authenticate
from gateway.body import ClientGone, ParsedBody, parse_body, parse_multipart, read_body
from gateway.config.keys import Key
from gateway.config.routes import Routes
from gateway.errors import (
    ApiNotSupported,
    ClientLeft,
    GatewayError,
    MethodNotAllowed,
)
from gateway.exchange import Outcome, Request
from gateway.families import (
    AZURE_DEPLOYMENT,
    RELAYED,
    RESPONSES_BY_ID,
    Body,
    Endpoint,
)
from gateway.families.responses import ANONYMOUS, not_found
from gateway.incoming import Incoming
from gateway.info import NotFoundEndpoint
from gateway.plan import Candidate, build_plan
from gateway.reservation import NOTHING, Reservation, ask_for
from gateway.respond import send_error, server_timing
from gateway.runtime import Runtime
from gateway.state.redis import UNENFORCED
from gateway.types import WRITER, Receive, Scope, Send

if TYPE_CHECKING:
    from gateway.upstream.websocket import UpstreamSockets

log = logging.getLogger("gateway")

WATCH_AFTER = 0.02  # seconds before a request starts listening for its client leaving
_NONE: dict[str, Any] = {}  # a scope without extensions (ASGI servers other than ours)


class DisconnectWatch:
    """Cancels the request's task when its client goes away.

    The listening task starts only once the request has run WATCH_AFTER seconds: most
    answers are done by then, and a task per request cost ~8 % of throughput. A client
    that left earlier is seen at once when it starts, so an upstream still learns of it
    within WATCH_AFTER plus a loop turn. `gone`, its one writer the watch: the client
    left."""

    __slots__ = ("gone", "receive", "task", "timer", "watcher")

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.receive, self.task = receive, task
        self.gone = False
        self.watcher: asyncio.Task[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start)

    def _start(self) -> None:
        self.watcher = asyncio.ensure_future(_watch_disconnect(self))

    def stop(self) -> None:
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


async def _watch_disconnect(watch: DisconnectWatch) -> None:
    receive = watch.receive
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            watch.gone = True
            watch.task.cancel()
            return


class ProxyEndpoint:
    """Every relayed path (families.RELAYED): one endpoint per family and path."""

    def __init__(self, runtime: Runtime, endpoint: Endpoint) -> None:
        self.runtime = runtime
        self.family = endpoint.family
        self.path = endpoint.upstream_path
        # Read per request; an enum member's lookup goes through its metaclass each time.
        self.multipart = endpoint.family.body is Body.MULTIPART

    async def __call__(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        path_slug: str | None = None,
        upstream_path: str | None = None,
        response_id: str | None = None,
        socket: UpstreamSockets | None = None,
    ) -> None:
        """The ASGI call; the others come from AzureDeployment and ResponseById:
        `path_slug`, Azure's deployment from the path; `upstream_path`, a path of its
        own; `response_id`, a responses lookup by id (GET, DELETE or a POST without a
        body of its own); `socket`, a WebSocket turn's upstream sockets (sockets.py)."""
        t0 = time.perf_counter()
        if upstream_path is None:
            upstream_path = self.path
        incoming = Incoming(scope["headers"])
        rid = incoming.request_id
        runtime = self.runtime
        config = runtime.config  # this request's snapshot, whatever a reload does meanwhile
        family = self.family
        method = scope["method"]
        if response_id is None and method != "POST":
            extra = [(b"allow", b"POST"), server_timing(t0)]
            await send_error(send, MethodNotAllowed("use POST"), rid, extra, family)
            return
        key: Key | None = None
        reservation: Reservation | None = None
        ask = NOTHING
        limiter = runtime.limiter
        tracing = runtime.tracing
        trace = None if tracing is None else tracing.request(family, scope["headers"])
        try:
            key = authenticate(config.keys, incoming.token())
            raw = await read_body(
                receive, runtime.settings.max_body_bytes, incoming.declared_length()
            )
            session = incoming.session_id.decode("latin-1") if incoming.session_id else None
            owner = key.name if key is not None else ANONYMOUS
            counts_only = family.counts_only
            counting = key is not None and limiter.counts_tokens(key) and not counts_only
            pinned = None
            if response_id is not None:
                parsed = ParsedBody(raw, (), False, session, None, False)
                previous: str | None = response_id
            elif self.multipart:
                parsed = parse_multipart(raw, incoming.content_type, session)
                previous = None
            else:
                parsed = parse_body(raw, family, session, counting, path_slug)
                previous = parsed.previous_response_id
            if previous is not None:
                # Another key's id answers as an unknown one (SPEC §13), model or not.
                creator = await runtime.find_response(previous, owner)
                if creator is not None:
                    pinned = (creator.provider, creator.upstream_model)
                    # The creator's slug, whatever `model` says (ParsedBody's one writer
                    # stays parse_body: this is a copy).
                    parsed = dataclasses.replace(parsed, slugs=(creator.slug,))
                elif not parsed.slugs:
                    raise not_found(previous)
            affinity = None
            if parsed.session_id is not None and pinned is None:
                affinity = await runtime.affinity.lookup(
                    config.routes, owner, parsed.session_id, parsed.slugs
                )
            try:
                plan = build_plan(
                    config.routes,
                    parsed,
                    key,
                    runtime.health,
                    runtime.strategies,
                    family,
                    pinned,
                    affinity,
                )
            except ApiNotSupported:
                if not counts_only:
                    raise
                plan = []  # no entry of the slug counts: the gateway does (SPEC §14)
            rate_headers: list[tuple[bytes, bytes]] = []
            if key is not None and counts_only:
                limiter.count_call(key)  # never rpm, never charged: their own limit
            elif key is not None and limiter.limited(key):
                if counting:
                    ask = ask_for(
                        key,
                        parsed.prompt_tokens,
                        parsed.output_allowance,
                        (cand.target.price for cand in plan),
                    )
                shared = runtime.shared
                if shared is None:
                    rate_headers, reservation = limiter.reserve(key, ask)
                else:
                    rate_headers, reservation = await shared.reserve(key, ask)
                    if rate_headers is UNENFORCED:
                        runtime.unenforced(key, rid)
                        rate_headers = []  # the sentinel itself is never handed on
                if not counting:
                    reservation = None  # rpm alone: nothing is charged after
        except GatewayError as exc:
            extra = []
            if key is not None and limiter.limited(key):
                extra = runtime.limits.headers(key)
            extra.append(server_timing(t0))
            await send_error(send, exc, rid, extra, family)
            runtime.refused(exc, key, rid, upstream_path, time.perf_counter() - t0)
            if trace is not None:
                trace.end(None, exc.status, error=exc)
            return
        except ClientGone:
            if trace is not None:
                trace.end(None, 0, error=ClientLeft("the client left before its request"))
            return
        may_inject = family.injects_usage and parsed.stream and not parsed.asked_usage
        # By keyword through __init__ itself: calling the class with keywords costs ~5k
        # more instructions on 3.11 (type.__call__ packs them into a dict for __init__).
        req = object.__new__(Request)
        Request.__init__(
            req,
            send=send,
            request_id=rid,
            path=upstream_path,
            client_headers=scope["headers"],
            parsed=parsed,
            family=family,
            method=None if response_id is None else method.encode(),
            extra_headers=rate_headers,
            t0=t0,
            count_tokens=counting,
            inject_usage=counting and may_inject,
            may_inject=may_inject,
            trace=trace,
            owner=owner,
            socket=socket,
            # Writes that bypass `send`: a wrapper of send that changed body bytes would
            # be skipped, so such wrappers (sockets.py's turns) leave the extension out.
            writer=scope.get("extensions", _NONE).get(WRITER) if parsed.stream else None,
        )
        out = Outcome()
        estimate = None
        if counts_only and (not plan or plan[0].target.count_estimate):
            estimate = _catalog_label(config.routes, parsed.slugs, plan)
        task = asyncio.current_task()
        assert task is not None
        watch = DisconnectWatch(receive, task)
        runtime.metrics.in_flight.inc()
        try:
            if estimate is None:
                await runtime.relay.run(req, out, plan)
            else:
                await runtime.relay.estimate(req, out, estimate)
        except asyncio.CancelledError:
            if not watch.gone:
                raise
            # The client left: the relay's finally blocks closed the upstream already.
            task.uncancel()
        except Exception:
            log.exception("request %s failed inside the gateway", rid.decode())
            await runtime.relay.internal_error(req, out)
        finally:
            watch.stop()
            runtime.metrics.in_flight.dec()
            tokens = 0
            if reservation is not None:
                # The one place a request's hold ends: settled with what it cost (its
                # usage, else the estimate), or released when nothing was served.
                tokens, usd = out.charge(parsed.prompt_tokens, watch.gone, ask.price)
                if tokens or usd:
                    reservation.settle(tokens, usd)
                else:
                    reservation.release()
            runtime.served(req, out, key, tokens, time.perf_counter() - t0, watch.gone)
            session = parsed.session_id
            # A count_tokens call never moves a pin (it may fail over to another entry).
            if (
                session is not None
                and out.slug
                and out.upstream_model
                and out.status < 400
                and not counts_only
            ):
                provider = out.provider or ""
                runtime.affinity.record(
                    config.routes, owner, session, out.slug, (provider, out.upstream_model)
                )
            if trace is not None:
                slug = out.slug or (parsed.slugs[0] if parsed.slugs else None)
                gone = ClientLeft("the client left") if watch.gone else None
                trace.end(
                    slug,
                    out.status,
                    out.provider,
                    out.upstream_model,
                    out.usage,
                    gone,
                    parsed.session_id,
                )


def _catalog_label(routes: Routes, slugs: tuple[str, ...], plan: list[Candidate]) -> str:
    """The catalog entry a gateway-answered count is labelled by (a wildcard's pattern,
    never what it captured: metric labels stay bounded)."""
    if plan:
        return plan[0].model.slug
    model = routes.resolve(slugs[0]) if slugs else None
    return model.slug if model is not None else "(none)"


class AzureDeployment:
    """POST /openai/deployments/{slug}/chat/completions (and /completions, /embeddings):
    Azure OpenAI's paths; the deployment is the slug, the client's api-version ignored."""

    def __init__(self, runtime: Runtime) -> None:
        self.endpoints = {
            path: ProxyEndpoint(runtime, Endpoint(RELAYED["/" + path], "/" + path))
            for path in AZURE_DEPLOYMENT
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope.get("path_params", {})
        endpoint = self.endpoints.get(params.get("rest", ""))
        if endpoint is None:
            await NotFoundEndpoint(next(iter(self.endpoints.values())).runtime)(
                scope, receive, send
            )
            return
        await endpoint(scope, receive, send, params["slug"], endpoint.path)


class ResponseById:
    """GET/DELETE /v1/responses/{id}, POST /v1/responses/{id}/cancel, GET
    /v1/responses/{id}/input_items: to the provider entry that created the id."""

    def __init__(self, runtime: Runtime) -> None:
        self.endpoint = ProxyEndpoint(runtime, Endpoint(RESPONSES_BY_ID, "/responses"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        params = scope.get("path_params", {})
        response_id, tail = params["response_id"], params.get("tail", "")
        allowed = _BY_ID_METHODS.get(tail)
        if allowed is None or not _RESPONSE_ID.fullmatch(response_id):
            await NotFoundEndpoint(self.endpoint.runtime)(scope, receive, send)
            return
        if scope["method"] not in allowed:
            rid = Incoming(scope["headers"]).request_id
            extra = [(b"allow", ", ".join(allowed).encode())]
            await send_error(send, MethodNotAllowed(f"use {' or '.join(allowed)}"), rid, extra)
            return
        path = f"/responses/{response_id}{tail}"
        query = scope.get("query_string", b"")
        if query:
            path += "?" + query.decode("latin-1")
        await self.endpoint(scope, receive, send, None, path, response_id)


_RESPONSE_ID = re.compile(r"[A-Za-z0-9_.:-]{1,256}")
_BY_ID_METHODS = {"": ("GET", "DELETE"), "/cancel": ("POST",), "/input_items": ("GET",)}
