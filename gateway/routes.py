"""routes.yaml -> frozen Routes: providers, the model catalog, wildcard slugs."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gateway.yamlsrc import LineList, LineMap, Source, check_keys, line_of

STRATEGIES = ("fallback", "round_robin", "weighted", "least_busy", "latency")
BUILTIN_PREFIX = "builtin:"
BUILTINS = ("echo",)
DEFAULT_COMMIT_AFTER = 5.0
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_PROVIDER_KEYS = frozenset({"base_url", "api_key", "headers", "query", "timeout", "stream_usage"})
_TIMEOUT_KEYS = frozenset({"connect", "read", "first_byte", "total"})
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
    }
)
_TARGET_KEYS = frozenset({"provider", "model", "weight"})
_COOLDOWN_KEYS = frozenset({"failures", "seconds"})


class Secret:
    """A value that must never be printed: its repr and str are masked."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0
    read: float = 300.0
    first_byte: float | None = None
    total: float | None = None


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    base_url: str
    api_key: Secret | None = field(default=None, repr=False)
    # Header values often carry credentials (Azure's api-key), so they stay out of repr too.
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    query: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeout: Timeouts = Timeouts()
    stream_usage: bool = True

    @property
    def builtin(self) -> str | None:
        if self.base_url.startswith(BUILTIN_PREFIX):
            return self.base_url[len(BUILTIN_PREFIX) :]
        return None


@dataclass(frozen=True, slots=True)
class Target:
    provider: Provider
    model: str | None  # None: the slug itself, or what a wildcard's `*` matched
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class Cooldown:
    failures: int = 3
    seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class Model:
    slug: str
    id: str
    name: str
    targets: tuple[Target, ...]
    strategy: str = "fallback"
    max_attempts: int | None = None
    cooldown: Cooldown = Cooldown()
    commit_after: float = DEFAULT_COMMIT_AFTER
    hedge_after_ms: int | None = None

    @property
    def is_wildcard(self) -> bool:
        return "*" in self.slug

    def upstream_model(self, target: Target, slug: str) -> str:
        if target.model is not None:
            return target.model
        if self.is_wildcard:
            prefix, _, suffix = self.slug.partition("*")
            return slug[len(prefix) : len(slug) - len(suffix)]
        return slug


@dataclass(frozen=True, slots=True)
class Routes:
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]  # exact slugs, in file order
    wildcards: tuple[Model, ...]  # longest pattern first

    def resolve(self, slug: str) -> Model | None:
        model = self.models.get(slug)
        if model is not None:
            return model
        for pattern in self.wildcards:
            prefix, _, suffix = pattern.slug.partition("*")
            if (
                len(slug) > len(prefix) + len(suffix)
                and slug.startswith(prefix)
                and slug.endswith(suffix)
            ):
                return pattern
        return None

    def catalog(self) -> tuple[Model, ...]:
        return (*self.models.values(), *self.wildcards)

    def by_id(self, model_id: str) -> Model | None:
        for model in self.catalog():
            if model.id == model_id:
                return model
        return None


