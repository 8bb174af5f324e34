"""What a request cost (SPEC §11): usage times the serving entry's price, cached prompt
tokens at cached_input; in the access log, gateway_cost_usd_total and, on non-stream
answers, x-gateway-cost-usd. A priced entry's streams are asked for usage."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import yaml

from gateway.config.routes import Price
from gateway.relay import usd
from gateway.wire.usage import usage_parts
from tests.config.test_config import assert_problems, routes_of
from tests.conftest import GatewayFactory
from tests.scripted_upstream import DONE, Json, Sse, Upstream, chat_completion, chunk

MESSAGES = [{"role": "user", "content": "hi"}]
PRICE = {"input": 2.0, "output": 8.0, "cached_input": 0.5}


def test_price_counts_cached_prompt_tokens_apart() -> None:
    price = Price(2.0, 8.0, 0.5)
    # 1,000 prompt tokens of which 400 cached, 100 completion tokens.
    assert price.cost(1000, 400, 100) == pytest.approx((600 * 2 + 400 * 0.5 + 100 * 8) / 1e6)
    assert Price(2.0, 8.0).cost(1000, 400, 0) == pytest.approx(1000 * 2 / 1e6)
    assert price.cost(10, 50, 0) == pytest.approx(10 * 0.5 / 1e6)  # cached never above prompt


@pytest.mark.parametrize(
    ("usage", "parts"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 3,
          "prompt_tokens_details": {"cached_tokens": 4}}, (10, 4, 3)),
        ({"input_tokens": 10, "output_tokens": 3, "total_tokens": 13,
          "input_tokens_details": {"cached_tokens": 6}}, (10, 6, 3)),
        ({"input_tokens": 5, "output_tokens": 3, "cache_read_input_tokens": 20,
          "cache_creation_input_tokens": 2}, (27, 20, 3)),
        ({"prompt_tokens": "x", "completion_tokens": -1}, (0, 0, 0)),
    ],
)  # fmt: skip
def test_usage_parts_of_every_family(usage: dict[str, Any], parts: tuple[int, int, int]) -> None:
    assert usage_parts(usage) == parts


def test_usd_is_plain_decimal() -> None:
    assert usd(0.0000123) == "0.0000123"
    assert usd(1.5) == "1.5"
    assert usd(0.0) == "0"


def test_price_problems_name_their_lines() -> None:
    text = """\
providers:
  p: {base_url: "http://x/v1"}
models:
  a: {providers: [{provider: p, price: {input: 1}}]}
  b: {providers: [{provider: p, price: {input: 1, output: -2}}]}
  c: {providers: [{provider: p, price: {input: 1, output: 2, cache: 1}}]}
  d: {providers: [{provider: p, price: 3}]}
