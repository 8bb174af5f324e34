"""create_app(settings, config): Starlette's router, plain ASGI endpoints, one lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.config import Config
from gateway.config.settings import Settings, default_max_connections
from gateway.console import ConsoleEndpoint
from gateway.endpoints import AzureDeployment, ProxyEndpoint, ResponseById
from gateway.families import PREFIXES, Endpoint, endpoints
from gateway.info import (
    Healthz,
    KeyInfo,
    MetricsEndpoint,
    ModelList,
    ModelRetrieve,
    NotFoundEndpoint,
    RouterModels,
    RouterProviders,
)
from gateway.reload import Reloader
from gateway.runtime import Runtime
from gateway.server.admission import ServerLimits
from gateway.sidecar import Sidecar
from gateway.sockets import ResponsesSocket, denial


class Gateway:
    """The ASGI app: the relaying paths are looked up in a dict and called directly; all
    else (the catalog, health, metrics, 404s, lifespan) goes through Starlette's router.

    Measured with `make bench`: the router's two extra coroutine levels per request are
    paid again on every resume of a relaying request (see README, Performance).
    """

    def __init__(
        self,
        router: Router,
        hot: dict[str, ASGIApp],
        runtime: Runtime,
        relayed: Mapping[str, Endpoint],
        socket: ResponsesSocket,
    ) -> None:
        self.router = router
        self.socket = socket  # every `websocket` scope (Codex's WebSocket mode)
        self.hot = hot
        self.state = runtime
        # Without keys, the loopback sidecar's Host/Origin/Content-Type gate (SPEC §13)
        # runs before routing; built once, it calls back into route().
        self.sidecar = Sidecar(self.route, runtime, relayed, runtime.settings)
        s = runtime.settings
        # Read by the HTTP/1.1 protocol (server.protocol.ServerProtocol) per connection.
        self.server_limits = ServerLimits(
            max_header_bytes=s.max_header_bytes,
            header_timeout=s.header_timeout,
            body_timeout=s.body_timeout,
            max_connections=s.max_connections or default_max_connections(),
            max_message_bytes=s.max_event_bytes,  # a WebSocket frame or message (SPEC §7)
        )

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # A plain function handing back the endpoint's coroutine: no coroutine level of
        # its own for every resume of the request to pass through.
        if scope["type"] == "http":
            # No keys (read per request: a reload may add or remove them): the sidecar's
            # gate first. With keys, this test is its whole cost: the key is the gate.
            if not self.state.config.keys.entries:
                answer = self.sidecar.check(scope, receive, send)
                if answer is not None:
                    return answer
            endpoint = self.hot.get(scope["path"])
            if endpoint is not None:
                return endpoint(scope, receive, send)
        elif scope["type"] == "websocket":
            # The sidecar's gate holds for WebSockets too (browsers open them across
            # origins without a preflight); its refusals are handshake denials.
            if not self.state.config.keys.entries:
                answer = self.sidecar.check({**scope, "method": "GET"}, receive, denial(send))
                if answer is not None:
                    return answer
            return self.socket(scope, receive, send)
        return self.router(scope, receive, send)

    def route(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        """Routing alone, for the sidecar to call with its CORS headers added."""
        if scope["type"] == "websocket":
            return self.socket(scope, receive, send)
        endpoint = self.hot.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is not None:
            return endpoint(scope, receive, send)
        return self.router(scope, receive, send)


def create_app(settings: Settings, config: Config) -> Gateway:
    runtime = Runtime(settings, config)
    # Every relayed path of every family under every prefix (families.endpoints()); one
    # endpoint object per family path, shared by its prefixes.
    shared: dict[str, ProxyEndpoint] = {}
    hot: dict[str, ASGIApp] = {}
    relayed = endpoints()
    for path, endpoint in relayed.items():
        hot[path] = shared.setdefault(endpoint.upstream_path, ProxyEndpoint(runtime, endpoint))
    by_id = ResponseById(runtime)
    model_list, model_retrieve = ModelList(runtime), ModelRetrieve(runtime)
    # The router sees only what the dict did not take: a Route per relayed path (52)
    # would cost start-up regex compiles for paths it never gets.
    routes = [
        *(
            Route(prefix + "/responses/{response_id}" + tail, by_id, methods=None)
            for prefix in PREFIXES
            for tail in ("", "{tail:path}")
        ),
        Route("/openai/deployments/{slug}/{rest:path}", AzureDeployment(runtime)),
        # The model list under every prefix the families are served under (SPEC §14): an
        # SDK whose base URL is the host root or /api/v1 lists models there.
        *(Route(prefix + "/models", model_list) for prefix in PREFIXES),
        *(Route(prefix + "/models/{slug:path}", model_retrieve) for prefix in PREFIXES),
        Route("/v1/router/models", RouterModels(runtime)),
        Route("/v1/router/models/{model_id:path}/providers", RouterProviders(runtime)),
        Route("/v1/key", KeyInfo(runtime)),
        Route("/api/v1/key", KeyInfo(runtime)),
        Route("/healthz", Healthz(runtime)),
        Route("/metrics", MetricsEndpoint(runtime)),
        Route("/console", ConsoleEndpoint(runtime)),
        Route("/console/data", ConsoleEndpoint(runtime, data=True)),
    ]

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        reloader = Reloader(runtime, settings.reload_interval)
        reloader.start()
        if runtime.state is not None:
            runtime.state.start()
        if runtime.shared is not None:
            runtime.shared.start()
        runtime.traffic.start()
        runtime.metrics.dump()  # with --workers N, each worker is in the sums from its start
        try:
            yield
        finally:
            await reloader.stop()
            await runtime.stop()

    router = Router(routes, default=NotFoundEndpoint(runtime), lifespan=lifespan)
    return Gateway(router, hot, runtime, relayed, ResponsesSocket(runtime, shared["/responses"]))


def app_from_env() -> Gateway:
    """Factory for worker processes (`--workers N`): settings come from GATEWAY_* variables."""
    from gateway.config import load_config
    from gateway.config.settings import from_env
    from gateway.telemetry.accesslog import configure as configure_access_log

    settings = from_env()
    configure_access_log(settings.log_level)
    app = create_app(
        settings, load_config(settings.routes_path, settings.keys_path, settings.keys_explicit)
    )
    settle_heap()
    return app


def settle_heap() -> None:
    """Once a serving process has loaded everything: the cyclic garbage collector stops
    re-scanning start-up objects and runs less often.

    A relayed request allocates a few hundred container objects and frees them by
    reference counting; the default threshold (700) still ran a collection every few
    requests, some of them full ones over every module and config object: 0.85 s of
    GC in 12 s at 64 connections, 0.02 s after this (measured with gc.callbacks)."""
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
