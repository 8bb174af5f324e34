"""Find and splice top-level members of a JSON object in place, without re-encoding it.

Re-serialising (`dumps(loads(x))`) would change whitespace, escapes and number spelling;
the gateway promises the bytes it relays are the upstream's own.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import orjson

# Strings are one token (so braces inside them are skipped in C); scalars are not tokens:
# they end at the next `,` or `}` on their level.
# A JSON string, as a regex. "Unrolled" (runs of plain bytes, then one escape): about
# twice as fast in `re` as an alternation tried at every byte.
STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
SCALAR = rb"(?:" + STRING + rb"|[-+0-9.eE]+|true|false|null)"
_TOKEN = re.compile(STRING + rb"|[{}\[\],:]", re.S)
_STRING = re.compile(STRING)
MODEL_KEY = b'"model"'  # the member the gateway rewrites, as its raw key
_WS = b" \t\r\n"
_QUOTE, _COLON, _COMMA = ord('"'), ord(":"), ord(",")
_OPEN = (ord("{"), ord("["))
_CLOSE = (ord("}"), ord("]"))
_RBRACE = ord("}")


def iter_members(data: bytes, start: int = 0) -> Iterator[tuple[bytes, int, int, int]]:
    """Yield (raw key, key start, value start, value end) for each top-level member.

    `data[start:]` must begin (after whitespace) with `{`. Malformed input stops the
    iteration early; it never raises and never loops.
    """
    tokens = _TOKEN.finditer(data, start)
    first = next(tokens, None)
    if first is None or data[first.start()] != ord("{") or data[start : first.start()].strip(_WS):
        return
    depth = 1
    state = 0  # 0 key, 1 colon, 2 value, 3 after value
    key = b""
    key_start = value_start = 0
    for tok in tokens:
        s = tok.start()
        c = data[s]
        if depth > 1:
            if c in _OPEN:
                depth += 1
            elif c in _CLOSE:
                depth -= 1
                if depth == 1:
                    yield key, key_start, value_start, tok.end()
                    state = 3
            continue
        if state == 0:
            if c != _QUOTE:
                return
            key, key_start, state = tok.group(), s, 1
        elif state == 1:
            if c != _COLON:
                return
            value_start = tok.end()
            while value_start < len(data) and data[value_start] in _WS:
                value_start += 1
            state = 2
        elif state == 2:
            if c == _QUOTE:
                if s != value_start:
                    return
                yield key, key_start, value_start, tok.end()
                state = 3
            elif c in _OPEN:
                if s != value_start:
                    return
                depth += 1
            elif c in (_COMMA, _RBRACE):
                end = s
                while end > value_start and data[end - 1] in _WS:
                    end -= 1
                if end == value_start:
                    return
                yield key, key_start, value_start, end
                if c == _RBRACE:
                    return
                state = 0
            else:
                return
        else:
            if c == _COMMA:
                state = 0
            elif c == _RBRACE:
                return
            else:
                return


def key_name(raw: bytes) -> str:
    if b"\\" in raw:
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return ""
        return value if isinstance(value, str) else ""
    return raw[1:-1].decode("utf-8", "replace")


# An object's opening and members whose values are all scalars: a key right after such a
# prefix is certainly top-level. Matched in C, it spares the token loop for the usual
# `{"id":…,"object":…,"created":…,"model":…` of OpenAI answers and chunks.
_SCALAR_PREFIX = re.compile(
    rb"[ \t\r\n]*\{(?:[ \t\r\n]*"
    + STRING
    + rb"[ \t\r\n]*:[ \t\r\n]*"
    + SCALAR
    + rb"[ \t\r\n]*,)*[ \t\r\n]*"
)
_SCALAR_VALUE = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*(" + SCALAR + rb")[ \t\r\n]*[,}]")


def _quick_span(data: bytes, key: bytes, start: int) -> tuple[int, int] | None:
    """The value span of `key` when it occurs once, after scalar members only, with a
    scalar value; None when that cannot be told this cheaply."""
    pos = data.find(key, start)
    if pos < 0 or data.find(key, pos + len(key)) >= 0:
        return None
    if _SCALAR_PREFIX.fullmatch(data, start, pos) is None:
        return None
    value = _SCALAR_VALUE.match(data, pos + len(key))
    if value is None:
        return None
    return value.span(1)


_OBJECT_VALUE = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*\{")


def object_start(data: bytes, key: bytes, start: int = 0) -> int | None:
    """Where the object value of the top-level member `key` (raw, b'"response"') of the
    object at `start` begins; None when it has no such member or its value is not an
    object. The usual shape (scalar members before it) is found in C: the key's first
    bytes after nothing but scalar members are that member, whatever comes later (a
    response's `"object":"response"` inside it); anything else by the member scan."""
    pos = data.find(key, start)
    if pos < 0:
        return None
    if _SCALAR_PREFIX.fullmatch(data, start, pos):
        found = _OBJECT_VALUE.match(data, pos + len(key))
        return found.end() - 1 if found is not None else None
    for raw, _, vstart, _ in iter_members(data, start):
        if raw == key:
            return vstart if data[vstart : vstart + 1] == b"{" else None
    return None


VIEW_FROM = 64 * 1024  # bodies from this size are spliced through memoryviews


def _view(data: bytes) -> bytes | memoryview:
    return memoryview(data) if len(data) >= VIEW_FROM else data


def splice(data: bytes, start: int, end: int, value: bytes) -> bytes:
    """data with data[start:end] replaced by value, in one copy: `a[:i] + v + a[j:]`
    copies a large body three times over, holding two of them at once."""
    if len(data) < VIEW_FROM:
        return data[:start] + value + data[end:]
    view = memoryview(data)
    return b"".join((view[:start], value, view[end:]))


def replace_value(data: bytes, key: bytes, value: bytes, start: int = 0) -> bytes:
    """Replace the value of every top-level member whose raw key is `key` (b'"model"').

    Every one, not only the first: with duplicate keys a JSON parser keeps the last. The
    scan stops after the first unless the key's bytes occur again further on.
    """
    quick = _quick_span(data, key, start)
    if quick is not None:
        vstart, vend = quick
        return splice(data, vstart, vend, value)
    spans: list[tuple[int, int]] = []
    for raw, _, vstart, vend in iter_members(data, start):
        if raw == key:
            spans.append((vstart, vend))
            if data.find(key, vend) < 0:
                break
    if not spans:
        return data
    out: list[bytes] = []
    pos = 0
    for vstart, vend in spans:
        out += (data[pos:vstart], value)
        pos = vend
    out.append(data[pos:])
    return b"".join(out)


def splice_sole(data: bytes, key: bytes, value: bytes) -> bytes | None:
    """Fast path for a top-level string member whose raw key occurs exactly once in the
    body: splice its value; None when that cannot be known this cheaply (use a scan).

    The caller knows the parsed body has the member at the top level. In valid JSON the
    bytes `"model"` followed by `:` are a key; with no `\\u006` escape anywhere (the only
    way to spell one of m, o, d, e, l otherwise) every key named model is spelled raw, so
    a single occurrence is the top-level one. No parse or copy beyond the splice itself:
    the OpenAI SDK puts `model` after the whole `messages` array.
    """
    pos = data.find(key)
    if pos < 0 or data.find(key, pos + len(key)) >= 0 or b"\\u006" in data:
        return None
    i = pos + len(key)
    n = len(data)
    while i < n and data[i] in _WS:
        i += 1
    if i >= n or data[i] != _COLON:
        return None
    i += 1
    while i < n and data[i] in _WS:
        i += 1
    match = _STRING.match(data, i)
    if match is None:
        return None
    return splice(data, i, match.end(), value)


def rewrite_members(
    data: bytes, replace: dict[str, bytes], drop: frozenset[str], insert: bytes = b""
) -> bytes:
    """Drop members named in `drop`, replace values of those in `replace`, keep the rest.

    `insert` (a serialised `"k":v` member) goes first when given. Bytes between kept
    members stay as they were.
    """
    members = list(iter_members(data))
    if not members:
        if insert:
            brace = data.index(b"{")
            inner = data[brace + 1 :].strip(_WS)
            sep = b"" if inner.startswith(b"}") else b","
            return data[: brace + 1] + insert + sep + data[brace + 1 :]
        return data
    names = [key_name(m[0]) for m in members]
    src = _view(data)  # slices of a large body are not copied before the join
    kept = [i for i, n in enumerate(names) if n not in drop]
    out: list[bytes | memoryview] = [src[: members[0][1]]]
    if insert:
        out.append(insert + (b"," if kept else b""))
    for pos, i in enumerate(kept):
        _, kstart, vstart, vend = members[i]
        value = replace.get(names[i])
        if value is None:
            out.append(src[kstart:vend])
        else:
            out += (src[kstart:vstart], value)
        if pos + 1 < len(kept):
            # This member's own separator: its comma and the spacing after it.
            out.append(src[vend : members[i + 1][1]])
    out.append(src[members[-1][3] :])
    return b"".join(out)
