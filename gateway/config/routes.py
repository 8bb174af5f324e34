"""routes.yaml -> frozen Routes: providers, the model catalog, wildcard slugs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from gateway.config.providers import (
    Provider,
    ProviderDraft,
    Secret,
    Timeouts,
    parse_provider,
)
from gateway.config.shaping import (
    COUNT_ESTIMATE,
    SHAPING_KEYS,
    Shaping,
    parse_rules,
)
from gateway.config.source import LineList, LineMap, Source, check_keys, line_of, number

STRATEGIES = ("fallback", "round_robin", "weighted", "least_busy", "latency")
DEFAULT_COMMIT_AFTER = 5.0
DEFAULT_ATTEMPTS_TIMEOUT = 300.0
DEFAULT_AFFINITY_SECONDS = 3600.0  # the longest provider prompt-cache TTL (Anthropic's 1 h)
_MODEL_KEYS = frozenset(
    {
        "id",
        "name",
        "strategy",
        "providers",
        "max_attempts",
        "cooldown",
        "commit_after",
        "hedge_after_ms",
        "attempts_timeout",
        "affinity",
        "affinity_seconds",
    }
)
# Names and slugs travel in response headers (x-gateway-provider): no control characters.
_NAME = re.compile(r"[^\x00-\x1f\x7f]+")
_TARGET_KEYS = frozenset({"provider", "model", "weight", "price", *SHAPING_KEYS})
_PRICE_KEYS = frozenset({"input", "output", "cached_input"})
_COOLDOWN_KEYS = frozenset({"failures", "seconds"})


@dataclass(frozen=True, slots=True)
class Price:
    """USD per 1M tokens (SPEC §11); cached prompt tokens at `cached_input` (default:
    `input`)."""

    input: float
    output: float
    cached_input: float | None = None

    def cost(self, prompt: int, cached: int, completion: int) -> float:
        cached = min(max(cached, 0), max(prompt, 0))
        cached_rate = self.input if self.cached_input is None else self.cached_input
        usd = (prompt - cached) * self.input + cached * cached_rate
        return (usd + completion * self.output) / 1_000_000


TEMPLATE = "{*}"  # in a wildcard entry's `model`: where the captured part goes


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str | None  # None: the slug itself, or what a wildcard's `*` matched
    weight: float = 1.0
    price: Price | None = None
    # `model` holds `{*}` (SPEC §14): what the wildcard captured goes inside it, so
    # `claude-*` with `model: "claude-{*}"` passes Claude Code's names unchanged.
    templated: bool = False
    # The entry's own shaping keys over its provider's (SPEC §14): what it removes from a
    # request (None: nothing, the plain path), whether the gateway answers count_tokens
    # with its estimate, and whether the upstream speaks the Responses WebSocket mode.
    shaping: Shaping | None = None
    count_estimate: bool = False
    websocket: bool = False


@dataclass(frozen=True, slots=True)
class Cooldown:
    failures: int = 3
    seconds: float = 30.0


DEFAULT_COOLDOWN = Cooldown()  # shared by every model that sets none (frozen)


@dataclass(frozen=True, slots=True)
class Model:
    slug: str
    id: str
    name: str
    targets: tuple[Target, ...]
    strategy: str = "fallback"
    max_attempts: int | None = None
    cooldown: Cooldown = DEFAULT_COOLDOWN
    commit_after: float = DEFAULT_COMMIT_AFTER
    hedge_after_ms: int | None = None
    # Seconds all attempts of one request may take before the answer starts.
    attempts_timeout: float = DEFAULT_ATTEMPTS_TIMEOUT
    # Prompt-cache affinity (SPEC §14): a session's requests stay on the entry that
    # served it last, for this long after its last request; 0 turns it off.
    affinity_seconds: float = DEFAULT_AFFINITY_SECONDS

    @property
    def is_wildcard(self) -> bool:
        return "*" in self.slug

    def upstream_model(self, target: Target, slug: str) -> str:
        model = target.model
        if model is not None and not target.templated:
            return model
        if self.is_wildcard:
            prefix, _, suffix = self.slug.partition("*")
            captured = slug[len(prefix) : len(slug) - len(suffix)]
            return captured if model is None else model.replace(TEMPLATE, captured)
        return slug


@dataclass(frozen=True, slots=True)
class WildcardIndex:
    """Wildcard patterns by literal prefix, then by suffix. Finding the longest pattern
    that matches a slug costs a dict lookup per distinct prefix length (and suffix
    length under it), never a scan of the patterns: 10,000 patterns cost what 10 do."""

    by_prefix: Mapping[str, tuple[tuple[int, ...], Mapping[str, tuple[int, Model]]]]
    prefix_lengths: tuple[int, ...]  # distinct, longest first

    @classmethod
    def build(cls, patterns: tuple[Model, ...]) -> WildcardIndex:
        groups: dict[str, dict[str, tuple[int, Model]]] = {}
        for order, model in enumerate(patterns):
            prefix, _, suffix = model.slug.partition("*")
            # The first pattern in order keeps a (prefix, suffix) pair, as a scan would.
            groups.setdefault(prefix, {}).setdefault(suffix, (order, model))
        by_prefix = {
            prefix: (tuple(sorted({len(s) for s in suffixes}, reverse=True)), suffixes)
            for prefix, suffixes in groups.items()
        }
        lengths = tuple(sorted({len(p) for p in by_prefix}, reverse=True))
        return cls(MappingProxyType(by_prefix), lengths)

    def match(self, slug: str) -> Model | None:
        """The longest pattern whose `*` matches at least one character; among equally
        long ones, the first in `wildcards` order."""
        best: Model | None = None
        best_len, best_order = -1, 0
        n = len(slug)
        for plen in self.prefix_lengths:
            if plen >= n:
                continue
            entry = self.by_prefix.get(slug[:plen])
            if entry is None:
                continue
            lengths, suffixes = entry
            for slen in lengths:
                size = plen + slen + 1
                if size < best_len:
                    break  # shorter suffixes only make shorter patterns
                if size > n:
                    continue
                found = suffixes.get(slug[n - slen :] if slen else "")
                if found is not None:
                    order, model = found
                    if size > best_len or order < best_order:
                        best, best_len, best_order = model, size, order
                    break
        return best


@dataclass(frozen=True, slots=True)
class Routes:
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]  # exact slugs, in file order
    wildcards: tuple[Model, ...]  # longest pattern first
    index: WildcardIndex
    ids: Mapping[str, Model]  # by `id:` (else slug)

    def resolve(self, slug: str) -> Model | None:
        """O(1) for an exact slug; a wildcard costs what WildcardIndex.match does."""
        model = self.models.get(slug)
        if model is not None:
            return model
        return self.index.match(slug) if self.wildcards else None

    def catalog(self) -> tuple[Model, ...]:
        return (*self.models.values(), *self.wildcards)

    def by_id(self, model_id: str) -> Model | None:
        return self.ids.get(model_id)


def _parse_targets(
    src: Source, slug: str, raw: LineMap, drafts: Mapping[str, ProviderDraft], used: set[str]
) -> tuple[Target, ...]:
    items = raw.get("providers")
    if not isinstance(items, LineList) or not items:
        line = line_of(raw, "providers", raw.line)
        src.problem(line, f"model {slug!r} needs providers: a non-empty list of {{provider: NAME}}")
        return ()
    targets: list[Target] = []
    where = f"model {slug!r} provider entry"
    for i, item in enumerate(items):
        item_line = items.lines[i]  # line_of(items, i), without its checks: i is in range
        if isinstance(item, str):
            item = LineMap(provider=item)
            item.line, item.lines = item_line, {"provider": item_line}
        if not isinstance(item, LineMap):
            src.problem(item_line, f"model {slug!r}: each provider entry must be a mapping")
            continue
        check_keys(src, item, _TARGET_KEYS, where)
        pname = item.get("provider")
        if not isinstance(pname, str):
            src.problem(item_line, f"model {slug!r}: provider entry needs provider: NAME")
            continue
        draft = drafts.get(pname)
        if draft is None:
            known = ", ".join(sorted(drafts)) or "none defined"
            src.problem(line_of(item, "provider"), f"unknown provider {pname!r} (known: {known})")
            continue
        used.add(pname)
        upstream = item.get("model")
        if upstream is not None and not isinstance(upstream, (str, int, float)):
            src.problem(line_of(item, "model"), "model must be a string")
            upstream = None
        templated = isinstance(upstream, str) and TEMPLATE in upstream
        if templated and "*" not in slug:
            src.problem(
                line_of(item, "model"),
                f"model {slug!r}: {TEMPLATE} in model needs a wildcard slug to capture from",
            )
            templated = False
        weight = 1.0
        if "weight" in item:
            w = number(src, item, "weight", 0)
            weight = float(w) if w is not None else 1.0
        price = _price(src, item, slug) if "price" in item else None
        rules = parse_rules(src, item, where).over(draft.provider.rules)
        auth = draft.provider.auth
        if rules.websocket and "websocket" in item and auth is not None and auth.aws is not None:
            src.problem(line_of(item, "websocket"), f"{where}: websocket cannot be used with "
                        "aws auth (Bedrock has no Responses WebSocket mode)")  # fmt: skip
        targets.append(
            Target(
                provider=draft.provider,
                model=None if upstream is None else str(upstream),
                weight=weight,
                price=price,
                templated=templated,
                shaping=rules.shaping(),
                count_estimate=rules.count_tokens == COUNT_ESTIMATE,
                websocket=bool(rules.websocket),
            )
        )
    return tuple(targets)


def _price(src: Source, item: LineMap, slug: str) -> Price | None:
    raw = item["price"]
    where = f"model {slug!r} price"
    if not isinstance(raw, LineMap):
        src.problem(line_of(item, "price"), f"{where} must be a mapping like "
                    "{input: 0.15, output: 0.60} (USD per 1M tokens)")  # fmt: skip
        return None
    check_keys(src, raw, _PRICE_KEYS, where)
    values = {k: number(src, raw, k, 0) for k in _PRICE_KEYS if k in raw}
    if "input" not in raw or "output" not in raw:
        src.problem(line_of(item, "price"), f"{where} needs input and output")
        return None
    if any(v is None for v in values.values()):
        return None
    cached = values.get("cached_input")
    return Price(float(values["input"]), float(values["output"]),
                 None if cached is None else float(cached))  # fmt: skip


def _parse_model(
    src: Source,
    slug: str,
    raw: Any,
    line: int,
    drafts: Mapping[str, ProviderDraft],
    used: set[str],
) -> Model | None:
    if not isinstance(raw, LineMap):
        src.problem(line, f"model {slug!r} must be a mapping with providers: [...]")
        return None
    if not raw.keys() <= _MODEL_KEYS:  # the message is made only for a mapping that needs it
        check_keys(src, raw, _MODEL_KEYS, f"model {slug!r}")
    if slug.count("*") > 1:
        src.problem(line, f"wildcard slug {slug!r} may hold only one '*'")
    targets = _parse_targets(src, slug, raw, drafts, used)
    strategy = raw.get("strategy", "fallback")
    if strategy not in STRATEGIES:
        src.problem(
            line_of(raw, "strategy"),
            f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})",
        )
        strategy = "fallback"
    text: dict[str, str] = {}
    for key in ("id", "name"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                src.problem(line_of(raw, key), f"{key} must be a non-empty string")
            else:
                text[key] = raw[key]
    cooldown = DEFAULT_COOLDOWN
    if "cooldown" in raw:
        c = raw["cooldown"]
        if not isinstance(c, LineMap):
            src.problem(
                line_of(raw, "cooldown"),
                "cooldown must be a mapping like {failures: 3, seconds: 30}",
            )
        else:
            check_keys(src, c, _COOLDOWN_KEYS, f"model {slug!r} cooldown")
            failures = number(src, c, "failures", 1, integer=True) if "failures" in c else None
            seconds = number(src, c, "seconds", 0) if "seconds" in c else None
            cooldown = Cooldown(
                failures=failures if failures is not None else 3,
                seconds=float(seconds) if seconds is not None else 30.0,
            )
    opts: dict[str, Any] = {}
    if "max_attempts" in raw:
        opts["max_attempts"] = number(src, raw, "max_attempts", 1, integer=True)
    if "commit_after" in raw:
        value = number(src, raw, "commit_after", 0)
        if value is not None:
            opts["commit_after"] = float(value)
    if "attempts_timeout" in raw:
        value = number(src, raw, "attempts_timeout", 0.001)
        if value is not None:
            opts["attempts_timeout"] = float(value)
    if "hedge_after_ms" in raw:
        opts["hedge_after_ms"] = number(src, raw, "hedge_after_ms", 1, integer=True)
    if "affinity_seconds" in raw:
        value = number(src, raw, "affinity_seconds", 1)
        if value is not None:
            opts["affinity_seconds"] = float(value)
    if "affinity" in raw:
        if raw["affinity"] is not False and raw["affinity"] is not True:
            src.problem(line_of(raw, "affinity"), "affinity must be true or false")
        elif raw["affinity"] is False:
            opts["affinity_seconds"] = 0.0
    if not targets:
        return None
    return Model(
        slug=slug,
        id=text.get("id", slug),
        name=text.get("name", slug),
        targets=targets,
        strategy=strategy,
        cooldown=cooldown,
        **{k: v for k, v in opts.items() if v is not None},
    )


def parse_routes(data: Any, src: Source) -> Routes:
    if data is None:
        data = LineMap()
        data.line, data.lines = 1, {}
    if not isinstance(data, LineMap):
        src.problem(
            getattr(data, "line", 1), "routes file must be a mapping with providers: and models:"
        )
        empty: MappingProxyType[str, Any] = MappingProxyType({})
        return Routes(empty, empty, (), WildcardIndex(empty, ()), empty)
    check_keys(src, data, frozenset({"providers", "models"}), "the routes file")
    drafts: dict[str, ProviderDraft] = {}
    raw_providers = data.get("providers")
    if raw_providers is not None and not isinstance(raw_providers, LineMap):
        src.problem(line_of(data, "providers"), "providers must be a mapping of names to providers")
    elif raw_providers:
        for name, raw in raw_providers.items():
            if not _NAME.fullmatch(name):
                src.problem(
                    line_of(raw_providers, name), f"provider name {name!r} has control characters"
                )
                continue
            draft = parse_provider(src, name, raw, line_of(raw_providers, name))
            if draft is not None:
                drafts[name] = draft
    models: dict[str, Model] = {}
    wildcards: list[Model] = []
    used: set[str] = set()
    raw_models = data.get("models")
    if raw_models is not None and not isinstance(raw_models, LineMap):
        src.problem(line_of(data, "models"), "models must be a mapping of slugs to models")
    elif raw_models:
        for slug, raw in raw_models.items():
            if not _NAME.fullmatch(slug):
                src.problem(
                    line_of(raw_models, slug), f"model slug {slug!r} has control characters"
                )
                continue
            model = _parse_model(src, slug, raw, raw_models.lines[slug], drafts, used)
            if model is None:
                continue
            (wildcards.append(model) if model.is_wildcard else models.__setitem__(slug, model))
    for name in sorted(used):
        for var, line in drafts[name].missing:
            src.problem(line, f"environment variable {var} is not set (provider {name!r} uses it)")
    ids: dict[str, str] = {}
    for model in (*models.values(), *wildcards):
        if model.id in ids and ids[model.id] != model.slug:
            src.problem(line_of(raw_models, model.slug), f"model id {model.id!r} is used twice")
        ids[model.id] = model.slug
    wildcards.sort(key=lambda m: len(m.slug), reverse=True)
    patterns = tuple(wildcards)
    by_id: dict[str, Model] = {}
    for model in (*models.values(), *patterns):
        by_id.setdefault(model.id, model)
    return Routes(
        providers=MappingProxyType({n: d.provider for n, d in drafts.items()}),
        models=MappingProxyType(models),
        wildcards=patterns,
        index=WildcardIndex.build(patterns),
        ids=MappingProxyType(by_id),
    )


__all__ = ["Provider", "Secret", "Timeouts"]  # re-exported: the catalog speaks of them
