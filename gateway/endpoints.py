"""HTTP handlers. The relaying ones are plain ASGI callables: no Request/Response objects."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any

import orjson

from gateway.auth import authenticate, bearer_token
from gateway.body import ClientGone, parse_body, read_body
from gateway.errors import (
    BadRequest,
    GatewayError,
    MethodNotAllowed,
    ModelNotListed,
    NotFound,
)
from gateway.exchange import Exchange
from gateway.keys import Key
from gateway.metrics import CONTENT_TYPE
from gateway.plan import build_plan
from gateway.respond import Receive, Scope, Send, send_bytes, send_error, server_timing
from gateway.runtime import Runtime

log = logging.getLogger("gateway")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")


class Incoming:
    """The few request headers the gateway reads, found in one pass."""

    __slots__ = ("authorization", "content_length", "request_id", "session_id")

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.authorization: bytes | None = None
        self.content_length: bytes | None = None
        self.session_id: bytes | None = None
        request_id: bytes | None = None
        for name, value in headers:
            if name == b"authorization":
                self.authorization = value
            elif name == b"content-length":
                self.content_length = value
            elif name == b"x-request-id":
                request_id = value
            elif name == b"x-session-id":
                self.session_id = value
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = os.urandom(12).hex().encode()
        self.request_id = request_id

    def token(self) -> bytes | None:
        if self.authorization is None:
            return None
        return bearer_token(self.authorization)

    def declared_length(self) -> int | None:
        if self.content_length is None:
            return None
        try:
            return int(self.content_length)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None


WATCH_AFTER = 0.02  # seconds before a request starts listening for its client leaving


class DisconnectWatch:
    """Cancels the request's task when its client goes away.

    The listening task starts only once the request has run WATCH_AFTER seconds: most
    answers are done by then, and a task per request cost ~8 % of throughput. A client
    that left earlier is seen at once when it starts, so an upstream still learns of it
    within WATCH_AFTER plus a loop turn."""

    __slots__ = ("ex", "receive", "task", "timer", "watcher")

    def __init__(self, receive: Receive, task: asyncio.Task[Any], ex: Exchange) -> None:
        self.receive, self.task, self.ex = receive, task, ex
        self.watcher: asyncio.Task[None] | None = None
        self.timer = asyncio.get_running_loop().call_later(WATCH_AFTER, self._start)

    def _start(self) -> None:
        self.watcher = asyncio.ensure_future(_watch_disconnect(self.receive, self.task, self.ex))

    def stop(self) -> None:
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


async def _watch_disconnect(receive: Receive, task: asyncio.Task[Any], ex: Exchange) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            ex.client_gone = True
            task.cancel()
            return


class ProxyEndpoint:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings."""

    def __init__(self, runtime: Runtime, path: str) -> None:
        self.runtime = runtime
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        incoming = Incoming(scope["headers"])
        rid = incoming.request_id
        runtime = self.runtime
        config = runtime.config  # this request's snapshot, whatever a reload does meanwhile
        if scope["method"] != "POST":
            extra = [(b"allow", b"POST"), server_timing(t0)]
            await send_error(send, MethodNotAllowed("use POST"), rid, extra)
            return
        key: Key | None = None
        limiter = runtime.limiter
        try:
            key = authenticate(config.keys, incoming.token())
            raw = await read_body(
                receive, runtime.settings.max_body_bytes, incoming.declared_length()
            )
            session = incoming.session_id.decode("latin-1") if incoming.session_id else None
            counting = key is not None and limiter.counts_tokens(key)
            parsed = parse_body(raw, self.path, session, counting)
            plan = build_plan(config.routes, parsed, key, runtime.health, runtime.strategies)
            limited = key is not None and limiter.limited(key)
            rate_headers = limiter.admit(key) if key is not None and limited else []
        except GatewayError as exc:
            extra = limiter.headers(key) if key is not None and limiter.limited(key) else []
            extra.append(server_timing(t0))
            await send_error(send, exc, rid, extra)
            runtime.refused(exc, key, rid, self.path, time.perf_counter() - t0)
            return
        except ClientGone:
            return
        ex = Exchange(send, rid, self.path, scope["headers"], parsed, rate_headers, t0)
        if key is not None and limiter.counts_tokens(key):
            ex.count_tokens = True
            ex.inject_usage = parsed.stream and not parsed.asked_usage
        task = asyncio.current_task()
        assert task is not None
        watch = DisconnectWatch(receive, task, ex)
        runtime.metrics.in_flight.inc()
        try:
            await runtime.relay.run(ex, plan)
        except asyncio.CancelledError:
            if not ex.client_gone:
                raise
            # The client left: the relay's finally blocks closed the upstream already.
            task.uncancel()
        except Exception:
            log.exception("request %s failed inside the gateway", rid.decode())
            if not ex.started:
                ex.status = 500
                await send_error(
                    send, GatewayError("internal gateway error"), rid, [server_timing(t0)]
                )
        finally:
            watch.stop()
            runtime.metrics.in_flight.dec()
            tokens = ex.tokens() if ex.count_tokens and key is not None else 0
            if tokens and key is not None:
                limiter.charge(key, tokens)
            runtime.served(ex, key, tokens, time.perf_counter() - t0)


