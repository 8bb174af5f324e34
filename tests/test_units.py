"""Pure unit tests: no sockets, no files, no event loop; each runs in milliseconds."""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from gateway.auth import authenticate, bearer_token, check_allowed
from gateway.body import GATEWAY_FIELDS, parse_body
from gateway.config.keys import Key, Keys, digest_of, parse_keys
from gateway.config.routes import Cooldown, Model, Provider, Target
from gateway.config.yamlsrc import Source, parse_yaml
from gateway.errors import (
    BadRequest,
    GatewayError,
    ModelNotAllowed,
    Unauthorized,
    ValidationFailed,
)
from gateway.families import CHAT, COMPLETIONS, EMBEDDINGS, RELAYED
from gateway.health import Health
from gateway.incoming import Incoming
from gateway.strategies import Strategies
from gateway.wire.jsonscan import iter_members, replace_value, rewrite_members
from gateway.wire.sse import EventSplitter, event_spans, splice_model

MODEL = b'"model"'


# --------------------------------------------------------------------------- jsonscan


def members(data: bytes) -> list[tuple[bytes, bytes]]:
    """(raw key, raw value) of each top-level member."""
    return [
        (data[ks : data.index(b":", ks + len(k))], data[vs:ve])
        for k, ks, vs, ve in iter_members(data)
    ]


def test_iter_members_nested_and_tricky_strings() -> None:
    data = (
        b'{"a": 1, "b": {"c": "}", "d": [1, {"e": "]"}]}, "f": "x\\"y{[", '
        b'"g": null, "h": [ {"model": 1} ] , "i" : -1.5e3 ,"j":"\\\\"}'
    )
    got = [(data[vs:ve], k) for k, _, vs, ve in iter_members(data)]
    assert got == [
        (b"1", b'"a"'),
        (b'{"c": "}", "d": [1, {"e": "]"}]}', b'"b"'),
        (b'"x\\"y{["', b'"f"'),
        (b"null", b'"g"'),
        (b'[ {"model": 1} ]', b'"h"'),
        (b"-1.5e3", b'"i"'),
        (b'"\\\\"', b'"j"'),
    ]
    # Key starts point at the key's opening quote.
    for raw, ks, _, _ in iter_members(data):
        assert data[ks : ks + len(raw)] == raw


def test_iter_members_leading_whitespace_and_start_offset() -> None:
    data = b' \r\n\t{ "model" :\n "x" }'
    assert [(data[vs:ve]) for _, _, vs, ve in iter_members(data)] == [b'"x"']
    prefix = b"data: "
    line = prefix + b'{"model":"y","z":2}'
    got = [(k, line[vs:ve]) for k, _, vs, ve in iter_members(line, len(prefix))]
    assert got == [(b'"model"', b'"y"'), (b'"z"', b"2")]


def test_iter_members_garbage_before_brace_yields_nothing() -> None:
    assert list(iter_members(b'x{"model": 1}')) == []
    assert list(iter_members(b'[{"model": 1}]')) == []


MALFORMED: list[bytes] = [
    b"",
    b" ",
    b"{",
    b"}",
    b"{}",
    b"{ }",
    b'{"a"',
    b'{"a":',
    b'{"a":}',
    b'{"a":1,,"b":2}',
    b'{"a":1 "b":2}',
    b'{"a" 1}',
    b"{a:1}",
    b'{"a":"unterminated',
    b'{"a":[1,2}',
    b'{"a":{"b":1}',
    b'{"a":1}}}}',
    b"}}}{{{",
    b"[1, 2]",
    b'"just a string"',
    b'{"model":"x",}',
    b'{,"model":"x"}',
    b'{"model"::"x"}',
    b'{"model":"x" "y"}',
    b'{"model":x"y"}',
    b'{"model":\xff\xfe}',
    b'{"\\"":1,"model":2',
    b"{" * 5000,
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' + b"[" * 3000,
]


