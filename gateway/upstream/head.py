"""What goes on the wire to an upstream and what comes back to the client: the request
head built from a provider's prepared target, and both directions' header filters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit

from gateway.routes import Provider
from gateway.upstream.pool import Origin

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never sent upstream: the client's credentials (in any of the headers a client may put
# them in), what the hop itself sets, and `expect` (the gateway answers 100-continue
# itself and sends the whole body at once).
CREDENTIALS = frozenset(
    {b"authorization", b"x-api-key", b"api-key", b"proxy-authorization", b"cookie"}
)
_REQUEST_DROP = (
    HOP_BY_HOP
    | CREDENTIALS
    | {b"host", b"content-length", b"accept-encoding", b"expect", b"http2-settings"}
)
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length", b"content-encoding", b"set-cookie"}


@dataclass(frozen=True, slots=True)
class Target:
    """What a provider's requests share, prepared once."""

    origin: Origin
    request_line_prefix: bytes  # b"POST /v1"
    query: bytes  # b"?api-version=..." or b""
    fixed: bytes  # host, credentials, provider headers: ready-made header lines
    own: frozenset[bytes]  # header names the provider sets itself


def prepare(provider: Provider) -> Target:
    url = urlsplit(provider.base_url)
    tls = url.scheme == "https"
    port = url.port or (443 if tls else 80)
    host = url.hostname or ""
    default_port = port == (443 if tls else 80)
    host_header = host if default_port else f"{host}:{port}"
    if ":" in host and not default_port:
        host_header = f"[{host}]:{port}"
    lines = [f"host: {host_header}"]
    own = {name.lower() for name in provider.headers}
    auth = provider.auth
    key = provider.api_key.reveal() if provider.api_key is not None else ""
    if auth is not None and auth.header is not None:
        if key and auth.header not in own:
            lines.append(f"{auth.header}: {key}")  # Azure's api-key, Anthropic's x-api-key
    elif auth is None and key and "authorization" not in own:
        lines.append("authorization: Bearer " + key)
    lines += [f"{name}: {value}" for name, value in provider.headers.items()]
    # Identity keeps the bytes the gateway splices plain.
    lines.append("accept-encoding: identity")
    query = urlencode(list(provider.query.items()))
    return Target(
        origin=Origin(url.scheme, host, port, provider.max_connections),
        request_line_prefix=b"POST " + (url.path or "").encode(),
        query=b"?" + query.encode() if query else b"",
        fixed="".join(line + "\r\n" for line in lines).encode("latin-1"),
        own=frozenset(name.encode("latin-1") for name in own) | {b"host"},
    )


def signed_query(target: Target, path: str) -> str:
    """The provider's query as request_head joins it to `path` (what SigV4 signs)."""
    if not target.query:
        return ""
    query = target.query.decode("latin-1")
    return "&" + query[1:] if "?" in path else query


def request_head(
    target: Target,
    path: str,
    client: Iterable[tuple[bytes, bytes]],
    length: int,
    method: bytes | None = None,
    credentials: bytes = b"",
) -> bytes:
    """The request's head. `method`: other than POST (the responses family's lookups by
    id); `path` may then carry the client's query, joined to the provider's."""
    prefix = target.request_line_prefix
    query = target.query
    if method is not None:
        prefix = method + prefix[4:]
        if query and "?" in path:
            query = b"&" + query[1:]
    parts = [prefix, path.encode(), query, b" HTTP/1.1\r\n"]
    named: set[bytes] = set()
    kept: Headers = []
    content_type = False
    for name, value in client:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
        if name in _REQUEST_DROP or name in target.own:
            continue
        if name == b"content-type":
            content_type = True
        kept.append((name, value))
    for name, value in kept:
        if name not in named:
            parts += (name, b": ", value, b"\r\n")
    if not content_type and length:
        parts.append(b"content-type: application/json\r\n")
    parts += (target.fixed, credentials, b"content-length: ", str(length).encode(), b"\r\n\r\n")
    return b"".join(parts)


def response_headers(raw: Iterable[tuple[bytes, bytes]], decoded: bool = True) -> Headers:
    """Headers for the client, from names already lowercase (h1.py). `decoded`: the body
    is relayed decompressed, so its content-encoding is dropped (an encoding the gateway
    cannot undo is kept)."""
    out: Headers = []
    for name, value in raw:
        if name in _RESPONSE_DROP and (decoded or name != b"content-encoding"):
            continue
        if name == b"x-request-id":
            out.append((b"x-upstream-request-id", value))
        else:
            out.append((name, value))
    return out