"""
    _, problems = routes_of(text)
    assert_problems(
        problems,
        [(4, "needs input and output"), (5, "output must be"), (6, "unknown key 'cache'"),
         (7, "must be a mapping")],
    )  # fmt: skip


def routes(upstream: Upstream) -> str:
    entry = {"provider": "p", "model": "upstream-model", "price": PRICE}
    return yaml.safe_dump({"providers": {"p": {"base_url": upstream.url}},
                           "models": {"m": {"providers": [entry]}}})  # fmt: skip


KEYS = yaml.safe_dump({"keys": [{"name": "team-a", "key": "sk-team-a"}]})
AUTH = {"authorization": "Bearer sk-team-a"}


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_cost_in_header_log_and_metric(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway(routes(upstream), KEYS)
    body = chat_completion()
    body["usage"] = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100,
                     "prompt_tokens_details": {"cached_tokens": 400}}  # fmt: skip
    upstream.script(Json(body))
    caplog.set_level(logging.INFO, logger="gateway.access")
    r = await client.post(f"{gw.base_url}/chat/completions",
                          json={"model": "m", "messages": MESSAGES}, headers=AUTH)  # fmt: skip
    assert r.status_code == 200
    want = (600 * 2 + 400 * 0.5 + 100 * 8) / 1e6
    assert float(r.headers["x-gateway-cost-usd"]) == pytest.approx(want)

    # A stream: usage asked for on the client's behalf (and its chunk hidden), no header.
    upstream.script(Sse([chunk("Hi"), chunk(None, choices=[], usage={
        "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}), DONE]))  # fmt: skip
    r = await client.post(f"{gw.base_url}/chat/completions", headers=AUTH,
                          json={"model": "m", "messages": MESSAGES, "stream": True})  # fmt: skip
    assert r.status_code == 200
    assert upstream.requests[-1].json()["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in r.content and "x-gateway-cost-usd" not in r.headers
    stream_cost = (10 * 2 + 5 * 8) / 1e6

    text = (await client.get(f"{gw.url}/metrics")).text
    assert 'gateway_cost_usd_total{key="team-a",slug="m",provider="p"}' in text
    assert metric(text, "gateway_cost_usd_total") == pytest.approx(want + stream_cost)
    lines = [
        json.loads(rec.getMessage()) for rec in caplog.records if "cost_usd" in rec.getMessage()
    ]
    assert [line["cost_usd"] for line in lines] == [pytest.approx(want), pytest.approx(stream_cost)]


async def test_unpriced_entries_cost_nothing_and_change_nothing(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    text = yaml.safe_dump({"providers": {"p": {"base_url": upstream.url}},
                           "models": {"m": {"providers": [{"provider": "p"}]}}})  # fmt: skip
    gw = await gateway(text)
    r = await client.post(f"{gw.base_url}/chat/completions",
                          json={"model": "m", "messages": MESSAGES, "stream": True})  # fmt: skip
    assert "x-gateway-cost-usd" not in r.headers
    assert "stream_options" not in upstream.requests[-1].json()
    assert "gateway_cost_usd_total{" not in (await client.get(f"{gw.url}/metrics")).text


# --------------------------------------------------------------------------- budgets


def budget_keys(**entries: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {"keys": [{"name": n, "key": f"sk-{n}", **limits} for n, limits in entries.items()]}
    )


def calendar(gw: Any, start: datetime) -> list[datetime]:
    now = [start]
    gw.runtime.limiter.wall = lambda: now[0]
    return now


async def priced_chat(client: httpx.AsyncClient, gw: Any, name: str) -> httpx.Response:
    return await client.post(f"{gw.base_url}/chat/completions",
                             json={"model": "m", "messages": MESSAGES},
                             headers={"authorization": f"Bearer sk-{name}"})  # fmt: skip


async def test_budget_per_day_refuses_then_resets_at_utc_midnight(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    body = chat_completion()
    body["usage"] = {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}
    upstream.default = Json(body)  # $0.010 a request at PRICE
    gw = await gateway(routes(upstream), budget_keys(a={"budget": {"usd": 0.025, "period": "day"}}))
    now = calendar(gw, datetime(2026, 11, 25, 23, 0, tzinfo=UTC))
    statuses = [(await priced_chat(client, gw, "a")).status_code for _ in range(4)]
    # 0.01, 0.02, 0.03 (the charge after may go over), then refused.
    assert statuses == [200, 200, 200, 429]
    r = await priced_chat(client, gw, "a")
    assert r.json()["error"]["code"] == "subscription_limit"
    assert "budget" in r.json()["error"]["message"]
    info = (await client.get(f"{gw.base_url}/key", headers={"authorization": "Bearer sk-a"})).json()
    assert info["name"] == "a" and info["limits"]["budget"] == {"usd": 0.025, "period": "day"}
    day = info["usage"]["day"]
    assert (day["period"], day["requests"], day["tokens"]) == ("2026-11-25", 3, 6000)
    assert day["cost_usd"] == pytest.approx(0.03)
    assert day["resets_at"] == "2026-11-26T00:00:00Z" and info["remaining"]["usd"] == 0
    now[0] = datetime(2026, 11, 26, 0, 0, 1, tzinfo=UTC)
    assert (await priced_chat(client, gw, "a")).status_code == 200
    info = (await client.get(f"{gw.base_url}/key", headers={"authorization": "Bearer sk-a"})).json()
    assert info["usage"]["day"]["requests"] == 1
    assert info["remaining"]["usd"] == pytest.approx(0.015)


async def test_token_quota_per_month_and_a_bare_number_is_total(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    keys = budget_keys(m={"token_quota": {"tokens": 2500, "period": "month"}},
                       t={"token_quota": 2500})  # fmt: skip
    body = chat_completion()
    body["usage"] = {"prompt_tokens": 1000, "completion_tokens": 1000, "total_tokens": 2000}
    upstream.default = Json(body)
    gw = await gateway(routes(upstream), keys)
    now = calendar(gw, datetime(2026, 11, 30, 12, tzinfo=UTC))
    for name in ("m", "t"):
        assert [(await priced_chat(client, gw, name)).status_code for _ in range(3)] == [
            200, 200, 429]  # fmt: skip
    now[0] = datetime(2026, 12, 1, tzinfo=UTC)
    assert (await priced_chat(client, gw, "m")).status_code == 200  # a new month
    assert (await priced_chat(client, gw, "t")).status_code == 429  # total never resets
    info = (await client.get(f"{gw.base_url}/key", headers={"authorization": "Bearer sk-m"})).json()
    assert info["usage"]["month"]["period"] == "2026-12"
    assert info["usage"]["month"]["resets_at"] == "2027-01-01T00:00:00Z"
    assert info["limits"]["token_quota"] == {"tokens": 2500, "period": "month"}


async def test_key_endpoint_without_keys_and_with_a_wrong_one(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream))
    assert (await client.get(f"{gw.base_url}/key")).json()["name"] is None
    gw2 = await gateway(routes(upstream), budget_keys(a={}))
    r = await client.get(f"{gw2.base_url}/key", headers={"authorization": "Bearer nope"})
    assert r.status_code == 401


def test_budget_and_quota_problems() -> None:
    from tests.config.test_config import keys_of

    text = """\
