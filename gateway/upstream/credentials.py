"""Provider credentials that change (SPEC §10): OAuth2 client-credentials tokens, Google
tokens from a service account or application default credentials.

A TokenSource holds one provider's token: fetched before first use, shared by every
request, refreshed in the background once it is past 80% of its life by one refresh at a
time (requests go on with the old token meanwhile), kept after a failed refresh until it
expires, after which the provider's attempts fail like a connect failure (fallback
allowed). Tokens and secrets are never logged: errors name the provider and the cause.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from gateway.config.providers import Aws, Gcp, OAuth2, Provider, Timeouts
from gateway.errors import GatewayError, UpstreamUnavailable
from gateway.tasks import cancel

log = logging.getLogger("gateway")

REFRESH_AT = 0.8  # share of a token's life after which a refresh starts
RETRY_AFTER = 1.0  # seconds between refresh attempts after a failure
DEFAULT_LIFE = 3600.0  # an OAuth2 answer without expires_in
FETCH_DEADLINE = 30.0  # seconds a request waits for a first (or expired) token
GCP_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
_TOKEN = re.compile(r"[\x21-\x7e]{1,16384}")
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")  # fullmatch: no line break, nothing echoed

Fetch = Callable[[], Awaitable[tuple[str, float]]]  # -> (token, seconds it lives)


class CredentialsFailed(Exception):
    """A token could not be had; the message never holds a secret."""


class TokenState(enum.Enum):
    EMPTY = "empty"  # nothing fetched yet
    FRESH = "fresh"  # before REFRESH_AT of its life
    AGING = "aging"  # past REFRESH_AT, not expired: served while a refresh runs
    EXPIRED = "expired"


class TokenSource:
    """One provider's token. Its state is written only by _refresh (the one task that
    fetches) and read by token()."""

    def __init__(self, name: str, fetch: Fetch, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self._fetch = fetch
        self.clock = clock
        self._token: str | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._failed_at = -RETRY_AFTER
        self.fetches = 0  # how many fetches were made (tests and the console read it)
        self.last_error: str | None = None

    def state(self) -> TokenState:
        now = self.clock()
        if self._token is None:
            return TokenState.EMPTY
        if now >= self._expires_at:
            return TokenState.EXPIRED
        return TokenState.FRESH if now < self._refresh_at else TokenState.AGING

    async def token(self) -> str:
        state = self.state()
        if state is TokenState.FRESH:
            assert self._token is not None
            return self._token
        if state is TokenState.AGING:
            self._start_refresh()
            assert self._token is not None
            return self._token
        task = self._start_refresh(wait=True)
        if task is not None:
            try:  # the fetch has its own timeouts; this bounds the wait whatever it does
                await asyncio.wait_for(asyncio.shield(task), FETCH_DEADLINE)
            except TimeoutError:
                raise CredentialsFailed(
                    f"provider {self.name!r}: no token after {FETCH_DEADLINE:g} s"
                ) from None
        if self.state() in (TokenState.FRESH, TokenState.AGING):
            assert self._token is not None
            return self._token
        raise CredentialsFailed(
            f"provider {self.name!r}: no valid token ({self.last_error or 'not fetched yet'})"
        )

    def _start_refresh(self, wait: bool = False) -> asyncio.Task[None] | None:
        """The running refresh, or a new one; none while the last failure is recent
        (a waiting caller then fails at once rather than hammering the endpoint)."""
        if self._task is not None and not self._task.done():
            return self._task
        if self.clock() - self._failed_at < RETRY_AFTER:
            return None
        self._task = asyncio.ensure_future(self._refresh())
        return self._task

    async def _refresh(self) -> None:
        self.fetches += 1
        try:
            token, life = await self._fetch()
        except (CredentialsFailed, GatewayError, OSError, ValueError) as exc:
            self._failed_at = self.clock()
            self.last_error = str(exc) if isinstance(exc, CredentialsFailed) else type(exc).__name__
            log.warning(
                "credentials for provider %r: refresh failed: %s", self.name, self.last_error
            )
            return
        if not _TOKEN.fullmatch(token):
            # It goes into a request head: a line break would forge headers.
            self._failed_at = self.clock()
            self.last_error = "the token has characters a header cannot carry"
            log.warning("credentials for provider %r: %s", self.name, self.last_error)
            return
        now = self.clock()
        self._token = token
        self._refresh_at = now + life * REFRESH_AT
        self._expires_at = now + life
        self.last_error = None

    async def close(self) -> None:
        await cancel(self._task)


# --------------------------------------------------------------------------- fetchers


def oauth2_fetch(upstream: Any, name: str, config: OAuth2) -> Fetch:
    """Client credentials against `config.token_url`, sent by the gateway's own upstream
    client (its TLS, pool and timeouts)."""
    endpoint = Provider(
        name=f"{name} token endpoint",
        base_url=config.token_url,
        timeout=Timeouts(connect=10.0, read=30.0, total=30.0),
    )
    form = {
        "grant_type": "client_credentials",
        "client_id": config.client_id,
        "client_secret": config.client_secret.reveal(),
    }
    if config.scope:
        form["scope"] = config.scope
    body = urlencode(form).encode()
    headers = [
        (b"content-type", b"application/x-www-form-urlencoded"),
        (b"accept", b"application/json"),
    ]

    async def fetch() -> tuple[str, float]:
        resp = await upstream.send(endpoint, "", body, headers)
        try:
            raw = await resp.read()
        finally:
            resp.close()
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = None
        if resp.status != 200 or not isinstance(answer, dict):
            # OAuth2's own error code only, and only when it looks like one (RFC 6749
            # §5.2): the description, the body and anything echoed from the form (the
            # client secret) are not ours to repeat in logs or the console.
            code = answer.get("error") if isinstance(answer, dict) else None
            if not isinstance(code, str) or not _ERROR_CODE.fullmatch(code):
                code = "no code"
            raise CredentialsFailed(f"token endpoint answered {resp.status} ({code})")
        token = answer.get("access_token")
        life = answer.get("expires_in", DEFAULT_LIFE)
        if not isinstance(token, str) or not token or isinstance(life, bool):
            raise CredentialsFailed("token endpoint answered without an access_token")
        try:
            seconds = float(life)
        except (TypeError, ValueError):
            seconds = DEFAULT_LIFE
        return token, max(seconds, 1.0)

    return fetch


def gcp_fetch(config: Gcp) -> Fetch:
    """Google's own library (the `gcp` extra), imported only here: a service account's
    JWT-bearer grant, or application default credentials. Its refresh blocks (HTTP with
    `requests`), so it runs in a thread."""
    import google.auth
    from google.auth.transport.requests import Request
    from google.oauth2 import service_account

    if config.credentials is not None:
        load: Any = service_account.Credentials.from_service_account_file  # untyped upstream
        credentials: Any = load(config.credentials, scopes=[GCP_SCOPE])
    else:
        credentials, _ = google.auth.default(scopes=[GCP_SCOPE])

    def refresh() -> tuple[str, float]:
        try:
            credentials.refresh(Request())
        except Exception as exc:  # google-auth raises its own tree and requests' errors
            raise CredentialsFailed(f"Google token refresh failed ({type(exc).__name__})") from None
        expiry: datetime | None = credentials.expiry  # naive UTC
        life = DEFAULT_LIFE
        if expiry is not None:
            life = (expiry.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds()
        return str(credentials.token), max(life, 1.0)

    async def fetch() -> tuple[str, float]:
        return await asyncio.to_thread(refresh)

    return fetch


class AwsSigner:
    """SigV4 with botocore's signer (the `aws` extra, imported only here) over the exact
    bytes sent: the body after the `model` splice, the request line's path and query.
    Keys come from botocore's usual chain (environment, shared files, roles)."""

    def __init__(self, config: Aws) -> None:
        import botocore.session
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        self.config = config
        self._auth = SigV4Auth
        self._request = AWSRequest
        self._credentials: Any = botocore.session.get_session().get_credentials()

    async def lines(self, method: bytes, url: str, body: bytes) -> bytes:
        credentials = self._credentials
        if credentials is None:
            raise CredentialsFailed("no AWS credentials (environment, shared files or role)")
        if getattr(credentials, "refresh_needed", lambda: False)():
            # Refreshable credentials (roles, SSO) may call STS: never on the loop.
            frozen = await asyncio.to_thread(credentials.get_frozen_credentials)
        else:
            frozen = credentials.get_frozen_credentials()
        request = self._request(method=method.decode(), url=url, data=body)
        self._auth(frozen, self.config.service, self.config.region).add_auth(request)
        out = []
        for name, value in request.headers.items():
            if name.lower() in _SIGNED:
                out.append(f"{name.lower()}: {value}\r\n")
        return "".join(out).encode("latin-1")


