"""gateway/auth.py and the keys it reads: secrets to keys, allow-lists, expiry."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from gateway.auth import authenticate, bearer_token, check_allowed
from gateway.config.keys import Key, Keys, digest_of, parse_keys
from gateway.config.source import Source
from gateway.config.yamlsrc import parse_yaml
from gateway.errors import (
    ModelNotAllowed,
    Unauthorized,
)
from gateway.incoming import Incoming

MODEL = b'"model"'


# --------------------------------------------------------------------------- auth, keys

SECRET_LOWER = "sk-gw-lower"
SECRET_UPPER = "sk-gw-upper"
KEYS_YAML = f"""
keys:
  - name: plain
    key: sk-gw-plain
  - name: lower
    sha256: {hashlib.sha256(SECRET_LOWER.encode()).hexdigest()}
  - name: upper
    sha256: "{hashlib.sha256(SECRET_UPPER.encode()).hexdigest().upper()}"
  - name: switched-off
    key: sk-gw-off
    disabled: true
  - name: dated
    key: sk-gw-dated
    expires: 2027-01-01
  - name: stamped
    key: sk-gw-stamped
    expires: "2027-01-01T12:00:00+02:00"
  - name: limited
    key: sk-gw-limited
    models: ["gpt-4o-mini", "openai/*"]
"""


def _keys() -> Keys:
    src = Source("keys.yaml")
    keys = parse_keys(parse_yaml(KEYS_YAML, src), src)
    assert src.problems == []
    return keys


NOW = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("secret", "name"),
    [("sk-gw-plain", "plain"), (SECRET_LOWER, "lower"), (SECRET_UPPER, "upper")],
)
def test_authenticate_valid(secret: str, name: str) -> None:
    key = authenticate(_keys(), secret.encode(), NOW)
    assert key is not None and key.name == name


@pytest.mark.parametrize(
    ("token", "cause"),
    [
        (None, "missing"),
        (b"sk-gw-wrong", "invalid"),
        (b"sk-gw-plain ", "invalid"),
        (b"SK-GW-PLAIN", "invalid"),
        (hashlib.sha256(SECRET_LOWER.encode()).hexdigest().encode(), "invalid"),
        (b"sk-gw-off", "disabled"),
    ],
)
def test_authenticate_refused(token: bytes | None, cause: str) -> None:
    with pytest.raises(Unauthorized) as info:
        authenticate(_keys(), token, NOW)
    assert info.value.status == 401
    assert info.value.code == "unauthorized"
    assert info.value.details.get("cause") == cause
    assert b"sk-gw" not in info.value.body()


@pytest.mark.parametrize(
    ("now", "valid"),
    [
        (datetime(2026, 12, 31, 23, 59, tzinfo=UTC), True),
        (datetime(2027, 1, 1, 0, 0, tzinfo=UTC), True),
        (datetime(2027, 1, 1, 23, 59, 59, 999999, tzinfo=UTC), True),
        (datetime(2027, 1, 2, 0, 0, tzinfo=UTC), False),
        (datetime(2030, 1, 1, tzinfo=UTC), False),
    ],
)
def test_authenticate_date_expiry_is_through_that_day_utc(now: datetime, valid: bool) -> None:
    if valid:
        key = authenticate(_keys(), b"sk-gw-dated", now)
        assert key is not None and key.name == "dated"
    else:
        with pytest.raises(Unauthorized) as info:
            authenticate(_keys(), b"sk-gw-dated", now)
        assert info.value.details.get("cause") == "expired"


def test_authenticate_timestamp_expiry() -> None:
    # 12:00 at +02:00 is 10:00 UTC.
    assert authenticate(_keys(), b"sk-gw-stamped", datetime(2027, 1, 1, 9, 59, 59, tzinfo=UTC))
    with pytest.raises(Unauthorized):
        authenticate(_keys(), b"sk-gw-stamped", datetime(2027, 1, 1, 10, 0, tzinfo=UTC))


def test_authenticate_open_gateway() -> None:
    assert Keys().open
    assert authenticate(Keys(), None, NOW) is None
    assert authenticate(Keys(), b"anything", NOW) is None
    for text in ("", "keys:\n", "keys: []\n"):
        src = Source("k")
        assert parse_keys(parse_yaml(text, src), src).open


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (b"Bearer abc", b"abc"),
        (b"bearer abc", b"abc"),
        (b"BEARER  abc ", b"abc"),
        (b"Basic abc", None),
        (b"Bearer", None),
        (b"Bearer ", None),
        (b"abc", None),
    ],
)
def test_bearer(value: bytes, token: bytes | None) -> None:
    assert bearer_token(value) == token
    # What every endpoint reads: the Authorization field, whatever precedes it.
    assert Incoming([(b"x-other", b"Bearer no"), (b"authorization", value)]).token() == token


def test_bearer_absent() -> None:
    assert Incoming([(b"x-other", b"Bearer no")]).token() is None
    # x-api-key (Anthropic) and api-key (Azure) stand in for a missing or non-Bearer one.
    assert Incoming([(b"x-api-key", b"abc")]).token() == b"abc"
    assert Incoming([(b"authorization", b"Basic x"), (b"api-key", b"k")]).token() == b"k"


@pytest.mark.parametrize(
    ("slug", "allowed"),
    [
        ("gpt-4o-mini", True),
        ("openai/gpt-4o", True),
        ("openai/org/model", True),
        ("gpt-4o", False),
        ("gpt-4o-mini-2", False),
        ("xopenai/gpt", False),
        ("OpenAI/gpt", False),
        ("openai", False),
    ],
)
def test_key_allows_globs(slug: str, allowed: bool) -> None:
    key = next(k for k in _keys().entries if k.name == "limited")
    assert key.allows(slug) is allowed
    if allowed:
        check_allowed(key, slug)
    else:
        with pytest.raises(ModelNotAllowed) as info:
            check_allowed(key, slug)
        assert info.value.status == 403
        assert info.value.code == "model_not_allowed"


def test_key_allows_other_globs() -> None:
    key = Key("k", digest_of("s"), models=("claude-?", "team-[ab]/*", "*-mini"))
    assert key.allows("claude-3")
    assert not key.allows("claude-35")
    assert key.allows("team-a/x") and key.allows("team-b/y/z")
    assert not key.allows("team-c/x")
    assert key.allows("gpt-4o-mini")
    assert Key("all", digest_of("s")).allows("anything/at all")
    assert not Key("none", digest_of("s"), models=()).allows("a")
    check_allowed(None, "anything")
