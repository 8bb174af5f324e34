"""Per-entry request shaping and the other keys a provider and a model's entry both take
(SPEC §14): `drop_betas`/`allow_betas`/`drop_fields` (what an attempt removes before a
request leaves, wire/shaping.py's splices), `count_tokens` and `websocket`, parsed with
their lines, the entry's own value over its provider's."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from gateway.config.source import LineMap, Source, line_of

# Keys a provider and a model's provider entry both take (SPEC §14); an entry's own value
# wins over its provider's, key by key (the beta rule as one: drop_betas or allow_betas).
SHAPING_KEYS = ("drop_betas", "allow_betas", "drop_fields", "count_tokens", "websocket")
COUNT_RELAY, COUNT_ESTIMATE = "relay", "estimate"  # count_tokens: relayed, or the estimate
# Members the gateway itself reads or writes: drop_fields cannot name them.
_KEPT_FIELDS = frozenset({"model", "stream"})


@dataclass(frozen=True, slots=True)
class Shaping:
    """What an entry removes from a request before it leaves (SPEC §14); an entry with
    nothing to remove has none (Target.shaping is None), so the plain path pays nothing."""

    drop_betas: frozenset[str] = frozenset()
    allow_betas: frozenset[str] | None = None  # set: only these beta tokens pass
    drop_fields: tuple[str, ...] = ()  # top-level body members, in the order written


@dataclass(frozen=True, slots=True)
class Rules:
    """The SHAPING_KEYS as written in one place, a provider or a model's entry: None
    where the key is absent (the provider's value, else the default, applies)."""

    drop_betas: tuple[str, ...] | None = None
    allow_betas: tuple[str, ...] | None = None
    drop_fields: tuple[str, ...] | None = None
    count_tokens: str | None = None
    websocket: bool | None = None

    def over(self, base: Rules) -> Rules:
        """These rules where given, `base`'s elsewhere; the beta rule goes whole."""
        if self is NO_RULES:
            return base  # what the fields below would copy, field by field
        betas = self.drop_betas is not None or self.allow_betas is not None
        source = self if betas else base
        return Rules(
            source.drop_betas,
            source.allow_betas,
            base.drop_fields if self.drop_fields is None else self.drop_fields,
            base.count_tokens if self.count_tokens is None else self.count_tokens,
            base.websocket if self.websocket is None else self.websocket,
        )

    def shaping(self) -> Shaping | None:
        drop = frozenset(self.drop_betas or ())
        allow = None if self.allow_betas is None else frozenset(self.allow_betas)
        fields = self.drop_fields or ()
        if not drop and allow is None and not fields:
            return None
        return Shaping(drop, allow, fields)


NO_RULES = Rules()  # a provider or an entry with no shaping key (frozen, shared)


_BETA = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}")  # an HTTP token: no comma, no space


def parse_rules(src: Source, raw: LineMap, where: str) -> Rules:
    """The SHAPING_KEYS of a provider or an entry; each problem names its line."""
    if raw.keys().isdisjoint(SHAPING_KEYS):
        return NO_RULES
    found: dict[str, Any] = {}
    for key in ("drop_betas", "allow_betas"):
        if key in raw:
            found[key] = _names(
                src, raw, key, _BETA, "beta names like [context-management-2025-06-27]"
            )
    if "drop_betas" in raw and "allow_betas" in raw:
        src.problem(
            line_of(raw, "allow_betas"),
            f"{where}: drop_betas and allow_betas cannot both be set (allow_betas keeps only "
            "the betas it lists; drop_betas removes the ones it lists)",
        )
    if "drop_fields" in raw:
        names = _names(
            src, raw, "drop_fields", None, "top-level body members like [context_management]"
        )
        kept = [n for n in names or () if n in _KEPT_FIELDS]
        if kept:
            src.problem(line_of(raw, "drop_fields"), f"{where}: drop_fields cannot remove "
                        f"{', '.join(map(repr, kept))} (the gateway reads it)")  # fmt: skip
        found["drop_fields"] = names
    if "count_tokens" in raw:
        mode = raw["count_tokens"]
        if mode not in (COUNT_RELAY, COUNT_ESTIMATE):
            src.problem(line_of(raw, "count_tokens"), f"{where}: count_tokens must be "
                        f"{COUNT_RELAY} or {COUNT_ESTIMATE}, got {mode!r}")  # fmt: skip
        else:
            found["count_tokens"] = mode
    if "websocket" in raw:
        if not isinstance(raw["websocket"], bool):
            src.problem(line_of(raw, "websocket"), f"{where}: websocket must be true or false, "
                        f"got {raw['websocket']!r}")  # fmt: skip
        else:
            found["websocket"] = raw["websocket"]
    return Rules(**found) if found else NO_RULES


def _names(
    src: Source, raw: LineMap, key: str, pattern: re.Pattern[str] | None, like: str
) -> tuple[str, ...] | None:
    """A list of distinct names, in its order; None (and a problem) when it is not one."""
    value = raw[key]
    line = line_of(raw, key)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        src.problem(line, f"{key} must be a list of {like}")
        return None
    bad = [v for v in value if pattern is not None and not pattern.fullmatch(v)]
    if bad or any(any(c in v for c in "\r\n\0") for v in value):
        src.problem(line, f"{key}: {(bad or value)[0]!r} is not one of {like}")
        return None
    return tuple(dict.fromkeys(value))