def _random_blobs(seed: int, count: int) -> Iterable[bytes]:
    rng = random.Random(seed)
    alphabet = b'{}[]":,\\ \n\r\tmodel0123.-eE'
    for _ in range(count):
        n = rng.randint(0, 60)
        body = bytes(rng.choice(alphabet) for _ in range(n))
        yield b"{" + body if rng.random() < 0.7 else body


@pytest.mark.parametrize("data", [*MALFORMED, *_random_blobs(7, 300)])
def test_jsonscan_malformed_never_raises_or_loops(data: bytes) -> None:
    found = list(iter_members(data))
    # Every yielded span lies inside the input and is ordered.
    last = 0
    for raw, ks, vs, ve in found:
        assert last <= ks < vs <= ve <= len(data)
        assert data[ks : ks + len(raw)] == raw
        last = ve
    assert isinstance(replace_value(data, MODEL, b'"m"'), bytes)
    assert isinstance(rewrite_members(data, {"model": b'"m"'}, GATEWAY_FIELDS), bytes)
    if b"{" in data:
        assert isinstance(rewrite_members(data, {}, GATEWAY_FIELDS, b'"model":"m"'), bytes)


def test_replace_value_only_top_level_and_preserves_bytes() -> None:
    data = b'{\r\n  "choices": [{"model": "inner"}],\n  "model"  :  "up" ,\t"x": "\\"model\\": 1"}'
    out = replace_value(data, MODEL, b'"slug"')
    assert out == data.replace(b'"up"', b'"slug"')
    assert orjson.loads(out)["choices"][0]["model"] == "inner"


def test_replace_value_absent_key_returns_input_unchanged() -> None:
    data = b'{"a": {"model": "x"}, "models": ["y"], "model_version": "z"}'
    assert replace_value(data, MODEL, b'"s"') == data


def test_replace_value_non_string_value() -> None:
    assert replace_value(b'{"model":null,"a":1}', MODEL, b'"s"') == b'{"model":"s","a":1}'
    assert replace_value(b'{"model": {"x": "}"}}', MODEL, b'"s"') == b'{"model": "s"}'


def test_replace_value_duplicate_model_keys_parsed_value_is_new() -> None:
    # JSON parsers (orjson, json, JS) keep the *last* duplicate: whatever the client reads
    # as the top-level `model` must be the new value.
    data = b'{"model": "a", "x": 1, "model": "b"}'
    out = replace_value(data, MODEL, b'"slug"')
    assert orjson.loads(out)["model"] == "slug"
    assert json.loads(out)["model"] == "slug"


def test_rewrite_members_replaces_and_drops_keeping_spacing() -> None:
    data = (
        b'{ "models": ["a", "b"],\n  "model" : "a",\r\n  "temperature": 0.70,\n'
        b'  "route": "fallback", "extra": {"provider": "inner", "model": "in"},\n'
        b'  "provider": {"order": ["x"]}, "session_id": "s", "n": 1e2 }'
    )
    out = rewrite_members(data, {"model": b'"up"'}, GATEWAY_FIELDS)
    assert out == (
        b'{ "model" : "up",\r\n  "temperature": 0.70,\n'
        b'  "extra": {"provider": "inner", "model": "in"},\n'
        b'  "n": 1e2 }'
    )
    assert orjson.loads(out) == {
        "model": "up",
        "temperature": 0.7,
        "extra": {"provider": "inner", "model": "in"},
        "n": 100.0,
    }


@pytest.mark.parametrize(
    "data",
    [
        b'{"route":"fallback","model":"a","messages":[]}',
        b'{"model":"a","messages":[],"route":"fallback"}',
        b'{"model":"a","route":"fallback","messages":[]}',
        b'{"route":"fallback","session_id":"s","model":"a"}',
        b'{"model":"a","route":"fallback","session_id":"s"}',
        b'{"route":"fallback","model":"a","session_id":"s"}',
    ],
)
def test_rewrite_members_drop_at_any_position_stays_valid(data: bytes) -> None:
    out = rewrite_members(data, {"model": b'"up"'}, GATEWAY_FIELDS)
    expected = {k: v for k, v in orjson.loads(data).items() if k not in GATEWAY_FIELDS}
    expected["model"] = "up"
    assert orjson.loads(out) == expected


