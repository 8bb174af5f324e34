"""What goes on the wire to an upstream and what comes back to the client: the request
head built from a provider's prepared target, and both directions' header filters."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus, urlencode, urlsplit

from gateway.types import Headers
from gateway.upstream.pool import Origin
from gateway.wire.headers import (
    ACCOUNT_PREFIXES,
    NEVER_FORWARDED,
    REQUEST_DROP,
    RESPONSE_DROP,
    RESPONSE_PREFIXES,
    SIGNATURE,
)

if TYPE_CHECKING:
    from gateway.config.providers import Provider


@dataclass(frozen=True, slots=True)
class Target:
    """What a provider's requests share, prepared once."""

    origin: Origin
    request_line_prefix: bytes  # b"POST /v1"
    query: bytes  # b"?api-version=..." or b""
    fixed: bytes  # host, credentials, provider headers: ready-made header lines
    # Client header names never sent to this provider: the table above, less what its
    # forward_headers lets through, plus what it sets itself. One set lookup a header.
    drop: frozenset[bytes]
    forward: frozenset[bytes]  # its forward_headers (they pass ACCOUNT_PREFIXES too)
    query_names: frozenset[str]  # the names in its query (they win over the client's)


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
        own.add(auth.header)
    elif auth is None and key and "authorization" not in own:
        lines.append("authorization: Bearer " + key)
    lines += [f"{name}: {value}" for name, value in provider.headers.items()]
    # Identity keeps the bytes the gateway splices plain.
    lines.append("accept-encoding: identity")
    query = urlencode(list(provider.query.items()))
    own_names = frozenset(name.encode("latin-1") for name in own)
    if auth is not None and auth.aws is not None:
        own_names |= SIGNATURE
    forward = frozenset(name.encode("latin-1") for name in provider.forward_headers)
    return Target(
        origin=Origin(url.scheme, host, port, provider.max_connections),
        request_line_prefix=b"POST " + (url.path or "").encode(),
        query=b"?" + query.encode() if query else b"",
        fixed="".join(line + "\r\n" for line in lines).encode("latin-1"),
        drop=(REQUEST_DROP - forward) | NEVER_FORWARDED | own_names,
        forward=forward - NEVER_FORWARDED - own_names,
        query_names=frozenset(provider.query),
    )


def join_query(target: Target, path: str) -> str:
    """`path` as the request line carries it, the provider's query joined. A path with
    the client's own query (the by-id lookups) keeps the client's parameters as sent, in
    order and repeated, except any the provider's query names: the provider's win."""
    own = target.query.decode("latin-1")
    if "?" not in path:
        return path + own
    base, _, client = path.partition("?")
    names = target.query_names
    kept = [p for p in client.split("&") if p and unquote_plus(p.partition("=")[0]) not in names]
    if own:
        kept.append(own[1:])
    return base + "?" + "&".join(kept) if kept else base


def request_head(
    target: Target,
    path: str,
    client: Iterable[tuple[bytes, bytes]],
    length: int,
    method: bytes | None = None,
    credentials: bytes = b"",
) -> bytes:
    """The request's head. `method`: other than POST (the responses family's lookups by
    id); `path` may carry the client's query, merged with the provider's."""
    prefix = target.request_line_prefix
    query = target.query
    if method is not None:
        prefix = method + prefix[4:]
    if "?" in path:
        path, query = join_query(target, path), b""
    parts = [prefix, path.encode(), query, b" HTTP/1.1\r\n"]
    named: set[bytes] = set()
    kept: Headers = []
    content_type = False
    drop, forward = target.drop, target.forward
    for name, value in client:
        if name == b"connection":
            named.update(t.strip().lower() for t in value.split(b","))
        if name in drop or (name.startswith(ACCOUNT_PREFIXES) and name not in forward):
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
        if name in RESPONSE_DROP:
            if decoded or name != b"content-encoding":
                continue
        elif name.startswith(RESPONSE_PREFIXES):
            continue
        if name == b"x-request-id":
            out.append((b"x-upstream-request-id", value))
        else:
            out.append((name, value))
    return out