def expand(value: str, missing: list[str]) -> str:
    """Replace ${VAR} and ${VAR:-default}; names of unset variables go to `missing`."""

    def sub(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is not None:
            return found
        if default is not None:
            return default
        missing.append(name)
        return ""

    return _VAR.sub(sub, value) if "${" in value else value


def _number(src: Source, parent: LineMap, key: str, minimum: float, integer: bool = False) -> Any:
    value = parent[key]
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        src.problem(line_of(parent, key), f"{key} must be {kind}, got {value!r}")
        return None
    if value < minimum:
        src.problem(line_of(parent, key), f"{key} must be at least {minimum:g}, got {value!r}")
        return None
    return value


def _str_map(
    src: Source, parent: LineMap, key: str, missing: list[tuple[str, int]]
) -> dict[str, str]:
    value = parent[key]
    if value is None:
        return {}
    if not isinstance(value, LineMap):
        src.problem(line_of(parent, key), f"{key} must be a mapping of names to strings")
        return {}
    out: dict[str, str] = {}
    for name, item in value.items():
        if isinstance(item, bool) or not isinstance(item, str | int | float):
            src.problem(line_of(value, name), f"{key}.{name} must be a string")
            continue
        names: list[str] = []
        out[name] = expand(str(item), names)
        missing.extend((n, line_of(value, name)) for n in names)
    return out


@dataclass(slots=True)
class _ProviderDraft:
    provider: Provider
    missing: list[tuple[str, int]]


def _parse_provider(src: Source, name: str, raw: Any, line: int) -> _ProviderDraft | None:
    if not isinstance(raw, LineMap):
        src.problem(line, f"provider {name!r} must be a mapping with at least base_url")
        return None
    check_keys(src, raw, _PROVIDER_KEYS, f"provider {name!r}")
    missing: list[tuple[str, int]] = []
    base_url = raw.get("base_url")
    if not isinstance(base_url, str) or not base_url:
        src.problem(raw.line, f"provider {name!r} needs base_url (a string)")
        return None
    names: list[str] = []
    base_url = expand(base_url, names).rstrip("/")
    missing.extend((n, line_of(raw, "base_url")) for n in names)
    if base_url.startswith(BUILTIN_PREFIX):
        if base_url[len(BUILTIN_PREFIX) :] not in BUILTINS:
            src.problem(
                line_of(raw, "base_url"),
                f"unknown built-in upstream {base_url!r} (known: "
                + ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
                + ")",
            )
    elif not names and not base_url.startswith(("http://", "https://")):
        src.problem(
            line_of(raw, "base_url"),
            f"base_url must start with http:// or https://, got {base_url!r}",
        )
    api_key = None
    if raw.get("api_key") is not None:
        if not isinstance(raw["api_key"], str):
            src.problem(line_of(raw, "api_key"), "api_key must be a string")
        else:
            names = []
            api_key = Secret(expand(raw["api_key"], names))
            missing.extend((n, line_of(raw, "api_key")) for n in names)
    headers = _str_map(src, raw, "headers", missing) if "headers" in raw else {}
    query = _str_map(src, raw, "query", missing) if "query" in raw else {}
    timeout = Timeouts()
    if "timeout" in raw:
        t = raw["timeout"]
        if not isinstance(t, LineMap):
            src.problem(
                line_of(raw, "timeout"), "timeout must be a mapping like {connect: 5, read: 300}"
            )
        else:
            check_keys(src, t, _TIMEOUT_KEYS, f"provider {name!r} timeout")
            values = {k: _number(src, t, k, 0.001) for k in _TIMEOUT_KEYS if k in t}
            timeout = Timeouts(**{k: float(v) for k, v in values.items() if v is not None})
    stream_usage = raw.get("stream_usage", True)
    if not isinstance(stream_usage, bool):
        src.problem(line_of(raw, "stream_usage"), "stream_usage must be true or false")
        stream_usage = True
    provider = Provider(
        name=name,
        base_url=base_url,
        api_key=api_key,
        headers=MappingProxyType(headers),
        query=MappingProxyType(query),
        timeout=timeout,
        stream_usage=stream_usage,
    )
    return _ProviderDraft(provider, missing)


def _parse_targets(
    src: Source, slug: str, raw: LineMap, drafts: Mapping[str, _ProviderDraft], used: set[str]
) -> tuple[Target, ...]:
    items = raw.get("providers")
    line = line_of(raw, "providers", raw.line)
    if not isinstance(items, LineList) or not items:
        src.problem(line, f"model {slug!r} needs providers: a non-empty list of {{provider: NAME}}")
        return ()
    targets: list[Target] = []
    for i, item in enumerate(items):
        item_line = line_of(items, i)
        if isinstance(item, str):
            item = LineMap(provider=item)
            item.line, item.lines = item_line, {"provider": item_line}
        if not isinstance(item, LineMap):
            src.problem(item_line, f"model {slug!r}: each provider entry must be a mapping")
            continue
        check_keys(src, item, _TARGET_KEYS, f"model {slug!r} provider entry")
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
        if upstream is not None and not isinstance(upstream, str | int | float):
            src.problem(line_of(item, "model"), "model must be a string")
            upstream = None
        weight = 1.0
        if "weight" in item:
            w = _number(src, item, "weight", 0)
            weight = float(w) if w is not None else 1.0
        targets.append(
            Target(
                provider=draft.provider,
                model=None if upstream is None else str(upstream),
                weight=weight,
            )
        )
    return tuple(targets)


def _parse_model(
    src: Source,
    slug: str,
    raw: Any,
    line: int,
    drafts: Mapping[str, _ProviderDraft],
    used: set[str],
) -> Model | None:
    if not isinstance(raw, LineMap):
        src.problem(line, f"model {slug!r} must be a mapping with providers: [...]")
        return None
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
    cooldown = Cooldown()
    if "cooldown" in raw:
        c = raw["cooldown"]
        if not isinstance(c, LineMap):
            src.problem(
                line_of(raw, "cooldown"),
                "cooldown must be a mapping like {failures: 3, seconds: 30}",
            )
        else:
            check_keys(src, c, _COOLDOWN_KEYS, f"model {slug!r} cooldown")
            failures = _number(src, c, "failures", 1, integer=True) if "failures" in c else None
            seconds = _number(src, c, "seconds", 0) if "seconds" in c else None
            cooldown = Cooldown(
                failures=failures if failures is not None else 3,
                seconds=float(seconds) if seconds is not None else 30.0,
            )
    opts: dict[str, Any] = {}
    if "max_attempts" in raw:
        opts["max_attempts"] = _number(src, raw, "max_attempts", 1, integer=True)
    if "commit_after" in raw:
        value = _number(src, raw, "commit_after", 0)
        if value is not None:
            opts["commit_after"] = float(value)
    if "hedge_after_ms" in raw:
        opts["hedge_after_ms"] = _number(src, raw, "hedge_after_ms", 1, integer=True)
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
        return Routes(MappingProxyType({}), MappingProxyType({}), ())
    check_keys(src, data, frozenset({"providers", "models"}), "the routes file")
    drafts: dict[str, _ProviderDraft] = {}
    raw_providers = data.get("providers")
    if raw_providers is not None and not isinstance(raw_providers, LineMap):
        src.problem(line_of(data, "providers"), "providers must be a mapping of names to providers")
    elif raw_providers:
        for name, raw in raw_providers.items():
            draft = _parse_provider(src, name, raw, line_of(raw_providers, name))
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
            model = _parse_model(src, slug, raw, line_of(raw_models, slug), drafts, used)
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
    return Routes(
        providers=MappingProxyType({n: d.provider for n, d in drafts.items()}),
        models=MappingProxyType(models),
        wildcards=tuple(wildcards),
    )