def test_rewrite_members_drop_everything() -> None:
    out = rewrite_members(b'{"route": "fallback", "models": ["a"]}', {}, GATEWAY_FIELDS)
    assert orjson.loads(out) == {}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{}", {"model": "up"}),
        (b"{ }", {"model": "up"}),
        (b'{"models": ["a"], "messages": []}', {"model": "up", "messages": []}),
        (b'{"messages": [], "models": ["a"]}', {"model": "up", "messages": []}),
        (b'{"models": ["a"]}', {"model": "up"}),
    ],
)
def test_rewrite_members_insert(data: bytes, expected: dict[str, Any]) -> None:
    out = rewrite_members(data, {}, GATEWAY_FIELDS, b'"model":"up"')
    assert orjson.loads(out) == expected


def test_rewrite_members_duplicate_keys() -> None:
    data = b'{"model": "a", "route": "fallback", "model": "b", "route": "x", "k": 1}'
    out = rewrite_members(data, {"model": b'"up"'}, GATEWAY_FIELDS)
    assert b'"a"' not in out and b'"b"' not in out and b"route" not in out
    assert orjson.loads(out) == {"model": "up", "k": 1}


def test_rewrite_members_escaped_key_names() -> None:
    # "mod\u0065l" is the key `model` as far as any JSON parser is concerned.
    data = b'{"mod\\u0065l": "a", "rout\\u0065": "fallback", "x": "\\u00e9"}'
    out = rewrite_members(data, {"model": b'"up"'}, GATEWAY_FIELDS)
    assert orjson.loads(out) == {"model": "up", "x": "é"}
    assert b'"\\u00e9"' in out


def _random_value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 2**40, 1.5, -3.25e-7])
    if kind in (2, 3):
        return "".join(rng.choice('ab{}[]":,\\ \n\té€/model') for _ in range(rng.randint(0, 8)))
    if kind == 4:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {
        rng.choice(["model", "a", "b{", 'q"', "route", "x\\y"]): _random_value(rng, depth + 1)
        for _ in range(rng.randint(0, 3))
    }


def test_rewrite_members_random_objects_roundtrip() -> None:
    rng = random.Random(2024)
    keys = ["model", "messages", "route", "models", "provider", "session_id", "t", "{", '"', "\\"]
    for i in range(300):
        obj = {k: _random_value(rng, 0) for k in rng.sample(keys, rng.randint(1, len(keys)))}
        indent = [None, 0, 2][i % 3]
        data = (
            orjson.dumps(obj)
            if indent is None
            else json.dumps(obj, indent=indent, ensure_ascii=i % 2 == 0).encode()
        )
        out = rewrite_members(data, {"model": b'"up"'}, GATEWAY_FIELDS)
        expected = {k: v for k, v in obj.items() if k not in GATEWAY_FIELDS}
        if "model" in obj:
            expected["model"] = "up"
        assert orjson.loads(out) == expected, data
        # Kept members are the input's own bytes.
        for raw, ks, _, ve in iter_members(data):
            name = orjson.loads(raw)
            if name not in GATEWAY_FIELDS and name != "model":
                assert data[ks:ve] in out


# --------------------------------------------------------------------------- sse

