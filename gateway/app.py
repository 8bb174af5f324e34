"""create_app(settings, config): Starlette's router, plain ASGI endpoints, one lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.routing import Route, Router

from gateway.config import Config
from gateway.endpoints import (
    Healthz,
    MetricsEndpoint,
    ModelList,
    ModelRetrieve,
    NotFoundEndpoint,
    ProxyEndpoint,
    RouterModels,
    RouterProviders,
)
from gateway.reload import Reloader
from gateway.runtime import Runtime
from gateway.settings import Settings


def create_app(settings: Settings, config: Config) -> Router:
    runtime = Runtime(settings, config)
    chat = ProxyEndpoint(runtime, "/chat/completions")
    routes = [
        Route("/v1/chat/completions", chat),
        Route("/chat/completions", chat),
        Route("/api/v1/chat/completions", chat),
        Route("/v1/completions", ProxyEndpoint(runtime, "/completions")),
        Route("/v1/embeddings", ProxyEndpoint(runtime, "/embeddings")),
        Route("/v1/models", ModelList(runtime)),
        Route("/v1/models/{slug:path}", ModelRetrieve(runtime)),
        Route("/v1/router/models", RouterModels(runtime)),
        Route("/v1/router/models/{model_id:path}/providers", RouterProviders(runtime)),
        Route("/healthz", Healthz(runtime)),
        Route("/metrics", MetricsEndpoint(runtime)),
    ]

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        await runtime.start()
        reloader = Reloader(runtime, settings.reload_interval)
        reloader.start()
        try:
            yield
        finally:
            await reloader.stop()
            await runtime.stop()

    router = Router(routes, default=NotFoundEndpoint(runtime), lifespan=lifespan)
    router.state = runtime  # type: ignore[attr-defined]
    return router


def app_from_env() -> Router:
    """Factory for worker processes (`--workers N`): settings come from GATEWAY_* variables."""
    from gateway.accesslog import configure as configure_access_log
    from gateway.config import load_config
    from gateway.settings import from_env

    settings = from_env()
    configure_access_log(settings.log_level)
    return create_app(
        settings, load_config(settings.routes_path, settings.keys_path, settings.keys_explicit)
    )
