"""What the gateway answers itself: the catalog, health, metrics, the calling key's
usage, and 404 for every path it does not serve. Small JSON documents, each behind the
same authentication and error envelope as the relayed paths."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import orjson

from gateway.auth import authenticate
from gateway.config.keys import Key
from gateway.console import CHALLENGE, require_admin
from gateway.errors import GatewayError, MethodNotAllowed, ModelNotListed, NotFound, Unauthorized
from gateway.incoming import Incoming
from gateway.respond import send_bytes, send_error, server_timing
from gateway.runtime import Runtime
from gateway.telemetry.metrics import CONTENT_TYPE
from gateway.types import Receive, Scope, Send


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
            answer = self.answer(key, scope.get("path_params", {}))
            if isinstance(answer, Awaitable):  # one that asks the state store (Redis)
                answer = await answer
            body = orjson.dumps(answer)
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
    """GET /metrics: Prometheus text format. Open to scrapers, unless --metrics-admin
    asks for an admin key (when keys are configured), answered as the console is."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.admin = runtime.settings.metrics_admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        rid = Incoming(scope["headers"]).request_id
        keys = self.runtime.config.keys
        if self.admin and not keys.open:
            try:
                require_admin(keys, scope["headers"])
            except GatewayError as exc:
                extra = [CHALLENGE] if isinstance(exc, Unauthorized) else []
                await send_error(send, exc, rid, [*extra, server_timing(t0)])
                return
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


class KeyInfo(JsonEndpoint):
    """GET /v1/key: what the calling key may use and has used this period (SPEC §11)."""

    def answer(self, key: Key | None, params: dict[str, Any]) -> Any:
        if key is None:  # an open gateway: no key, no limits
            return {"object": "key", "name": None, "limits": {}, "usage": {}, "remaining": {}}
        return self.runtime.limits.report(key)


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
            # Logged and counted, so operators see what clients asked for (the path in
            # the log line only: as a metric label it would be the client's to grow).
            where = f"{scope['method']} {scope['path'][:512]}"
            self.runtime.refused(exc, None, rid, where, time.perf_counter() - t0)