STREAM = (
    b'data: {"model":"up","choices":[{"delta":{"content":"{\\n}"}}]}\n\n'
    b"event: ping\r\ndata: 1\r\n\r\n"
    b": comment with \r\n\r\n"
    b'data: {"model": "up"}\r\r'
    b"id: 7\rdata: x\r\n\n"
    b"data: two\ndata: lines\r\r\n"
    b"data: [DONE]\n\n"
    b"data: unterminated"
)
EXPECTED_EVENTS = [
    b'data: {"model":"up","choices":[{"delta":{"content":"{\\n}"}}]}\n\n',
    b"event: ping\r\ndata: 1\r\n\r\n",
    b": comment with \r\n\r\n",
    b'data: {"model": "up"}\r\r',
    b"id: 7\rdata: x\r\n\n",
    b"data: two\ndata: lines\r\r\n",
    b"data: [DONE]\n\n",
]
REST = b"data: unterminated"


def _events(splitter: EventSplitter, chunk: bytes) -> list[bytes]:
    """The events one read completes, as the attempt reads them (feed_block, event_spans)."""
    block = splitter.feed_block(chunk)
    return [block[start:end] for start, end in event_spans(block)]


def _feed(chunks: Iterable[bytes]) -> tuple[list[bytes], bytes]:
    splitter = EventSplitter()
    events: list[bytes] = []
    for c in chunks:
        events.extend(_events(splitter, c))
    return events, splitter.rest()


def _norm(event: bytes) -> bytes:
    return event.strip(b"\r\n")


def test_event_splitter_whole_stream() -> None:
    events, rest = _feed([STREAM])
    assert events == EXPECTED_EVENTS
    assert rest == REST


def test_event_splitter_every_split_point() -> None:
    expected = [_norm(e) for e in EXPECTED_EVENTS]
    for i in range(len(STREAM) + 1):
        events, rest = _feed([STREAM[:i], STREAM[i:]])
        assert b"".join(events) + rest == STREAM, i
        assert [_norm(e) for e in events] == expected, i
        assert _norm(rest) == REST, i


def test_event_splitter_every_pair_of_split_points() -> None:
    expected = [_norm(e) for e in EXPECTED_EVENTS]
    n = len(STREAM)
    for i in range(0, n + 1, 3):
        for j in range(i, n + 1, 2):
            events, rest = _feed([STREAM[:i], STREAM[i:j], STREAM[j:]])
            assert b"".join(events) + rest == STREAM, (i, j)
            assert [_norm(e) for e in events] == expected, (i, j)


def test_event_splitter_byte_by_byte() -> None:
    events, rest = _feed([STREAM[i : i + 1] for i in range(len(STREAM))])
    assert b"".join(events) + rest == STREAM
    assert [_norm(e) for e in events] == [_norm(e) for e in EXPECTED_EVENTS]


def test_event_splitter_never_holds_a_complete_event_back() -> None:
    splitter = EventSplitter()
    for event in EXPECTED_EVENTS:
        out = _events(splitter, event)
        assert b"".join(out).strip(b"\r\n") == event.strip(b"\r\n")
        assert len(out) == 1


def test_event_splitter_rest_is_emptied() -> None:
    splitter = EventSplitter()
    assert _events(splitter, b"data: a\n") == []
    assert splitter.rest() == b"data: a\n"
    assert splitter.rest() == b""
    assert _events(splitter, b"data: b\n\n") == [b"data: b\n\n"]


def test_event_splitter_crlf_is_one_line_ending() -> None:
    # `\r\n` alone is not a blank line.
    assert _feed([b"data: a\r\ndata: b\r\n"]) == ([], b"data: a\r\ndata: b\r\n")


SLUG = b'"slug"'


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (b'data: {"model":"up","a":1}\n\n', b'data: {"model":"slug","a":1}\n\n'),
        (b'data:{"model":"up"}\r\n\r\n', b'data:{"model":"slug"}\r\n\r\n'),
        (b'data: { "model" :  "up" , "x":2}\r\r', b'data: { "model" :  "slug" , "x":2}\r\r'),
        (
            b'data: {"choices":[{"model":"in"}],"model":"up"}\n\n',
            b'data: {"choices":[{"model":"in"}],"model":"slug"}\n\n',
        ),
        (
            b'event: model\ndata: {"model":"up"}\n\n',
            b'event: model\ndata: {"model":"slug"}\n\n',
        ),
        (
            b': "model" comment\nid: 1\ndata: {"model":"up"}\n\n',
            b': "model" comment\nid: 1\ndata: {"model":"slug"}\n\n',
        ),
        (
            b'data: {"model":"a"}\ndata: {"model":"b"}\n\n',
            b'data: {"model":"slug"}\ndata: {"model":"slug"}\n\n',
        ),
    ],
)
def test_splice_model_rewrites_top_level_model(event: bytes, expected: bytes) -> None:
    assert splice_model(event, SLUG) == expected


