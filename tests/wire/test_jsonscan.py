"""gateway/wire/jsonscan.py: the `model` splice and member rewrites, from bytes."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from typing import Any

import orjson
import pytest

from gateway.body import GATEWAY_FIELDS
from gateway.wire.jsonscan import iter_members, replace_value, rewrite_members

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