class JsonEndpoint:
    """GET endpoints answering small JSON documents; errors in the same envelope."""

    auth = True

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        incoming = Incoming(scope["headers"])
        rid = incoming.request_id
        if scope["method"] not in ("GET", "HEAD"):
            extra = [(b"allow", b"GET"), server_timing(t0)]
            await send_error(send, MethodNotAllowed("use GET"), rid, extra)
            return
        try:
            key = authenticate(self.runtime.config.keys, incoming.token()) if self.auth else None
            body = orjson.dumps(self.answer(key, scope.get("path_params", {})))
        except GatewayError as exc:
            await send_error(send, exc, rid, [server_timing(t0)])
            return
        await send_bytes(send, 200, body, [(b"x-request-id", rid), server_timing(t0)])

    def answer(self, key: Key | None, params: dict[str, Any]) -> Any:
        raise NotImplementedError


class ModelList(JsonEndpoint):
    def answer(self, key: Key | None, params: dict[str, Any]) -> Any:
        routes = self.runtime.config.routes
        created = self.runtime.started_at
        data = [
            _model_object(slug, model.targets[0].provider.name, created)
            for slug, model in routes.models.items()
            if key is None or key.allows(slug)
        ]
        return {"object": "list", "data": data}


class ModelRetrieve(JsonEndpoint):
    def answer(self, key: Key | None, params: dict[str, Any]) -> Any:
        slug = params["slug"]
        model = self.runtime.config.routes.resolve(slug)
        if model is None or (key is not None and not key.allows(slug)):
            raise ModelNotListed(f"model {slug!r} does not exist", {"model": slug})
        return _model_object(slug, model.targets[0].provider.name, self.runtime.started_at)


def _model_object(slug: str, owner: str, created: int) -> dict[str, Any]:
    return {"id": slug, "object": "model", "created": created, "owned_by": owner}


def _visible(key: Key | None, slug: str) -> bool:
    """Catalog entries a key may see: slugs it may use, patterns its globs cover."""
    return key is None or key.allows(slug)


class RouterModels(JsonEndpoint):
    def answer(self, key: Key | None, params: dict[str, Any]) -> Any:
        data = [
            {"id": m.id, "slug": m.slug, "name": m.name}
            for m in self.runtime.config.routes.catalog()
            if _visible(key, m.slug)
        ]
        return {"object": "list", "data": data}


class RouterProviders(JsonEndpoint):
    def answer(self, key: Key | None, params: dict[str, Any]) -> Any:
        model_id = params["model_id"]
        routes = self.runtime.config.routes
        model = routes.by_id(model_id) or routes.models.get(model_id)
        if model is None or not _visible(key, model.slug):
            raise ModelNotListed(f"model {model_id!r} does not exist", {"model": model_id})
        data = [
            {"provider": t.provider.name, "model": t.model if t.model is not None else model.slug}
            for t in model.targets
        ]
        return {"object": "list", "data": data}


class Healthz(JsonEndpoint):
    auth = False

    def answer(self, key: Key | None, params: dict[str, Any]) -> Any:
        return {"status": "ok", "config_version": self.runtime.config.version}


class MetricsEndpoint:
    """GET /metrics: Prometheus text format, no key needed."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        rid = Incoming(scope["headers"]).request_id
        chunks = self.runtime.metrics.render_chunks()
        first = next(chunks)
        headers = [(b"x-request-id", rid), server_timing(t0), (b"content-type", CONTENT_TYPE)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        # Piece by piece, handing the loop back between pieces: a scrape of many keys'
        # series never holds other requests up for long (SPEC §8: under 50 ms).
        for chunk in chunks:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            await asyncio.sleep(0)
            first = chunk
        await send({"type": "http.response.body", "body": first})


class NotFoundEndpoint:
    """Unknown paths. Under /v1/ the key is checked first, so a caller without one
    learns nothing about which endpoints exist."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        t0 = time.perf_counter()
        incoming = Incoming(scope["headers"])
        rid = incoming.request_id
        try:
            path = scope["path"]
            if path == "/v1" or path.startswith("/v1/"):
                authenticate(self.runtime.config.keys, incoming.token())
            raise NotFound(f"no such endpoint: {scope['path']}")
        except GatewayError as exc:
            await send_error(send, exc, rid, [server_timing(t0)])