@pytest.mark.parametrize(
    "event",
    [
        b"data: [DONE]\n\n",
        b"data: [DONE]\r\n\r\n",
        b': {"model":"up"}\n\n',
        b'event: {"model":"up"}\n\n',
        b'id: {"model":"up"}\n\n',
        b'data: "model" is a word\n\n',
        b'data: ["model", "up"]\n\n',
        b'data: {"choices":[{"model":"in"}]}\n\n',
        b'data: {"text":"\\"model\\": \\"up\\""}\n\n',
        b'data: {"model_id":"up"}\n\n',
        b'xdata: {"model":"up"}\n\n',
        b'data: {"model":\n\n',
        b"",
    ],
)
def test_splice_model_leaves_other_lines_alone(event: bytes) -> None:
    assert splice_model(event, SLUG) == event


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


# --------------------------------------------------------------------------- health


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


E = ("p", "m", "")


def test_health_circuit_breaker_cycle() -> None:
    clock = Clock()
    health = Health(clock)
    cd = Cooldown(failures=3, seconds=30)
    assert health.available(E)
    # Closed: below the threshold the entry stays usable.
    for _ in range(2):
        health.begin(E)
        health.failed(E, cd)
        health.end(E)
        assert health.available(E)
    health.begin(E)
    health.failed(E, cd)
    health.end(E)
    assert not health.available(E)  # open
    assert health.retry_at(E) == pytest.approx(1030.0)
    clock.now = 1029.9
    assert not health.available(E)
    clock.now = 1030.0
    assert health.available(E)  # half-open: one probe may go
    health.begin(E)
    assert not health.available(E)  # while the probe runs nobody else gets it
    health.failed(E, cd)
    health.end(E)
    assert not health.available(E)  # failed probe: open again at once
    assert health.retry_at(E) == pytest.approx(1060.0)
    clock.now = 1059.0
    assert not health.available(E)
    clock.now = 1060.0
    assert health.available(E)
    health.begin(E)
    assert not health.available(E)
    health.succeeded(E, 0.1)
    health.end(E)
    assert health.available(E)  # closed
    # Closed again: the count starts over.
    for _ in range(2):
        health.begin(E)
        health.failed(E, cd)
        health.end(E)
    assert health.available(E)
    health.failed(E, cd)
    assert not health.available(E)


def test_health_failed_probe_reopens_even_below_threshold() -> None:
    clock = Clock()
    health = Health(clock)
    cd = Cooldown(failures=1, seconds=5)
    health.failed(E, cd)
    assert not health.available(E)
    clock.now += 5
    health.begin(E)
    # Far below a threshold of 100, yet the failed probe reopens the breaker.
    health.failed(E, Cooldown(failures=100, seconds=5))
    health.end(E)
    assert not health.available(E)


def test_health_success_resets_consecutive_failures() -> None:
    health = Health(Clock())
    cd = Cooldown(failures=2, seconds=30)
    health.failed(E, cd)
    health.succeeded(E)
    health.failed(E, cd)
    assert health.available(E)
    health.failed(E, cd)
    assert not health.available(E)


def test_health_retry_after_extends_cooldown() -> None:
    clock = Clock()
    health = Health(clock)
    health.failed(E, Cooldown(failures=1, seconds=10), retry_after=60)
    clock.now += 59
    assert not health.available(E)
    clock.now += 1
    assert health.available(E)


