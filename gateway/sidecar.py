"""The loopback sidecar's gate (SPEC §13): with no keys configured, anything that can
reach 127.0.0.1 may use the gateway, and a web page in the operator's own browser can
reach it too. Three checks before routing keep pages out:

- `Host` must name this gateway (its loopback address, with or without the bound port,
  or an `--allow-host` name): a DNS-rebinding page reaches it under its own name (421).
- A request from another origin (`Origin` not this gateway's, or `Sec-Fetch-Site:
  cross-site`) is refused (403) unless `--cors-origin` lists the origin; a listed one
  gets CORS headers and its preflights answered.
- A relayed POST must say `application/json` (`multipart/form-data` for audio uploads):
  a `fetch(..., {mode: "no-cors"})` can only send text/plain, form-urlencoded or
  multipart without a preflight (415).

With keys configured none of this runs: the key is the gate (Gateway.__call__ decides).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Mapping, MutableMapping
from typing import Any

from gateway.config.settings import Settings
from gateway.errors import ForbiddenOrigin, GatewayError, MisdirectedRequest, UnsupportedMediaType
from gateway.families import AZURE_DEPLOYMENT, Body, Endpoint, Family
from gateway.incoming import Incoming
from gateway.respond import send_error, server_timing
from gateway.runtime import Runtime
from gateway.types import App, Receive, Scope, Send

# What a loopback listener is called in a Host header, whichever loopback address it is.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
JSON_MEDIA = b"application/json"
MULTIPART_MEDIA = b"multipart/form-data"
AZURE_PREFIX = "/openai/deployments/"
# What a listed origin's script may read besides the CORS-safelisted response headers.
EXPOSED = (b"x-request-id, retry-after, server-timing, x-ratelimit-limit-requests, "
           b"x-ratelimit-remaining-requests, x-ratelimit-reset-requests, "
           b"x-ratelimit-limit-tokens, x-ratelimit-remaining-tokens, x-ratelimit-reset-tokens")  # fmt: skip
ALLOW_METHODS = b"GET, POST, DELETE"
# Header names a preflight asks for are echoed (an SDK in a browser sends its own
# x-stainless-* set); anything that is not a plain list of tokens gets this list instead.
DEFAULT_ALLOW_HEADERS = (b"authorization, content-type, x-api-key, api-key, x-request-id, "
                         b"x-session-id, anthropic-version, anthropic-beta, openai-beta")  # fmt: skip
_HEADER_LIST = re.compile(rb"[A-Za-z0-9!#$%&'*+.^_`|~ ,-]{1,2048}")
MAX_AGE = b"600"
# Request fields only browsers send: read only when one is there.
BROWSER_FIELDS = frozenset(
    (b"origin", b"sec-fetch-site", b"access-control-request-method",
     b"access-control-request-headers")
)  # fmt: skip  # seconds a browser may keep a preflight's answer


def host_name(host: str) -> str:
    """An address as a Host header names it: IPv6 literals in brackets."""
    host = host.strip().lower()
    return f"[{host}]" if host.count(":") > 1 and not host.startswith("[") else host


def media_type(value: bytes) -> bytes:
    """`application/json` of `Application/JSON; charset=utf-8`."""
    return value.partition(b";")[0].strip().lower()


class Sidecar:
    """Gate for the keyless gateway, asked by Gateway.__call__ before it routes; `app`
    routes a request whose answer needs CORS headers added."""

    def __init__(
        self, app: App, runtime: Runtime, endpoints: Mapping[str, Endpoint], settings: Settings
    ) -> None:
        self.app = app
        self.runtime = runtime
        names = {*LOOPBACK_NAMES, host_name(settings.host)}
        # Names without a port are matched as given; with the bound port added per
        # listener (scope["server"]: with --port 0 the port is known only once bound).
        self.names = tuple(sorted(names | {host_name(h) for h in settings.allow_hosts}))
        self.hosts = frozenset(name.encode() for name in self.names)
        self.ports: set[int] = set()
        self.cors = frozenset(o.strip().lower().rstrip("/").encode() for o in settings.cors_origins)
        # Relayed paths that carry a body -> the media type it must declare.
        self.media: dict[str, bytes] = {
            path: MULTIPART_MEDIA if ep.family.body is Body.MULTIPART else JSON_MEDIA
            for path, ep in endpoints.items()
            if ep.family.body is not Body.NONE
        }
        self.families: dict[str, Family] = {path: ep.family for path, ep in endpoints.items()}

    def check(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None] | None:
        """None: route the request as usual. Else what answers it instead: a refusal, a
        preflight's answer, or the routed request with CORS headers added."""
        host: bytes | None = None
        content_type: bytes | None = None
        browser: dict[bytes, bytes] | None = None
        misdirected: bytes | None = None
        # One pass over the headers, the only per-request cost without keys; the fields
        # only browsers send are kept aside (timed with three fields: 0.5 us; matching
        # each of six names, lower-casing and a port lookup per request: 1.4 us).
        for name, value in scope["headers"]:
            if name == b"host":
                if value not in self.hosts and not self._known(value, scope):
                    misdirected = value
                host = value
            elif name == b"content-type":
                content_type = value
            elif name in BROWSER_FIELDS:
                if browser is None:
                    browser = {}
                browser[name] = value
        # No Host at all (HTTP/1.0; HTTP/1.1 without one is a 400 in the server) is
        # served: rebinding needs a browser, and browsers always send Host. A client
        # that writes its own head could write any Host it likes anyway.
        if misdirected is not None:
            return self._refuse(scope, send, MisdirectedRequest(
                "this gateway answers only requests addressed to it (its loopback "
                "address, or a name given with --allow-host)", {"host": _text(misdirected)}))  # fmt: skip
        listed = None  # an --cors-origin: CORS headers on the answer
        if browser is not None:
            origin = browser.get(b"origin")
            site = browser.get(b"sec-fetch-site")
            if origin is not None or site == b"cross-site":
                origin = None if origin is None else origin.lower()
                if origin is not None and origin in self.cors:
                    listed = origin
                elif site == b"cross-site" or not _same_origin(origin, host):
                    return self._refuse(scope, send, ForbiddenOrigin(
                        "requests from web pages of other origins are refused without keys; "
                        "list the origin with --cors-origin to allow it",
                        {"origin": _text(origin)}))  # fmt: skip
            preflight = b"access-control-request-method" in browser
            if listed is not None and preflight and scope["method"] == "OPTIONS":
                return _preflight(send, listed, browser.get(b"access-control-request-headers"))
        if scope["method"] == "POST":
            path = scope["path"]
            wanted = self.media.get(path)
            if wanted is None and path.startswith(AZURE_PREFIX):
                wanted = _azure_media(path)
            if (
                wanted is not None
                and content_type != wanted
                and (content_type is None or media_type(content_type) != wanted)
            ):
                return self._refuse(scope, send, UnsupportedMediaType(
                    f"send this request with Content-Type: {wanted.decode()}",
                    {"content_type": _text(content_type)}))  # fmt: skip
        if listed is not None:
            return self.app(scope, receive, _with_cors(send, listed))
        return None

    def _known(self, host: bytes, scope: Scope) -> bool:
        """A Host not found as sent: in other letters' case, or for a listener whose
        port is not known yet (with --port 0 it is known only once bound)."""
        server = scope.get("server")
        if server is not None and server[1] not in self.ports:
            self._bind(server[1])
        return host.lower() in self.hosts

    def _bind(self, port: int) -> None:
        hosts = set(self.hosts)
        for name in self.names:
            # A name given with a port of its own (gw.example:8443) is taken as given.
            if ":" not in name.rpartition("]")[2]:
                hosts.add(f"{name}:{port}".encode())
        self.hosts = frozenset(hosts)
        self.ports.add(port)

    async def _refuse(self, scope: Scope, send: Send, exc: GatewayError) -> None:
        t0 = time.perf_counter()
        rid = Incoming(scope["headers"]).request_id
        path = scope["path"]
        await send_error(send, exc, rid, [server_timing(t0)], self.families.get(path))
        # Logged and counted like every refusal: the operator sees what was tried.
        where = f"{scope['method']} {path[:512]}"
        self.runtime.refused(exc, None, rid, where, time.perf_counter() - t0)


