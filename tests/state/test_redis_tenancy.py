"""SPEC §13 "Budgets and quotas" and "Stored objects" with `--state redis://`, against a
real redis-server shared by two gateways (each its own Runtime and RedisState, as two
replicas are): reservations hold a quota and a budget across replicas under concurrent
load, a small quota serves one request at a time, a dead replica's hold is let go, a
Responses id belongs to the key that made it (a per-key share, first creator keeps it),
a full Redis still holds limits while ids are dropped and counted, and `--state-fail
closed` refusals are counted. Each test has its own server on its own port, stopped by
its pid; the upstream is tests/scripted_upstream.py's scriptable one, slowed where requests must
overlap."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
import yaml
from redis.exceptions import OutOfMemoryError

from gateway.state.redis import PREFIX, _sha1
from gateway.state.scripts import ADMIT_SCRIPT
from gateway.wire.estimate import prompt_tokens
from tests.conftest import GatewayFactory, RunningGateway
from tests.e2e.test_cost import metric
from tests.e2e.test_families import response_obj
from tests.helpers import assert_envelope, until
from tests.scripted_upstream import Json, Upstream, chat_completion
from tests.server.test_hostile_clients import Answer, read_answer, request
from tests.state.test_redis import Redis

PRICE = 10.0  # USD per 1M tokens, input and output alike: 1,000 tokens cost $0.01
PER_TOKEN = PRICE / 1_000_000
MAX_TOKENS = 60
CHAT = {"model": "m", "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": "hello there, how are you"}]}  # fmt: skip
PROMPT = prompt_tokens(CHAT)  # the gateway's own estimate of CHAT's prompt
HOLD = PROMPT + MAX_TOKENS  # what CHAT reserves: its prompt estimate plus its allowance


def routes(upstream: Upstream, price: float | None = PRICE) -> str:
    entry: dict[str, Any] = {"provider": "p", "model": "upstream-model"}
    if price is not None:
        entry["price"] = {"input": price, "output": price}
    return yaml.safe_dump({
        "providers": {"p": {"base_url": upstream.url, "api_key": "sk-upstream-secret"}},
        "models": {"m": {"providers": [entry]}},
    })  # fmt: skip


def keys(**team: object) -> str:
    """`team` with the limits given, and two keys without limits: `a` and `b`."""
    return yaml.safe_dump({"keys": [
        {"name": "team", "key": "sk-team", **team},
        {"name": "a", "key": "sk-a"},
        {"name": "b", "key": "sk-b"},
    ]})  # fmt: skip


TEAM = {"authorization": "Bearer sk-team"}
A = {"authorization": "Bearer sk-a"}
B = {"authorization": "Bearer sk-b"}


def full_charge(delay: float = 0.0) -> Json:
    """An answer that uses all CHAT holds: its real charge is its reservation, so only a
    hold capped at what remained can pass the limit."""
    body = chat_completion()
    body["usage"] = {"prompt_tokens": PROMPT, "completion_tokens": MAX_TOKENS,
                     "total_tokens": HOLD}  # fmt: skip
    return Json(body, delay=delay)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path, "--maxmemory-policy", "noeviction")
    yield server
    server.stop()


def spent(redis: Redis, name: str = "team") -> dict[str, str]:
    """The key's `total` period hash in Redis (requests, tokens, usd)."""
    flat = redis.cli("hgetall", f"{PREFIX}{{{name}}}:total").split("\n")
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat != [""] else {}


def held(redis: Redis, name: str = "team") -> dict[str, str]:
    flat = redis.cli("hgetall", f"{PREFIX}{{{name}}}:held").split("\n")
    return dict(zip(flat[::2], flat[1::2], strict=True)) if flat != [""] else {}