def test_health_entries_are_independent_and_track_in_flight() -> None:
    health = Health(Clock())
    other = ("p", "other", "")
    health.failed(E, Cooldown(failures=1, seconds=30))
    assert not health.available(E)
    assert health.available(other)
    health.begin(other)
    health.begin(other)
    assert health.state(other).in_flight == 2
    health.end(other)
    assert health.state(other).in_flight == 1


def test_health_latency_ewma() -> None:
    health = Health(Clock())
    health.succeeded(E, 1.0)
    assert health.state(E).latency == pytest.approx(1.0)
    health.succeeded(E, 2.0)
    assert 1.0 < health.state(E).latency < 2.0  # type: ignore[operator]
    health.succeeded(E)  # no measurement: unchanged
    value = health.state(E).latency
    for _ in range(50):
        health.succeeded(E, 0.1)
    assert health.state(E).latency == pytest.approx(0.1, abs=0.01)
    assert value is not None and value > 0.1


# --------------------------------------------------------------------------- strategies


def _model(strategy: str, weights: list[float]) -> Model:
    targets = tuple(
        Target(Provider(name=f"p{i}", base_url=f"http://127.0.0.1:{9000 + i}"), None, w)
        for i, w in enumerate(weights)
    )
    return Model(slug="s", id="s", name="s", targets=targets, strategy=strategy)


def _entry_keys(model: Model) -> list[tuple[str, str, str]]:
    return [(t.provider.name, "s", "") for t in model.targets]


def test_fallback_keeps_file_order() -> None:
    model = _model("fallback", [1, 1, 1])
    strategies = Strategies(Health(Clock()), random.Random(1))
    for _ in range(3):
        assert strategies.order(model, "s", _entry_keys(model)) == [0, 1, 2]


def test_round_robin_rotates() -> None:
    model = _model("round_robin", [1, 1, 1])
    strategies = Strategies(Health(Clock()), random.Random(1))
    orders = [strategies.order(model, "s", _entry_keys(model)) for _ in range(4)]
    assert orders == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_weighted_respects_weights_and_never_picks_zero() -> None:
    model = _model("weighted", [3, 1, 0])
    strategies = Strategies(Health(Clock()), random.Random(12345))
    firsts: Counter[int] = Counter()
    runs = 4000
    for _ in range(runs):
        order = strategies.order(model, "s", _entry_keys(model))
        assert 2 not in order
        assert sorted(order) == [0, 1]
        firsts[order[0]] += 1
    share = firsts[0] / runs
    assert 0.68 < share < 0.82, share


def test_weighted_all_equal_is_roughly_uniform() -> None:
    model = _model("weighted", [1, 1, 1, 1])
    strategies = Strategies(Health(Clock()), random.Random(99))
    firsts: Counter[int] = Counter(
        strategies.order(model, "s", _entry_keys(model))[0] for _ in range(4000)
    )
    assert set(firsts) == {0, 1, 2, 3}
    assert all(800 < n < 1200 for n in firsts.values()), firsts


def test_least_busy_prefers_fewest_in_flight() -> None:
    health = Health(Clock())
    model = _model("least_busy", [1, 1, 1])
    keys = _entry_keys(model)
    strategies = Strategies(health, random.Random(1))
    for _ in range(3):
        health.begin(keys[0])
    health.begin(keys[1])
    assert strategies.order(model, "s", keys) == [2, 1, 0]
    for _ in range(3):
        health.begin(keys[2])
    health.end(keys[0])
    health.end(keys[0])
    # in flight: 1, 1, 3
    assert strategies.order(model, "s", keys)[-1] == 2


class _NoExplore(random.Random):
    def random(self) -> float:
        return 0.999


