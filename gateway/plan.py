"""A parsed body -> the ordered list of upstream attempts to make."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from gateway.auth import check_allowed
from gateway.body import ParsedBody, ProviderPrefs
from gateway.config.keys import Key
from gateway.config.routes import Model, Price, Routes, Target
from gateway.errors import ApiNotSupported, ModelNotFound, NoProviderAvailable, ResponseNotFound
from gateway.families import CHAT, Family
from gateway.health import EntryKey, Health
from gateway.strategies import Strategies


@dataclass(slots=True)  # built per entry per request, read after: see body.ParsedBody
class Candidate:
    slug: str  # what the client asked for; the response's `model`
    model: Model
    target: Target
    upstream_model: str
    key: EntryKey  # health's key for the entry (see entry_key); read many times a request
    label: tuple[str, str]  # (provider, model) for metrics: a pattern, never a capture


def candidate(slug: str, model: Model, target: Target) -> Candidate:
    upstream = model.upstream_model(target, slug)
    # What a wildcard's `*` captured is the client's choice: its entry is kept in the
    # pattern's bounded LRU (Health.captured) and labelled by the pattern.
    captured = (
        model.slug if (target.model is None or target.templated) and model.is_wildcard else ""
    )
    provider = target.provider.name
    key = (provider, upstream, captured)
    return Candidate(slug, model, target, upstream, key, (provider, captured or upstream))


def _apply_prefs(order: list[int], model: Model, prefs: ProviderPrefs | None) -> list[int]:
    if prefs is None:
        return order
    names = [model.targets[i].provider.name for i in order]
    keep = [
        i
        for i, name in zip(order, names, strict=True)
        if (prefs.only is None or name in prefs.only) and name not in prefs.ignore
    ]
    if not prefs.order:
        # OpenRouter: without fallbacks only the first provider (in the model's order)
        # is tried.
        return keep if prefs.allow_fallbacks else keep[:1]
    rank = {name: r for r, name in enumerate(prefs.order)}
    first = sorted(
        (i for i in keep if model.targets[i].provider.name in rank),
        key=lambda i: rank[model.targets[i].provider.name],
    )
    if not prefs.allow_fallbacks:
        return first
    return first + [i for i in keep if i not in first]


def _pinned_first(order: list[int], cands: list[Candidate], entry: tuple[str, str]) -> list[int]:
    """The session's pinned entry first, the strategy's order after it (SPEC §14)."""
    for pos, i in enumerate(order):
        cand = cands[i]
        if (cand.target.provider.name, cand.upstream_model) == entry:
            return [i, *order[:pos], *order[pos + 1 :]] if pos else order
    return order  # not among what the request allows: the strategy places it


def _over(price: Price | None, ceiling: tuple[float | None, float | None]) -> bool:
    """Pricier than provider.max_price; an entry without a price passes."""
    if price is None:
        return False
    prompt, completion = ceiling
    return (prompt is not None and price.input > prompt) or (
        completion is not None and price.output > completion
    )


def _sorted(cands: list[Candidate], sort: str, health: Health) -> list[Candidate]:
    """Stable (ties keep the strategy's order); entries with nothing to sort by last."""

    def key(cand: Candidate) -> tuple[bool, float]:
        if sort == "price":
            price = cand.target.price
            return (price is None, 0.0 if price is None else price.input + price.output)
        state = health.state(cand.key)
        if sort == "latency":
            return (state.latency is None, state.latency or 0.0)
        return (state.throughput is None, -(state.throughput or 0.0))

    return sorted(cands, key=key)


def _limited(cands: list[Candidate]) -> list[Candidate]:
    """Each model's max_attempts, counted along the combined order."""
    counts: dict[int, int] = {}
    out = []
    for cand in cands:
        taken = counts.get(id(cand.model), 0)
        if taken < (cand.model.max_attempts or len(cand.model.targets)):
            counts[id(cand.model)] = taken + 1
            out.append(cand)
    return out


def build_plan(
    routes: Routes,
    parsed: ParsedBody,
    key: Key | None,
    health: Health,
    strategies: Strategies,
    family: Family = CHAT,
    pinned: tuple[str, str] | None = None,
    affinity: Mapping[str, tuple[str, str]] | None = None,
) -> list[Candidate]:
    """`family`: only providers serving it (SPEC §9); `pinned`: only the (provider,
    upstream model) entry that created the Responses id the request continues;
    `affinity`: by slug, the entry the request's session is pinned to (state/affinity.py),
    tried first among what the request's own choices allow."""
    models: list[tuple[str, Model]] = []
    for slug in parsed.slugs:
        model = routes.resolve(slug)
        if model is None:
            raise ModelNotFound(f"model {slug!r} is not in the catalog", {"model": slug})
        check_allowed(key, slug)
        models.append((slug, model))

    plan: list[Candidate] = []
    cooling: list[float] = []
    api = family.name
    serving = 0
    prefs = parsed.prefs
    sort = prefs.sort if prefs is not None else None
    if parsed.route_sort and sort is None:
        sort = "price"  # route: "sort" without provider.sort (SPEC §11)
    ceiling = prefs.max_price if prefs is not None else None
    for slug, model in models:
        cands = [candidate(slug, model, t) for t in model.targets]
        order = strategies.order(model, slug, [c.key for c in cands])
        order = _apply_prefs(order, model, prefs)
        # The client's own order (provider.order, a sort) outranks a pin.
        if affinity and slug in affinity and sort is None and not (prefs and prefs.order):
            order = _pinned_first(order, cands, affinity[slug])
        picked = 0
        limit = model.max_attempts or len(order)
        for i in order:
            cand = cands[i]
            if api not in cand.target.provider.apis:
                continue
            if pinned is not None and pinned != (cand.target.provider.name, cand.upstream_model):
                continue
            if ceiling is not None and _over(cand.target.price, ceiling):
                continue
            serving += 1
            if not health.available(cand.key):
                cooling.append(health.retry_at(cand.key))
                continue
            if sort is not None or picked < limit:
                plan.append(cand)
                picked += 1
        if sort is not None and not parsed.route_sort:
            # provider.sort orders each slug's own entries; the slugs keep their order.
            start = len(plan) - picked
            plan[start:] = _sorted(plan[start:], sort, health)[:limit]
    if sort is not None and parsed.route_sort:
        plan = _limited(_sorted(plan, sort, health))
    if not plan:
        if not serving and pinned is None:
            raise ApiNotSupported(
                f"no provider of {', '.join(map(repr, parsed.slugs))} serves the {api} API",
                {"api": api, "models": list(parsed.slugs)},
            )
        if not serving:
            raise ResponseNotFound(
                "the provider entry that created this response is no longer in the catalog",
                {"models": list(parsed.slugs)},
            )
        if cooling:
            wait = max(0.0, min(cooling) - health.clock())
            until = datetime.now(UTC) + timedelta(seconds=wait)
            raise NoProviderAvailable(
                "every provider of this model is cooling down after failures",
                {
                    "retry_after_seconds": round(wait, 3),
                    "retry_at": until.isoformat(timespec="seconds"),
                    "models": list(parsed.slugs),
                },
                # The gateway already stands for every candidate: SDK retries add nothing.
                headers={"retry-after": str(max(1, math.ceil(wait))), "x-should-retry": "false"},
            )
        raise NoProviderAvailable(
            "no provider is left after the request's provider preferences",
            {"models": list(parsed.slugs)},
            headers={"x-should-retry": "false"},
        )
    return plan
