from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import httpx._transports.default as httpx_transports
import pytest
import uvicorn

from gateway.app import create_app
from gateway.config import load_config
from gateway.config.settings import Settings
from gateway.server.protocol import ServerProtocol
from tests.helpers import loopback_socket, start_uvicorn
from tests.scripted_upstream import Upstream

# httpx builds a fresh SSL context, parsing the whole CA bundle (about 28 ms of CPU), for
# every client it makes: the `client` fixture's, the tests' own and each openai/anthropic
# SDK client's, about a thousand a run, a fifth of the suite's CPU. Here the default one
# (verify=True, no client certificate) is built once per process and shared, as httpx's
# docs advise (one context passed as verify=): verification is the same, and no test
# speaks TLS through httpx. The gateway's own contexts are untouched.
_create_ssl_context = httpx_transports.create_ssl_context


@functools.lru_cache(maxsize=8)
def _default_ssl_context(trust_env: bool, cafile: str | None, capath: str | None) -> Any:
    return _create_ssl_context(verify=True, cert=None, trust_env=trust_env)


def _shared_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
    if verify is True and cert is None:
        env = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
        return _default_ssl_context(trust_env, *env)
    return _create_ssl_context(verify=verify, cert=cert, trust_env=trust_env)


httpx_transports.create_ssl_context = _shared_ssl_context


class RunningGateway:
    def __init__(
        self, server: uvicorn.Server, task: asyncio.Task[None], port: int, app: Any
    ) -> None:
        self.server = server
        self.task = task
        self.port = port
        self.app = app
        self.runtime = app.state

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 10)


async def start_gateway(
    tmp_path: Path, routes: str, keys: str | None = None, **settings: Any
) -> RunningGateway:
    routes_path = tmp_path / "routes.yaml"
    routes_path.write_text(routes)
    keys_path = tmp_path / "keys.yaml"
    if keys is not None:
        keys_path.write_text(keys)
    s = Settings(routes_path=str(routes_path), keys_path=str(keys_path), port=0, **settings)
    app = create_app(s, load_config(s.routes_path, s.keys_path))
    sock = loopback_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
        http=ServerProtocol,  # as `gateway serve` runs
        interface="asgi3",
    )
    server, task = await start_uvicorn(config, sock)
    assert server.started, "gateway did not start within 5 s"
    return RunningGateway(server, task, port, app)


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = Upstream()
    await up.start()
    yield up
    await up.stop()


@pytest.fixture
async def make_upstream() -> AsyncIterator[Callable[[], Awaitable[Upstream]]]:
    made: list[Upstream] = []

    async def make() -> Upstream:
        up = Upstream()
        await up.start()
        made.append(up)
        return up

    yield make
    for up in made:
        await up.stop()


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """gateway(routes_yaml, keys_yaml=None, **settings) -> a RunningGateway on 127.0.0.1."""
    running: list[RunningGateway] = []

    async def make(routes: str, keys: str | None = None, **settings: Any) -> RunningGateway:
        gw = await start_gateway(tmp_path, routes, keys, **settings)
        running.append(gw)
        return gw

    yield make
    for gw in running:
        await gw.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as c:
        yield c


def one_provider(upstream: Upstream, slug: str = "m", **model: Any) -> str:
    """routes.yaml text: one provider `p` at the upstream, one model `slug` on it."""
    extra = "".join(f"    {k}: {v}\n" for k, v in model.items())
    return (
        f"providers:\n  p:\n    base_url: {upstream.url}\n    api_key: sk-upstream-secret\n"
        f"models:\n  {slug}:\n{extra}    providers:\n      - provider: p\n        model: upstream-model\n"
    )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The loop `gateway serve` runs on (uvicorn's `loop="uvloop"`), so tests see the same."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