def test_latency_prefers_lower_ewma() -> None:
    health = Health(Clock())
    model = _model("latency", [1, 1, 1])
    keys = _entry_keys(model)
    health.succeeded(keys[0], 0.5)
    health.succeeded(keys[1], 0.1)
    health.succeeded(keys[2], 0.3)
    assert Strategies(health, _NoExplore()).order(model, "s", keys) == [1, 2, 0]
    # With real randomness, exploration is occasional: the fastest still leads mostly.
    strategies = Strategies(health, random.Random(5))
    firsts = Counter(strategies.order(model, "s", keys)[0] for _ in range(1000))
    assert firsts[1] > 850
    # The average moves: entry 1 slows down, entry 2 becomes the fastest.
    for _ in range(40):
        health.succeeded(keys[1], 2.0)
    assert Strategies(health, _NoExplore()).order(model, "s", keys)[0] == 2


def test_latency_tries_unmeasured_entries_first() -> None:
    health = Health(Clock())
    model = _model("latency", [1, 1])
    keys = _entry_keys(model)
    health.succeeded(keys[0], 0.01)
    assert Strategies(health, _NoExplore()).order(model, "s", keys) == [1, 0]


def test_single_target_is_trivial_for_every_strategy() -> None:
    for name in ("fallback", "round_robin", "weighted", "least_busy", "latency"):
        model = _model(name, [1])
        assert Strategies(Health(Clock()), random.Random(1)).order(
            model, "s", _entry_keys(model)
        ) == [0]


def test_gateway_errors_envelope() -> None:
    body = orjson.loads(GatewayError("boom", {"x": 1}).body())
    assert body == {
        "error": {
            "message": "boom",
            "type": "server_error",
            "code": "internal_error",
            "param": None,
            "details": {"x": 1},
        }
    }


@pytest.mark.parametrize("bad_at", [0, (1 << 20) - 1, 1 << 20, (3 << 20) - 5])
def test_parse_body_checks_utf8_of_large_bodies_a_window_at_a_time(bad_at: int) -> None:
    """Skipped strings are checked for UTF-8 too, in windows; a character split across
    a window's edge is fine, a bad byte anywhere is 400."""
    text = "é" * (3 << 19)  # 3 MiB of two-byte characters: every window edge splits none
    raw = orjson.dumps({"model": "a", "messages": [{"role": "user", "content": "x" + text}]})
    assert parse_body(raw, CHAT).slugs == ("a",)  # the odd offset splits them
    start = raw.index(b"x") + 1
    broken = raw[: start + bad_at] + b"\xff" + raw[start + bad_at + 1 :]
    with pytest.raises(BadRequest) as info:
        parse_body(broken, CHAT)
    assert info.value.details["cause"] == "json"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"model":"a","messages":[ \n ]}', "messages"),
        (b'{"model":"a","messages":null}', "messages"),
        (b'{"model":"a","messages":{"role":"user"}}', "messages"),
        (b'{"model":"a"}', "messages"),
    ],
)
def test_parse_body_needs_a_non_empty_messages_list(raw: bytes, field: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        parse_body(raw, CHAT)
    assert info.value.details["field"] == field


def test_parse_body_needs_a_prompt_that_is_not_null() -> None:
    with pytest.raises(ValidationFailed):
        parse_body(b'{"model":"a","prompt":null}', COMPLETIONS)
    assert parse_body(b'{"model":"a","prompt":""}', COMPLETIONS).slugs == ("a",)


def test_parse_body_counts_the_prompt_only_when_asked() -> None:
    raw = b'{"model":"a","messages":[{"role":"user","content":"abcd"},{"content":[{"text":"ef"}]}]}'
    assert parse_body(raw, CHAT).prompt_tokens == 0
    # Every string the upstream reads (gateway/wire/estimate.py): "role" "user" "content"
    # "abcd" "content" "text" "ef" = 32 bytes, 8 tokens; the allowance by default.
    counted = parse_body(raw, CHAT, count_prompt=True)
    assert (counted.prompt_tokens, counted.output_allowance) == (8, 4096)