# What SigV4 adds to a request (host is the head's own).
_SIGNED = frozenset({"authorization", "x-amz-date", "x-amz-security-token"})


class Credentials:
    """The token sources of every provider that needs one, shared across reloads while a
    provider's credential settings stay the same."""

    def __init__(self, upstream: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self.upstream = upstream
        self.clock = clock  # for the sources made from now on (tests inject one)
        self._sources: dict[tuple[str, Any], TokenSource] = {}
        self._signers: dict[tuple[str, Any], AwsSigner] = {}

    def source(self, provider: Provider) -> TokenSource:
        auth = provider.auth
        assert auth is not None
        key = (provider.name, auth)
        found = self._sources.get(key)
        if found is None:
            if auth.oauth2 is not None:
                fetch = oauth2_fetch(self.upstream, provider.name, auth.oauth2)
            elif auth.gcp is not None:
                fetch = gcp_fetch(auth.gcp)
            else:
                raise ValueError(f"provider {provider.name!r} has no token-based auth")
            found = self._sources[key] = TokenSource(provider.name, fetch, self.clock)
        return found

    async def header(self, provider: Provider) -> bytes:
        """The request's `authorization` line; UpstreamUnavailable when no token can be
        had (the attempt fails like a connect failure: fallback allowed)."""
        try:
            token = await self.source(provider).token()
        except CredentialsFailed as exc:
            raise UpstreamUnavailable(str(exc), {"cause": "credentials"}) from None
        return b"authorization: Bearer " + token.encode("latin-1") + b"\r\n"

    async def signature(self, provider: Provider, method: bytes, url: str, body: bytes) -> bytes:
        """The SigV4 header lines for these exact bytes; UpstreamUnavailable without keys."""
        auth = provider.auth
        assert auth is not None and auth.aws is not None
        key = (provider.name, auth)
        signer = self._signers.get(key)
        if signer is None:
            signer = self._signers[key] = AwsSigner(auth.aws)
        try:
            return await signer.lines(method, url, body)
        except CredentialsFailed as exc:
            raise UpstreamUnavailable(f"provider {provider.name!r}: {exc}",
                                      {"cause": "credentials"}) from None  # fmt: skip

    async def close(self) -> None:
        for source in self._sources.values():
            await source.close()
