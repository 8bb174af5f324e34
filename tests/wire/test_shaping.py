"""gateway/wire/shaping.py: betas out of anthropic-beta, members out of a JSON body, with
orjson as the oracle for the body and every byte not removed left as it was."""

from __future__ import annotations

import json
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.wire.jsonscan import iter_members
from gateway.wire.shaping import drop_betas, drop_members, dropped_header

# --- the body -----------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "model", "context_management", "é", 'q"uote', "s/l", "x\ny"])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(KEYS | st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
SPACE = st.sampled_from(["", " ", "\n", "\t ", "\r\n  "])


def spell_key(key: str, escape: bool) -> str:
    """A key as JSON, its first character escaped as \\uXXXX when asked (the same name)."""
    if not escape:
        return json.dumps(key, ensure_ascii=False)
    return '"' + f"\\u{ord(key[0]):04x}" + json.dumps(key, ensure_ascii=False)[2:]


@st.composite
def objects(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, Any]]]:
    """A JSON object's text (any spacing, repeated keys, escaped keys) and its members."""
    pairs = draw(st.lists(st.tuples(KEYS, VALUES, st.booleans()), max_size=6))
    members = []
    for key, value, escape in pairs:
        ws = [draw(SPACE) for _ in range(4)]
        text = orjson.dumps(value).decode()
        members.append(f"{ws[0]}{spell_key(key, escape)}{ws[1]}:{ws[2]}{text}{ws[3]}")
    body = draw(SPACE) + "{" + ",".join(members) + (draw(SPACE) if not members else "") + "}"
    return body.encode(), [(k, v) for k, v, _ in pairs]


@settings(max_examples=600, deadline=None, database=None)
@given(objects(), st.lists(KEYS | st.just("absent"), max_size=4))
def test_the_spliced_body_is_the_object_minus_the_members(
    case: tuple[bytes, list[tuple[str, Any]]], names: list[str]
) -> None:
    data, pairs = case
    out, removed = drop_members(data, tuple(dict.fromkeys(names)))
    expected = {k: v for k, v in dict(pairs).items() if k not in names}
    assert orjson.loads(out) == expected
    present = {k for k, _ in pairs}
    assert removed == [n for n in dict.fromkeys(names) if n in present]
    if not removed:
        assert out is data  # nothing there: the very bytes, no copy
        return
    # Every kept member is there byte for byte, in order, with the separator that
    # followed it in the client's body; what precedes the first member and follows the
    # last is untouched.
    before = list(iter_members(data))
    at = [i for i, m in enumerate(before) if orjson.loads(m[0]) not in removed]
    after = list(iter_members(out))
    assert [out[k:v] for _, k, _, v in after] == [data[before[i][1] : before[i][3]] for i in at]
    head, tail = data[: before[0][1]], data[before[-1][3] :]
    if not after:
        assert out == head + tail
        return
    assert out[: after[0][1]] == head and out[after[-1][3] :] == tail
    # Between two kept members: the separator that followed the first in the body.
    for j, i in enumerate(at[:-1]):
        assert out[after[j][3] : after[j + 1][1]] == data[before[i][3] : before[i + 1][1]]


def test_a_member_goes_with_its_own_comma() -> None:
    body = b'{"model": "x", "context_management": {"edits": [1, {"a": "}"}]}, "max_tokens": 5}'
    out, removed = drop_members(body, ("context_management",))
    assert out == b'{"model": "x", "max_tokens": 5}' and removed == ["context_management"]
    last, _ = drop_members(body, ("max_tokens",))
    assert last == b'{"model": "x", "context_management": {"edits": [1, {"a": "}"}]}}'
    everything, _ = drop_members(b'{ "a" : 1 , "a":2 }', ("a",))
    assert orjson.loads(everything) == {}


def test_names_inside_values_are_not_members() -> None:
    body = b'{"messages": [{"context_management": 1}], "text": "\\"context_management\\""}'
    out, removed = drop_members(body, ("context_management",))
    assert out is body and removed == []


def test_a_name_spelt_with_escapes_is_found() -> None:
    out, removed = drop_members(b'{"\\u0061":1,"b":2}', ("a",))
    assert (out, removed) == (b'{"b":2}', ["a"])
    out, removed = drop_members(b'{"s\\/l":1,"b":2}', ("s/l",))
    assert (out, removed) == (b'{"b":2}', ["s/l"])


# --- the header ---------------------------------------------------------------------------

BETAS = [(b"anthropic-beta", b"a-1, context-management-2025-06-27 ,b-2")]


def test_drop_betas_removes_tokens_and_keeps_the_rest() -> None:
    headers = [(b"x-other", b"1"), *BETAS, (b"x-after", b"2")]
    out, removed = drop_betas(headers, frozenset({"context-management-2025-06-27"}), None)
    assert out == [(b"x-other", b"1"), (b"anthropic-beta", b"a-1,b-2"), (b"x-after", b"2")]
    assert removed == ["context-management-2025-06-27"]


def test_allow_betas_keeps_only_those() -> None:
    out, removed = drop_betas(BETAS, frozenset(), frozenset({"b-2"}))
    assert out == [(b"anthropic-beta", b"b-2")]
    assert removed == ["a-1", "context-management-2025-06-27"]


def test_a_beta_header_left_empty_is_not_sent() -> None:
    headers = [
        (b"anthropic-beta", b"x"),
        (b"accept", b"*/*"),
        (b"anthropic-beta", b" y ,, x"),
        (b"anthropic-beta", b"z"),
    ]
    out, removed = drop_betas(headers, frozenset({"x", "y"}), None)
    assert out == [(b"accept", b"*/*"), (b"anthropic-beta", b"z")]
    assert removed == ["x", "y"]  # each once, in the order met


def test_headers_without_a_removal_are_the_same_list() -> None:
    headers = [(b"anthropic-beta", b"a,  b"), (b"accept", b"*/*")]
    out, removed = drop_betas(headers, frozenset({"c"}), None)
    assert out is headers and removed == []
    out, removed = drop_betas([(b"accept", b"*/*")], frozenset(), frozenset())
    assert removed == []


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.lists(
        st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=4).map(
            lambda ts: ", ".join(ts).encode()
        ),
        max_size=3,
    ),
    st.frozensets(st.sampled_from(["a", "b", "c", "d"])),
    st.booleans(),
)
def test_what_is_sent_is_what_the_rule_keeps(
    lines: list[bytes], listed: frozenset[str], allow: bool
) -> None:
    headers = [(b"anthropic-beta", line) for line in lines]
    out, removed = drop_betas(headers, frozenset() if allow else listed, listed if allow else None)
    sent = [t.strip().decode() for _, v in out for t in v.split(b",") if t.strip()]
    given_tokens = [t.strip().decode() for v in lines for t in v.split(b",") if t.strip()]
    keep = (lambda t: t in listed) if allow else (lambda t: t not in listed)
    assert sent == [t for t in given_tokens if keep(t)]
    assert removed == list(dict.fromkeys(t for t in given_tokens if not keep(t)))
    assert all(v for _, v in out)  # no empty anthropic-beta line goes out


def test_the_dropped_header_lists_betas_then_fields() -> None:
    assert dropped_header([], []) is None
    assert dropped_header(["b-1", "a-2"], ["context_management"]) == (b"b-1,a-2,context_management")
