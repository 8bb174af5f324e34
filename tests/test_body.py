"""gateway/body.py: one parse, validation and the upstream rewrite, from bytes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from gateway.body import parse_body
from gateway.errors import (
    BadRequest,
    ValidationFailed,
)
from gateway.families import CHAT, EMBEDDINGS, RELAYED

MODEL = b'"model"'


# --------------------------------------------------------------------------- body


def test_parse_body_basic() -> None:
    raw = b'{"model": "a", "messages": [{"role": "user", "content": "x"}], "stream": null}'
    parsed = parse_body(raw, CHAT)
    assert parsed.slugs == ("a",)
    assert parsed.stream is False
    assert parsed.session_id is None
    assert parsed.prefs is None
    assert parsed.needs_rewrite is False
    assert parsed.raw is raw


def test_parse_body_model_then_models_without_repeats() -> None:
    raw = b'{"model":"a","models":["b","a","c"],"route":"fallback","messages":[1],"stream":true}'
    parsed = parse_body(raw, CHAT)
    assert parsed.slugs == ("a", "b", "c")
    assert parsed.stream is True
    assert parsed.needs_rewrite is True


def test_parse_body_models_only() -> None:
    parsed = parse_body(b'{"models":["b","c"],"messages":[1]}', CHAT)
    assert parsed.slugs == ("b", "c")


def test_parse_body_session_id_body_wins_over_header() -> None:
    body = b'{"model":"a","messages":[1],"session_id":"from-body"}'
    assert parse_body(body, CHAT, "hdr").session_id == "from-body"
    plain = b'{"model":"a","messages":[1]}'
    assert parse_body(plain, CHAT, "hdr").session_id == "hdr"
    ok = b'{"model":"a","messages":[1],"session_id":"' + b"s" * 128 + b'"}'
    assert parse_body(ok, CHAT).session_id == "s" * 128


def test_parse_body_provider_prefs() -> None:
    raw = (
        b'{"model":"a","messages":[1],"provider":{"order":["x","y"],"only":["x"],'
        b'"ignore":["z"],"allow_fallbacks":false}}'
    )
    prefs = parse_body(raw, CHAT).prefs
    assert prefs is not None
    assert prefs.order == ("x", "y")
    assert prefs.only == ("x",)
    assert prefs.ignore == ("z",)
    assert prefs.allow_fallbacks is False


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[1, 2]", b'"x"', b"null", b"12", b'{"model": "a"', b'{"a":"\xff"}'],
)
def test_parse_body_not_a_json_object(raw: bytes) -> None:
    with pytest.raises(BadRequest) as info:
        parse_body(raw, CHAT)
    assert info.value.status == 400
    assert info.value.code == "bad_request"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/chat/completions", {"messages": [1]}, "model"),
        ("/chat/completions", {"model": None, "messages": [1]}, "model"),
        ("/chat/completions", {"model": "", "messages": [1]}, "model"),
        ("/chat/completions", {"model": 5, "messages": [1]}, "model"),
        ("/chat/completions", {"model": ["a"], "messages": [1]}, "model"),
        ("/chat/completions", {"model": "a"}, "messages"),
        ("/chat/completions", {"model": "a", "messages": []}, "messages"),
        ("/chat/completions", {"model": "a", "messages": "hi"}, "messages"),
        ("/chat/completions", {"model": "a", "messages": {"role": "user"}}, "messages"),
        ("/chat/completions", {"model": "a", "messages": None}, "messages"),
        ("/chat/completions", {"model": "a", "messages": [1], "stream": "true"}, "stream"),
        ("/chat/completions", {"model": "a", "messages": [1], "stream": 1}, "stream"),
        ("/chat/completions", {"model": "a", "messages": [1], "stream": 0}, "stream"),
        ("/chat/completions", {"model": "a", "messages": [1], "stream": {}}, "stream"),
        ("/chat/completions", {"model": "a", "messages": [1], "route": "x"}, "route"),
        ("/chat/completions", {"model": "a", "messages": [1], "models": "b"}, "models"),
        ("/chat/completions", {"model": "a", "messages": [1], "models": []}, "models"),
        ("/chat/completions", {"model": "a", "messages": [1], "models": [1]}, "models"),
        ("/chat/completions", {"model": "a", "messages": [1], "session_id": 5}, "session_id"),
        (
            "/chat/completions",
            {"model": "a", "messages": [1], "session_id": "s" * 129},
            "session_id",
        ),
        ("/chat/completions", {"model": "a", "messages": [1], "provider": "x"}, "provider"),
        ("/embeddings", {"model": "a"}, "input"),
        ("/embeddings", {"model": "a", "input": None}, "input"),
        ("/completions", {"model": "a"}, "prompt"),
    ],
)
def test_parse_body_validation(path: str, body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_body(orjson.dumps(body), RELAYED[path])
    assert info.value.status == 422
    assert info.value.code == "validation_error"
    assert field in [str(v) for v in info.value.details.values()]


def test_parse_body_long_header_session_id_is_rejected() -> None:
    with pytest.raises(ValidationFailed):
        parse_body(b'{"model":"a","messages":[1]}', CHAT, "h" * 129)


def test_for_upstream_replaces_model_and_keeps_every_other_byte() -> None:
    raw = (
        b'{\n  "model": "slug",\n  "messages": [{"role": "user", "content": "caf\\u00e9 {x}"}],\n'
        b'  "temperature": 0.70,\n  "max_tokens": 1E3,\n  "unknown_field": {"model": "keep"},\n'
        b'  "models": ["slug", "other"],\n  "route": "fallback",\n  "session_id": "s1",\n'
        b'  "provider": {"order": ["p"]}\n}'
    )
    out = parse_body(raw, CHAT).for_upstream("up/model-1")
    assert out == (
        b'{\n  "model": "up/model-1",\n  "messages": [{"role": "user", "content": "caf\\u00e9 {x}"}],\n'
        b'  "temperature": 0.70,\n  "max_tokens": 1E3,\n  "unknown_field": {"model": "keep"}\n}'
    )


def test_for_upstream_inserts_model_when_only_models_given() -> None:
    raw = b'{"models": ["a", "b"], "messages": [{"role": "user", "content": "x"}], "n": 1}'
    out = parse_body(raw, CHAT).for_upstream('we"ird')
    assert orjson.loads(out) == {
        "model": 'we"ird',
        "messages": [{"role": "user", "content": "x"}],
        "n": 1,
    }


def test_for_upstream_plain_body_only_model_changes() -> None:
    raw = b'{"model":"a","input":["x","y"],"encoding_format":"float"}'
    out = parse_body(raw, EMBEDDINGS).for_upstream("text-embed")
    assert out == b'{"model":"text-embed","input":["x","y"],"encoding_format":"float"}'