def _azure_media(path: str) -> bytes | None:
    """An Azure deployment path relays a JSON body when it names a family path."""
    rest = path[len(AZURE_PREFIX) :].partition("/")[2]
    return JSON_MEDIA if rest in AZURE_DEPLOYMENT else None


def _same_origin(origin: bytes | None, host: bytes | None) -> bool:
    """The Origin names the Host this request was sent to (http, or https when a TLS
    proxy in front forwards it). `null` never does."""
    if origin is None or host is None:
        return origin is None
    scheme, sep, authority = origin.partition(b"://")
    return bool(sep) and scheme in (b"http", b"https") and authority == host.lower()


def _text(value: bytes | None) -> str | None:
    """A header value for the error's details: bounded, never raising."""
    return None if value is None else value[:256].decode("latin-1")


async def _preflight(send: Send, origin: bytes, asked: bytes | None) -> None:
    allow = asked if asked is not None and _HEADER_LIST.fullmatch(asked) else DEFAULT_ALLOW_HEADERS
    headers = [
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-methods", ALLOW_METHODS),
        (b"access-control-allow-headers", allow),
        (b"access-control-max-age", MAX_AGE),
        (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


def _with_cors(send: Send, origin: bytes) -> Send:
    cors = [
        (b"access-control-allow-origin", origin),
        (b"vary", b"Origin"),
        (b"access-control-expose-headers", EXPOSED),
    ]

    async def send_with_cors(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message["headers"], *cors]
        await send(message)

    return send_with_cors
