"""Request shaping (SPEC §14): beta tokens out of `anthropic-beta`, top-level members out
of a JSON body. Both leave every other byte as the client sent it: the header lines they
do not change, and the body's other members with the separators between them (the
splice of jsonscan, as the `model` rewrite)."""

from __future__ import annotations

import orjson

from gateway.types import Headers
from gateway.wire.jsonscan import iter_members, key_name

BETA = b"anthropic-beta"
DROPPED = b"x-gateway-dropped"  # what the serving attempt removed, for the client
# Escapes that spell a character which needs none (a key can hide a name behind them).
_ESCAPES = (b"\\u", b"\\/")


def drop_betas(
    headers: Headers, drop: frozenset[str], allow: frozenset[str] | None
) -> tuple[Headers, list[str]]:
    """`headers` without the beta tokens `drop` names (or, with `allow`, without those it
    does not name), and the tokens removed, each once, in the order met. Tokens are
    comma-separated with any spacing; a line whose tokens all go is not sent, a line that
    loses none is sent as it came. Nothing removed: `headers` itself."""
    removed: list[str] = []
    changed: dict[int, bytes | None] = {}  # line index -> its new value (None: not sent)
    for index, (name, value) in enumerate(headers):
        if name != BETA:  # ASGI header names are lowercase
            continue
        kept: list[bytes] = []
        lost = False
        for raw in value.split(b","):
            token = raw.strip(b" \t")
            if not token:
                continue
            text = token.decode("latin-1")
            if text in drop if allow is None else text not in allow:
                lost = True
                if text not in removed:
                    removed.append(text)
            else:
                kept.append(token)
        if lost:
            changed[index] = b",".join(kept) if kept else None
    if not changed:
        return headers, removed
    out: Headers = []
    for index, header in enumerate(headers):
        if index not in changed:
            out.append(header)
            continue
        new = changed[index]
        if new is not None:
            out.append((BETA, new))
    return out, removed


def drop_members(data: bytes, names: tuple[str, ...]) -> tuple[bytes, list[str]]:
    """The JSON object `data` without its top-level members named in `names` (every
    occurrence of a repeated key), and the names removed, in `names`' order. The kept
    members and the separators after them stay byte for byte; a removed member goes with
    its own separator (the comma after it, or before it when it is the last). `data`
    itself when none is there."""
    if not _may_hold(data, names):
        return data, []
    wanted = frozenset(names)
    members = list(iter_members(data))
    keys = [key_name(m[0]) for m in members]
    found = wanted.intersection(keys)
    if not found:
        return data, []
    kept = [i for i, key in enumerate(keys) if key not in found]
    view = memoryview(data)
    out: list[bytes | memoryview] = [view[: members[0][1]]]
    for pos, i in enumerate(kept):
        _, kstart, _, vend = members[i]
        out.append(view[kstart:vend])
        if pos + 1 < len(kept):
            # This member's own separator: its comma and the spacing around it.
            out.append(view[vend : members[i + 1][1]])
    out.append(view[members[-1][3] :])
    return b"".join(out), [n for n in names if n in found]


def _may_hold(data: bytes, names: tuple[str, ...]) -> bool:
    """False only when no top-level key of `data` can be one of `names`: none is there as
    orjson spells it, and no escape could spell it otherwise (a name that needs escapes
    of its own, a quote or a control character, is always looked for)."""
    if any(escape in data for escape in _ESCAPES):
        return True
    for name in names:
        raw = orjson.dumps(name)
        if raw in data or b"\\" in raw:
            return True
    return False


def dropped_header(betas: list[str], fields: list[str]) -> bytes | None:
    """The x-gateway-dropped value: the beta tokens, then the fields; None for none."""
    if not betas and not fields:
        return None
    return ",".join([*betas, *fields]).encode("latin-1")