async def post(port: int, body: dict[str, Any], key: str) -> Answer:
    """One POST to /v1/chat/completions on its own connection, its whole answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request(f"authorization: Bearer {key}", body=json.dumps(body).encode()))
        return await read_answer(reader)
    finally:
        writer.close()


async def _at_least(reply: Awaitable[bytes | str | None], floor: int) -> bool:
    return int(await reply or 0) >= floor


async def settled(*gateways: RunningGateway) -> None:
    """Every request these gateways run has ended (a client may read its answer before
    the endpoint settles its hold), and every pending charge and id is sent now (else
    within CHARGE_EVERY)."""
    await until(lambda: all(gw.runtime.metrics.in_flight.value == 0 for gw in gateways))
    for gw in gateways:
        assert await gw.runtime.shared.flush()


# --------------------------------------------------------------------------- reservations


@pytest.mark.parametrize(("requests", "scale"), [(30, 1), (300, 10)])
async def test_concurrent_requests_on_two_replicas_pass_the_limits_by_one_capped_hold_at_most(
    gateway: GatewayFactory,
    upstream: Upstream,
    redis: Redis,
    requests: int,
    scale: int,
) -> None:
    """A quota of 1,000 tokens and a budget of $0.01 (x10 for 300 requests), all sent at
    once, split across two gateways, against an upstream slow enough that they overlap.
    Check-then-charge would admit every one (nothing is spent when they are checked):
    30 x 70 tokens = 2,100. Reserving admits what fits and passes the limits by at most
    one request's real charge minus its reservation (the prompt estimate at least).
    Measured: 30 requests, 15 admitted, 1,050 tokens and $0.0105 (+50 tokens, +$0.0005);
    300 requests, 143 admitted, 10,010 tokens and $0.1001 (+10 tokens, +$0.0001); the
    bound is 60 tokens, $0.0006."""
    quota, budget = 1000 * scale, 0.01 * scale
    limits = {"token_quota": quota, "budget": {"usd": budget, "period": "total"}}
    upstream.default = full_charge(delay=1.5)
    one = await gateway(routes(upstream), keys(**limits), state=redis.url)
    two = await gateway(routes(upstream), keys(**limits), state=redis.url)
    # Raw sockets, not httpx: 300 httpx requests cost seconds of this loop's time, which
    # the gateways and the upstream share.
    running = asyncio.gather(
        *(post((one, two)[i % 2].port, CHAT, "sk-team") for i in range(requests))
    )
    try:
        # They overlap: at one moment the running requests' holds are the whole quota
        # (one request's hold after another would never hold more than HOLD).
        async with aioredis.from_url(redis.url) as store:
            held_key = f"{PREFIX}{{team}}:held"
            await until(
                lambda: _at_least(store.hget(held_key, "=tokens"), quota - PROMPT), within=10
            )
    finally:
        answers = await running
    codes = [answer.status for answer in answers]
    assert set(codes) == {200, 429}, codes
    for answer in answers:
        if answer.status == 429:
            assert json.loads(answer.body)["error"]["code"] == "subscription_limit"
    admitted = codes.count(200)
    assert len(upstream.requests) == admitted  # a refusal never reached the upstream
    await settled(one, two)
    total = spent(redis)
    tokens, usd = int(total["tokens"]), float(total["usd"])
    assert tokens == admitted * HOLD  # every admitted request charged its usage
    assert usd == pytest.approx(admitted * HOLD * PER_TOKEN)
    over_tokens, over_usd = tokens - quota, usd - budget
    # The largest real charge (HOLD) minus the smallest reservation admission allows
    # (the prompt estimate): the most one capped hold can pass by.
    assert over_tokens <= HOLD - PROMPT, (tokens, admitted)
    assert over_usd <= (HOLD - PROMPT) * PER_TOKEN + 1e-12, (usd, admitted)
    assert tokens >= quota - HOLD  # and nearly all of it was served, not refused early
    # Every hold was let go when its request settled: nothing stays held.
    rest = held(redis)
    assert int(rest["=tokens"]) == 0 and int(rest["=partial"]) == 0
    assert float(rest["=usd"]) == pytest.approx(0.0, abs=1e-12)
    assert set(rest) == {"=tokens", "=usd", "=partial"}


@pytest.mark.parametrize(
    "quota",
    [HOLD + PROMPT - 1, HOLD - 1],
    ids=["one-whole-hold-then-less-than-a-prompt", "less-than-one-hold"],
)
async def test_a_small_quota_serves_one_request_at_a_time_across_replicas(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, redis: Redis,
    quota: int,
) -> None:  # fmt: skip
    """While one request runs on one gateway, the other gateway refuses the key's next
    request (what remains after the first's hold is less than a prompt); once the first
    settled (its real charge, 7 tokens, is far below its hold), the next is admitted."""
    upstream.script(Json(chat_completion(), delay=1.0))  # the first is slow; 7 tokens
    one = await gateway(routes(upstream), keys(token_quota=quota), state=redis.url)
    two = await gateway(routes(upstream), keys(token_quota=quota), state=redis.url)
    chat_one, chat_two = f"{one.base_url}/chat/completions", f"{two.base_url}/chat/completions"
    first = asyncio.ensure_future(client.post(chat_one, json=CHAT, headers=TEAM))
    try:
        await until(lambda: len(upstream.requests) == 1)  # admitted: at the upstream
        r = await client.post(chat_two, json=CHAT, headers=TEAM)
        err = assert_envelope(r, 429, "subscription_limit")
        assert err["details"]["used"] == 0 and err["details"]["held"] == min(HOLD, quota)
        assert "held by its requests still running" in err["message"]
        assert not first.done()  # refused while the first ran
        assert len(upstream.requests) == 1
    finally:
        assert (await first).status_code == 200

    async def admitted() -> bool:
        r = await client.post(chat_two, json=CHAT, headers=TEAM)
        assert r.status_code in (200, 429), r.text
        return r.status_code == 200

    # The first's settlement reaches Redis with its gateway's next batch (CHARGE_EVERY).
    await until(admitted)
    await settled(one, two)
    assert int(spent(redis)["tokens"]) == 2 * 7
    assert int(held(redis)["=tokens"]) == 0


async def test_a_hold_left_by_a_replica_that_died_is_let_go_at_its_expiry(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, redis: Redis
) -> None:
    """A hold written the way ADMIT writes it (its field in `held`, the sums, its expiry
    in `held:exp`) by a replica that died before settling: while it has not expired it
    counts (the key is refused), once its expiry has passed on Redis's clock the next
    admission lets it go instead of locking the key out."""
    limits = {"token_quota": 1000, "budget": {"usd": 0.01, "period": "total"}}
    gw = await gateway(routes(upstream), keys(**limits), state=redis.url)
    chat = f"{gw.base_url}/chat/completions"
    base = f"{PREFIX}{{team}}:"
    redis.cli("hset", base + "held", "dead-replica", "1000 0.0100000000 0")
    redis.cli("hincrby", base + "held", "=tokens", "1000")
    redis.cli("hincrbyfloat", base + "held", "=usd", "0.01")
    redis.cli("hincrby", base + "held", "=partial", "0")
    seconds = int(redis.cli("time").split("\n")[0])
    redis.cli("zadd", base + "held:exp", str((seconds + 3600) * 1000), "dead-replica")
    r = await client.post(chat, json=CHAT, headers=TEAM)
    err = assert_envelope(r, 429, "subscription_limit")
    assert err["details"]["held"] == 1000 and err["details"]["used"] == 0
    assert upstream.requests == []

    # Its expiry, a minute ago on Redis's clock (Redis's TIME cannot be moved on).
    redis.cli("zadd", base + "held:exp", str((seconds - 60) * 1000), "dead-replica")
    r = await client.post(chat, json=CHAT, headers=TEAM)
    assert r.status_code == 200, r.text
    assert redis.cli("hexists", base + "held", "dead-replica") == "0"
    assert redis.cli("zscore", base + "held:exp", "dead-replica") == ""
    await settled(gw)
    rest = held(redis)
    assert int(rest["=tokens"]) == 0 and float(rest["=usd"]) == pytest.approx(0, abs=1e-12)
    assert int(spent(redis)["tokens"]) == 7  # the request's own charge, nothing else


# --------------------------------------------------------------------------- Responses ids


def created(rid: str) -> Json:
    return Json(response_obj(rid, "completed"))


async def make_id(client: httpx.AsyncClient, gw: RunningGateway, upstream: Upstream,
                  rid: str, auth: dict[str, str]) -> None:  # fmt: skip
    """POST /v1/responses answered by the upstream with the id `rid`."""
    upstream.script(created(rid))
    r = await client.post(f"{gw.base_url}/responses", json={"model": "m", "input": "hi"},
                          headers=auth)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["id"] == rid


async def start_of_a_second(redis: Redis) -> None:
    """Wait (bounded) until Redis's clock is in the first 50 ms of a second, so the few
    steps that follow share one second of it: what an id map scored in whole seconds
    cannot tell apart (a test must not pass by landing across a second's edge)."""
    async with aioredis.from_url(redis.url) as store:

        async def early() -> bool:
            _, micros = await store.time()
            return bool(micros < 50_000)

        await until(early, within=3, every=0.002)


def stored(redis: Redis, rid: str) -> bool:
    return redis.cli("exists", f"{PREFIX}response:{rid}") == "1"


async def by_id_answers(client: httpx.AsyncClient, gw: RunningGateway, rid: str,
                        auth: dict[str, str]) -> list[httpx.Response]:  # fmt: skip
    """Every way to name an id: GET, DELETE, input_items, cancel, and a continuation
    with and without `model`."""
    by_id = f"{gw.base_url}/responses/{rid}"
    return [
        await client.get(by_id, headers=auth),
        await client.delete(by_id, headers=auth),
        await client.get(f"{by_id}/input_items", headers=auth),
        await client.post(f"{by_id}/cancel", headers=auth),
        await client.post(f"{gw.base_url}/responses", headers=auth,
                          json={"previous_response_id": rid, "input": "more"}),
        await client.post(f"{gw.base_url}/responses", headers=auth,
                          json={"previous_response_id": rid, "model": "m", "input": "more"}),
    ]  # fmt: skip


async def test_an_id_is_found_by_its_key_on_another_replica_and_is_404_for_any_other(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, redis: Redis
) -> None:
    one = await gateway(routes(upstream, price=None), keys(), state=redis.url)
    two = await gateway(routes(upstream, price=None), keys(), state=redis.url)
    await make_id(client, one, upstream, "resp_of_a", A)
    await until(lambda: stored(redis, "resp_of_a"))
    assert redis.cli("get", f"{PREFIX}response:resp_of_a").split("\n")[0] == "a"

    sent = len(upstream.requests)
    for gw in (two, one):  # Redis's map, then the creating process's own
        for r in await by_id_answers(client, gw, "resp_of_a", B):
            err = assert_envelope(r, 404, "response_not_found")
            assert err["details"] == {"response_id": "resp_of_a"}
            # Nothing says who made it or where: the answer to an id never made.
            assert "upstream-model" not in r.text and '"m"' not in r.text
        never = await client.get(f"{gw.base_url}/responses/resp_of_nobody", headers=B)
        mine = await client.get(f"{gw.base_url}/responses/resp_of_a", headers=B)
        assert mine.json() == json.loads(never.text.replace("resp_of_nobody", "resp_of_a"))
    assert len(upstream.requests) == sent  # nothing of B's reached the upstream

    # A reaches it through the gateway that never saw it made, every way.
    upstream.default = created("resp_of_a")
    for r in await by_id_answers(client, two, "resp_of_a", A):
        assert r.status_code == 200, r.text
    paths = [(got.method, got.path) for got in upstream.requests[sent:]]
    assert paths == [
        ("GET", "/v1/responses/resp_of_a"),
        ("DELETE", "/v1/responses/resp_of_a"),
        ("GET", "/v1/responses/resp_of_a/input_items"),
        ("POST", "/v1/responses/resp_of_a/cancel"),
        ("POST", "/v1/responses"),
        ("POST", "/v1/responses"),
    ]
    assert upstream.requests[-1].json()["previous_response_id"] == "resp_of_a"


async def test_each_key_keeps_its_own_share_of_ids_its_newest_and_they_expire(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, redis: Redis
) -> None:
    """--response-ids-per-key 5: key a makes 20 ids and keeps its 5 most recently used in
    Redis (the others' keys deleted), while key b's ids are untouched. The ids are made
    in descending order of their names, so "least recently used" cannot pass for "least
    by name" (real ids are random)."""
    settings = {"state": redis.url, "response_ids_per_key": 5}
    one = await gateway(routes(upstream, price=None), keys(), **settings)
    two = await gateway(routes(upstream, price=None), keys(), **settings)
    b_ids = [f"resp_b{i}" for i in range(3)]
    for rid in b_ids:
        await make_id(client, two, upstream, rid, B)
    a_ids = [f"resp_a{99 - i:02d}" for i in range(20)]  # resp_a99 first, resp_a80 last
    await start_of_a_second(redis)
    for rid in a_ids:
        await make_id(client, one, upstream, rid, A)
    await settled(one, two)
    members = redis.cli("zrange", f"{PREFIX}{{a}}:responses", "0", "-1").split("\n")
    assert sorted(members) == sorted(f"{PREFIX}response:{rid}" for rid in a_ids[-5:])
    assert [rid for rid in a_ids if stored(redis, rid)] == a_ids[-5:]
    assert redis.cli("zcard", f"{PREFIX}{{b}}:responses") == "3"
    assert all(stored(redis, rid) for rid in b_ids)
    # Each id and each share expires (24 h after its last use).
    for name in (f"{PREFIX}response:{a_ids[-1]}", f"{PREFIX}{{a}}:responses"):
        assert 0 < int(redis.cli("ttl", name)) <= 86400
    # Through the other gateway (Redis's map alone): the newest found, the oldest gone.
    upstream.default = created(a_ids[-1])
    r = await client.get(f"{two.base_url}/responses/{a_ids[-1]}", headers=A)
    assert r.status_code == 200, r.text
    r = await client.get(f"{two.base_url}/responses/{a_ids[0]}", headers=A)
    assert_envelope(r, 404, "response_not_found")


async def test_the_first_key_to_make_an_id_keeps_it_on_every_replica(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, redis: Redis
) -> None:
    """An upstream answers key b with an id key a made already (on another replica, and
    on the same one): b still gets 404 for it, everywhere, and a still reaches it."""
    one = await gateway(routes(upstream, price=None), keys(), state=redis.url)
    two = await gateway(routes(upstream, price=None), keys(), state=redis.url)
    await make_id(client, one, upstream, "resp_twice", A)
    await until(lambda: stored(redis, "resp_twice"))
    await make_id(client, two, upstream, "resp_twice", B)  # the upstream repeats it
    await make_id(client, one, upstream, "resp_twice", B)
    await settled(one, two)
    assert redis.cli("get", f"{PREFIX}response:resp_twice").split("\n")[0] == "a"
    assert redis.cli("zcard", f"{PREFIX}{{b}}:responses") == "0"

    upstream.default = created("resp_twice")
    for gw in (one, two):
        sent = len(upstream.requests)
        r = await client.get(f"{gw.base_url}/responses/resp_twice", headers=B)
        assert_envelope(r, 404, "response_not_found")
        assert len(upstream.requests) == sent, gw.port
        r = await client.get(f"{gw.base_url}/responses/resp_twice", headers=A)
        assert r.status_code == 200, (gw.port, r.text)


async def test_naming_an_id_in_redis_is_a_use_that_keeps_it(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, redis: Redis
) -> None:
    """--response-ids-per-key 3: a's oldest id, named through the other gateway, is its
    most recently used; a fourth id then evicts the next oldest instead. The ids' names
    ascend with their age here, the order most favourable to a tie broken by name."""
    settings = {"state": redis.url, "response_ids_per_key": 3}
    one = await gateway(routes(upstream, price=None), keys(), **settings)
    two = await gateway(routes(upstream, price=None), keys(), **settings)
    await start_of_a_second(redis)
    for rid in ("resp_u1", "resp_u2", "resp_u3"):
        await make_id(client, one, upstream, rid, A)
    await settled(one)
    upstream.script(created("resp_u1"))
    r = await client.get(f"{two.base_url}/responses/resp_u1", headers=A)  # a use
    assert r.status_code == 200, r.text
    await make_id(client, one, upstream, "resp_u4", A)
    await settled(one)
    assert [rid for rid in ("resp_u1", "resp_u2", "resp_u3", "resp_u4")
            if stored(redis, rid)] == ["resp_u1", "resp_u3", "resp_u4"]  # fmt: skip


# --------------------------------------------------------------------------- Redis away or full

RESPONSES = {"model": "m", "input": "hi", "max_output_tokens": 10}  # holds 1 + 10 tokens


async def test_a_full_redis_still_holds_limits_and_drops_ids_counted_and_logged(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis at its maxmemory (noeviction) refuses plain writes: the limits' scripts
    (allow-oom) still check and charge, so a quota of 30 serves three answers of 10
    tokens and refuses the fourth, rpm's counter is written too, and /v1/key reads it;
    each new Responses id is not stored, logged and counted, never taken for Redis
    being away. With room again, ids are stored again."""
    caplog.set_level(logging.WARNING, logger="gateway")
    limits = {"token_quota": 30, "rpm": 1000}
    gw = await gateway(routes(upstream, price=None), keys(**limits), state=redis.url)
    async with aioredis.from_url(redis.url) as store:
        used = int((await store.info("memory"))["used_memory"])
        await store.config_set("maxmemory", used + 256 * 1024)
        with pytest.raises(OutOfMemoryError):  # full: Redis refuses what it may refuse
            for i in range(10_000):
                await store.set(f"filler:{i}", b"x" * 16 * 1024)
        # The gateway has not run a script yet: loading them is allowed while full.
        assert await store.script_exists(_sha1(ADMIT_SCRIPT)) == [False]

        usage = {"input_tokens": 5, "output_tokens": 5, "total_tokens": 10}
        for i in range(1, 4):
            upstream.script(Json(response_obj(f"resp_full_{i}", "completed", usage)))
        answers = [await client.post(f"{gw.base_url}/responses", json=RESPONSES,
                                     headers=TEAM) for _ in range(4)]  # fmt: skip
        assert [r.status_code for r in answers] == [200, 200, 200, 429], answers[-1].text
        err = assert_envelope(answers[-1], 429, "subscription_limit")
        assert err["details"]["used"] == 30
        assert len(upstream.requests) == 3
        await settled(gw)
        assert int(spent(redis)["tokens"]) == 30 and int(spent(redis)["requests"]) == 3
        assert redis.cli("exists", f"{PREFIX}{{team}}:rpm") == "1"
        info = (await client.get(f"{gw.base_url}/key", headers=TEAM)).json()
        assert info["usage"]["total"]["tokens"] == 30

        text = await until(lambda: _dropped_metric(client, gw, 3))
        assert metric(text, "gateway_state_unavailable_total") == 0
        for i in range(1, 4):
            assert not stored(redis, f"resp_full_{i}")
            assert any(f"resp_full_{i} was not stored" in m for m in caplog.messages)
        assert not any(" is unreachable" in m for m in caplog.messages)  # the link is up
        # This process still knows them (its own map), for their key alone.
        assert gw.runtime.response_ids.find("resp_full_1", "team") is not None

        await store.config_set("maxmemory", 0)  # room again
        await make_id(client, gw, upstream, "resp_roomy", A)
        await until(lambda: stored(redis, "resp_roomy"))
        text = (await client.get(f"{gw.url}/metrics")).text
        assert metric(text, "gateway_response_ids_dropped_total") == 3


async def _dropped_metric(client: httpx.AsyncClient, gw: RunningGateway, count: int) -> str:
    """The /metrics text once it counts `count` dropped ids, else ''."""
    text = (await client.get(f"{gw.url}/metrics")).text
    return text if metric(text, "gateway_response_ids_dropped_total") == count else ""


async def test_state_fail_closed_refuses_a_limited_key_while_redis_is_away_and_counts_it(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    redis: Redis,
) -> None:
    limits = {"token_quota": 1000, "budget": {"usd": 0.01, "period": "total"}}
    gw = await gateway(routes(upstream), keys(**limits), state=redis.url, state_fail="closed")
    chat = f"{gw.base_url}/chat/completions"
    assert (await client.post(chat, json=CHAT, headers=TEAM)).status_code == 200
    redis.stop()
    sent = len(upstream.requests)
    for _ in range(3):
        r = await client.post(chat, json=CHAT, headers=TEAM)
        assert_envelope(r, 503, "state_unavailable")
    assert len(upstream.requests) == sent
    text = (await client.get(f"{gw.url}/metrics")).text
    assert metric(text, "gateway_state_unavailable_total") == 3
    # A key without limits never needed Redis: served, and not counted.
    assert (await client.post(chat, json=CHAT, headers=A)).status_code == 200
    text = (await client.get(f"{gw.url}/metrics")).text
    assert metric(text, "gateway_state_unavailable_total") == 3


async def test_a_use_on_the_replica_that_made_an_id_counts_in_redis_too(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, redis: Redis
) -> None:
    """Every request naming an id is a use of it (SPEC §13): in Redis its 24 h run again
    whichever replica answered. The id's TTL is cut short by hand, then the id is named
    through the other replica (Redis's map), then through the one that made it."""
    one = await gateway(routes(upstream, price=None), keys(), state=redis.url)
    two = await gateway(routes(upstream, price=None), keys(), state=redis.url)
    await make_id(client, one, upstream, "resp_used", A)
    await until(lambda: stored(redis, "resp_used"))
    upstream.default = created("resp_used")
    name = f"{PREFIX}response:resp_used"
    for which, gw in (("another replica", two), ("the maker", one)):
        redis.cli("expire", name, "100")
        r = await client.get(f"{gw.base_url}/responses/resp_used", headers=A)
        assert r.status_code == 200, r.text
        await settled(one, two)
        assert int(redis.cli("ttl", name)) > 86000, which
