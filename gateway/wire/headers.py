"""The header policy (SPEC §5, §7, §13) as data: which request headers never reach an
upstream, which only when a provider lists them, and which response headers never reach
the client. One table for every family and the by-id paths; the upstream client applies
it (upstream.head), the config checks `forward_headers` against it (config.providers)."""

from __future__ import annotations

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

# The header policy (SPEC §5, §7, §13), one table for every family and the by-id paths.
# Request headers, client -> upstream:
#   CREDENTIALS and HOP (what the hop itself sets) are never sent, whatever the provider
#   says; `expect` is answered by the gateway, which sends the whole body at once.
#   ACCOUNT (and every name starting with one of ACCOUNT_PREFIXES) chooses the provider
#   account or carries cloud credentials: not sent unless the provider lists the name in
#   its `forward_headers`.
# Response headers, upstream -> client: RESPONSE_DROP and every name starting with one
#   of RESPONSE_PREFIXES never reach the client (the gateway writes its own x-gateway-*,
#   x-ratelimit-* for the key, and server-timing). Trailer fields are dropped by the
#   connection (H1Connection.on_header) before they could join the head.
CREDENTIALS = frozenset(
    {b"authorization", b"x-api-key", b"api-key", b"proxy-authorization", b"cookie"}
)
ACCOUNT = frozenset(
    {b"openai-organization", b"openai-project", b"x-goog-user-project", b"x-goog-api-key"}
)
ACCOUNT_PREFIXES = (b"x-amz-",)
HOP = HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding", b"expect", b"http2-settings"}
# What `forward_headers` can never bring back (parse_provider refuses such a list).
NEVER_FORWARDED = CREDENTIALS | HOP
REQUEST_DROP = NEVER_FORWARDED | ACCOUNT
RESPONSE_DROP = HOP_BY_HOP | {
    b"content-length",
    b"content-encoding",
    b"set-cookie",
    b"server-timing",
    # The gateway's own names for what it did: never the upstream's to say.
    b"x-upstream-request-id",
    b"x-upstream-model",
}
# x-gateway-* is the gateway's alone (x-gateway-provider, -attempts, -cost-usd, -dropped,
# -count-tokens): an upstream's header of that prefix never reaches the client.
RESPONSE_PREFIXES = (b"x-gateway-", b"x-ratelimit-")
# What a SigV4 signature adds: an aws provider never gets the client's own beside it.
SIGNATURE = frozenset({b"authorization", b"x-amz-date", b"x-amz-security-token",
                        b"x-amz-content-sha256"})  # fmt: skip


def never_forwarded(name: str) -> bool:
    """Whether `forward_headers` cannot name this header (lowercase)."""
    return name.encode("latin-1") in NEVER_FORWARDED
