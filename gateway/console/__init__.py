"""The built-in console (SPEC §12): GET /console, one page from this package (HTML,
CSS and a little JavaScript, nothing from a CDN), and GET /console/data, the JSON it
draws, for scripts too.

Both need a key with `admin: true` (or, with no keys configured, a loopback client
whose request came straight to the gateway: one carrying `Forwarded` or `X-Forwarded-*`
came through a proxy, and the socket's peer is the proxy, not the person).
The key comes as `Authorization: Bearer KEY`, or as the password of HTTP Basic: a 401
asks browsers for it (`WWW-Authenticate: Basic`), and they send it again with the
page's own requests.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import time
from collections.abc import Awaitable
from importlib.resources import files
from typing import Any

import orjson

from gateway.auth import authenticate, bearer_token
from gateway.config.keys import Key, Keys
from gateway.config.routes import Model, Target
from gateway.config.settings import is_loopback
from gateway.errors import GatewayError, MethodNotAllowed, Unauthorized
from gateway.families import ALL
from gateway.health import Breaker, EntryState, breaker
from gateway.incoming import Incoming
from gateway.respond import send_bytes, send_error, server_timing
from gateway.runtime import Runtime
from gateway.types import Receive, Scope, Send

CHALLENGE = (b"www-authenticate", b'Basic realm="gateway console", charset="UTF-8"')
# Each page answer also says: no caching, no framing, nothing loaded from elsewhere.
PAGE_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy",
     b"default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
     b"img-src 'self' data:; frame-ancestors 'none'"),
]  # fmt: skip


class AdminRequired(GatewayError):
    status = 403
    type = "permission_error"
    code = "admin_required"


def console_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The key from Bearer (or x-api-key), or from Basic's password."""
    incoming = Incoming(headers)
    auth = incoming.authorization
    if auth is not None and auth[:6].lower() == b"basic ":
        try:
            decoded = base64.b64decode(auth[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2] or None
    if auth is not None:
        return bearer_token(auth)
    return incoming.token()


class ConsoleEndpoint:
    """GET /console and GET /console/data."""

    def __init__(self, runtime: Runtime, data: bool = False) -> None:
        self.runtime = runtime
        self.data = data

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        rid = Incoming(scope["headers"]).request_id
        extra = [(b"x-request-id", rid)]
        try:
            if scope["method"] not in ("GET", "HEAD"):
                extra.append((b"allow", b"GET"))
                raise MethodNotAllowed("use GET")
            self._admit(scope)
            if self.data:
                body = orjson.dumps(await console_data(self.runtime))
                headers = [*extra, (b"cache-control", b"no-store"), server_timing(t0)]
                await send_bytes(send, 200, body, headers)
            else:
                headers = [*extra, *PAGE_HEADERS, server_timing(t0)]
                await send_bytes(send, 200, page(), headers, content_type=None)
        except GatewayError as exc:
            if isinstance(exc, Unauthorized):
                extra.append(CHALLENGE)
            await send_error(send, exc, rid, [*extra[1:], server_timing(t0)])

    def _admit(self, scope: Scope) -> None:
        keys = self.runtime.config.keys
        if keys.open:
            client = scope.get("client") or ("", 0)
            if not is_loopback(client[0]):
                raise AdminRequired("with no keys configured the console answers loopback only")
            if forwarded(scope["headers"]):
                raise AdminRequired(
                    "with no keys configured the console answers loopback only, not "
                    "requests a proxy forwarded; create an admin key (gateway keys new)"
                )
            return
        require_admin(keys, scope["headers"])


def forwarded(headers: list[tuple[bytes, bytes]]) -> bool:
    """The request came through a proxy that said so (RFC 7239, or the X-Forwarded-*
    family)."""
    return any(name == b"forwarded" or name.startswith(b"x-forwarded-") for name, _ in headers)


def require_admin(keys: Keys, headers: list[tuple[bytes, bytes]]) -> Key:
    """An admin key or a refusal: 401 without a valid key (the caller adds the Basic
    challenge), 403 for a key without `admin: true`. For keys configured only."""
    key = authenticate(keys, console_token(headers))
    if key is None or not key.admin:
        raise AdminRequired(
            "this needs a key with admin: true in keys.yaml", {"key": key.name if key else None}
        )
    return key


@functools.cache
def page() -> bytes:
    """Read once, from the installed package (or the pyz)."""
    return files("gateway.console").joinpath("page.html").read_bytes()


# -- the data


def _entry(runtime: Runtime, model: Model, target: Target) -> dict[str, Any]:
    upstream = target.model if target.model is not None else model.slug
    entry: dict[str, Any] = {
        "provider": target.provider.name,
        "model": upstream,
        "apis": sorted(target.provider.apis),
        "price": None
        if target.price is None
        else {
            "input": target.price.input,
            "output": target.price.output,
            "cached_input": target.price.cached_input,
        },
    }
    if "*" in upstream:  # a wildcard's entries are per captured model: not one state
        entry.update(state="per model", latency_ms=None, error_rate=None, in_flight=None,
                     last_error="", last_error_at=None)  # fmt: skip
        return entry
    health = runtime.health
    state: EntryState | None = health.entries.get((target.provider.name, upstream, ""))
    if state is None:
        state = EntryState()
    now = health.clock()
    circuit = breaker(state, now)
    entry.update(
        state=circuit.value,
        retry_in_s=round(state.open_until - now, 1) if circuit is Breaker.OPEN else None,
        latency_ms=None if state.latency is None else round(state.latency * 1000, 2),
        error_rate=round(state.error_rate, 4),
        in_flight=state.in_flight,
        last_error=state.last_error,
        last_error_at=state.last_error_at or None,
    )
    return entry


async def _key_reports(runtime: Runtime, keys: tuple[Key, ...]) -> list[dict[str, Any]]:
    async def answer(report: dict[str, Any] | Awaitable[dict[str, Any]]) -> dict[str, Any]:
        return await report if isinstance(report, Awaitable) else report

    try:  # concurrently: with Redis, the reads share round trips
        return list(await asyncio.gather(*(answer(runtime.limits.report(key)) for key in keys)))
    except GatewayError as exc:  # Redis away: say so rather than show zeros
        return [{"object": "key", "name": key.name, "error": exc.message} for key in keys]


async def console_data(runtime: Runtime) -> dict[str, Any]:
    config = runtime.config
    families = set(ALL)
    models = []
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for model in config.routes.catalog():
        rows = [_entry(runtime, model, target) for target in model.targets]
        for row in rows:
            entries.setdefault((row["provider"], row["model"]), row)
        served = sorted({api for row in rows for api in row["apis"]} & families)
        models.append({"slug": model.slug, "id": model.id, "name": model.name,
                       "strategy": model.strategy, "apis": served,
                       "providers": rows})  # fmt: skip
    keys = config.keys.entries
    traffic = runtime.traffic
    points = traffic.view()
    return {
        "object": "console",
        "gateway": {
            "config_version": config.version,
            "started_at": runtime.started_at,
            "state": "redis"
            if runtime.shared is not None
            else ("file" if runtime.state is not None else "memory"),
            "tracing": runtime.tracing is not None,
            "keys": len(keys),
        },
        "models": models,
        "providers": list(entries.values()),
        "traffic": {
            "step_seconds": traffic.step,
            "points": points,
            # Per key and per session over the window: prompt tokens, those read from
            # the provider's cache, and their ratio (SPEC §14).
            "prompt_cache": traffic.prompt_cache(points),
        },
        "keys": await _key_reports(runtime, keys),
    }


def _backend(runtime: Runtime) -> str:
    if runtime.shared is not None:
        return "redis"
    return "file" if runtime.state is not None else "memory"
