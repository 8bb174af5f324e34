"""Bearer secret -> Key. Secrets are hashed before any comparison."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

from gateway.config.keys import Key, Keys
from gateway.errors import ModelNotAllowed, Unauthorized


def bearer_token(value: bytes) -> bytes | None:
    """The token of an `Authorization: Bearer <token>` value."""
    scheme, _, token = value.partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def authenticate(keys: Keys, token: bytes | None, now: datetime | None = None) -> Key | None:
    """The key the token belongs to; None when no keys are configured (open gateway).

    The lookup is by SHA-256 digest: timing can reveal at most something about a hash
    of the secret, never the secret. compare_digest guards the final equality anyway.
    """
    if keys.open:
        return None
    if token is None:
        raise Unauthorized(
            "missing API key: send Authorization: Bearer <key>", {"cause": "missing"}
        )
    digest = hashlib.sha256(token).digest()
    key = keys.by_digest.get(digest)
    if key is None or not hmac.compare_digest(key.digest, digest):
        raise Unauthorized("invalid API key", {"cause": "invalid"})
    if key.disabled:
        raise Unauthorized("this API key is disabled", {"cause": "disabled", "key": key.name})
    if key.expires is not None and key.expired(now or datetime.now(UTC)):
        raise Unauthorized("this API key has expired", {"cause": "expired", "key": key.name})
    return key


def check_allowed(key: Key | None, slug: str) -> None:
    if key is not None and not key.allows(slug):
        raise ModelNotAllowed(
            f"this API key may not use model {slug!r}", {"model": slug, "key": key.name}
        )