keys:
  - {name: a, key: ka, budget: {usd: -1}}
  - {name: b, key: kb, budget: {usd: 5, period: week}}
  - {name: c, key: kc, token_quota: {period: day}}
  - {name: d, key: kd, budget: 5}
"""
    _, problems = keys_of(text)
    assert_problems(problems, [(2, "budget.usd must be"), (3, "period must be one of"),
                               (4, "token_quota needs tokens"), (5, "budget must be")])  # fmt: skip


# --------------------------------------------------------------------------- sort, max_price

SORT_ROUTES = """\
providers:
  cheap: {base_url: "http://127.0.0.1:9/v1"}
  dear: {base_url: "http://127.0.0.1:9/v1"}
  free: {base_url: "http://127.0.0.1:9/v1"}
  mid: {base_url: "http://127.0.0.1:9/v1"}
models:
  a:
    providers:
      - {provider: dear, price: {input: 10, output: 30}}
      - {provider: free}
      - {provider: cheap, price: {input: 0.1, output: 0.4}}
  b:
    max_attempts: 1
    providers:
      - {provider: mid, price: {input: 1, output: 2}}
      - {provider: cheap, price: {input: 0.05, output: 0.1}}
"""


def plan_of(body: dict[str, Any], health: Any = None) -> list[tuple[str, str]]:
    from gateway.body import parse_body
    from gateway.families import CHAT
    from gateway.health import Health
    from gateway.plan import build_plan
    from gateway.strategies import Strategies
    from tests.config.test_config import good_routes

    routes = good_routes(SORT_ROUTES)
    health = health or Health()
    parsed = parse_body(json.dumps({"messages": MESSAGES, **body}).encode(), CHAT)
    plan = build_plan(routes, parsed, None, health, Strategies(health))
    return [(c.slug, c.target.provider.name) for c in plan]


def test_provider_sort_price_puts_unpriced_last() -> None:
    assert plan_of({"model": "a"}) == [("a", "dear"), ("a", "free"), ("a", "cheap")]
    assert plan_of({"model": "a", "provider": {"sort": "price"}}) == [
        ("a", "cheap"), ("a", "dear"), ("a", "free")]  # fmt: skip


def test_max_price_excludes_pricier_entries_and_passes_unpriced() -> None:
    body = {"model": "a", "provider": {"max_price": {"prompt": 1, "completion": 5}}}
    assert plan_of(body) == [("a", "free"), ("a", "cheap")]


def test_route_sort_orders_every_listed_slug_together() -> None:
    # By price across a and b, each model's max_attempts still counted (b: one try).
    body = {"models": ["a", "b"], "route": "sort"}
    assert plan_of(body) == [("b", "cheap"), ("a", "cheap"), ("a", "dear"), ("a", "free")]


def test_sort_by_latency_and_throughput_uses_what_was_measured() -> None:
    from gateway.health import Health, observe_throughput

    health = Health()
    names = plan_of({"model": "a"}, health)
    assert names  # the entries, to seed their measures
    from gateway.plan import candidate
    from tests.config.test_config import good_routes

    model = good_routes(SORT_ROUTES).models["a"]
    keys = {t.provider.name: candidate("a", model, t).key for t in model.targets}
    health.state(keys["free"]).latency = 0.1
    health.state(keys["dear"]).latency = 0.5
    observe_throughput(health.state(keys["dear"]), 90.0)
    observe_throughput(health.state(keys["cheap"]), 30.0)
    assert plan_of({"model": "a", "provider": {"sort": "latency"}}, health) == [
        ("a", "free"), ("a", "dear"), ("a", "cheap")]  # fmt: skip
    assert plan_of({"model": "a", "provider": {"sort": "throughput"}}, health) == [
        ("a", "dear"), ("a", "cheap"), ("a", "free")]  # fmt: skip


def test_bad_sort_and_max_price_are_422() -> None:
    from gateway.errors import ValidationFailed

    for provider in ({"sort": "cost"}, {"max_price": 3}, {"max_price": {"prompt": "x"}}):
        with pytest.raises(ValidationFailed):
            plan_of({"model": "a", "provider": provider})


async def test_throughput_is_measured_from_answers(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    from gateway.plan import candidate

    gw = await gateway(routes(upstream))
    upstream.script(Sse([chunk("Hi"), chunk(None, choices=[], usage={
        "prompt_tokens": 3, "completion_tokens": 40, "total_tokens": 43}), DONE], delay=0.01))  # fmt: skip
    r = await client.post(f"{gw.base_url}/chat/completions",
                          json={"model": "m", "messages": MESSAGES, "stream": True})  # fmt: skip
    assert r.status_code == 200
    model = gw.runtime.config.routes.models["m"]
    key = candidate("m", model, model.targets[0]).key
    throughput = gw.runtime.health.state(key).throughput
    assert throughput is not None and throughput > 0
