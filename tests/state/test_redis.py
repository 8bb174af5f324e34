"""`--state redis://` (SPEC §11) against a real redis-server: limits exact across
gateways and workers, spend across restarts, the Responses id map shared, Redis away
open or closed, round trips per request. Each test has its own server on its own port,
stopped by its pid."""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import gateway.state.redis as redis_state
from gateway.state.redis import PREFIX
from tests.conftest import GatewayFactory
from tests.e2e.test_cost import metric
from tests.helpers import assert_envelope, free_port, start_redis, stop, until
from tests.state.test_file import ROUTES  # the echo at a price: the same as the file backend's
from tests.test_cli import clean_env, serving

CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}


def keys(**limits: object) -> str:
    return yaml.safe_dump(
        {
            "keys": [
                {"name": "team", "key": "sk-team", **limits},
                {"name": "free", "key": "sk-free"},
            ]
        }
    )


TEAM = {"authorization": "Bearer sk-team"}
FREE = {"authorization": "Bearer sk-free"}


class Redis:
    def __init__(self, folder: Path, *extra: str) -> None:
        self.folder = folder
        self.extra = extra
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = start_redis(self.port, folder, *extra)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def start(self) -> None:
        self.proc = start_redis(self.port, self.folder, *self.extra)

    def cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path)
    yield server
    server.stop()


def admitted_within(limit: int, admitted: int, elapsed: float) -> None:
    """Exact: the limit, plus what the bucket refilled while the requests ran."""
    refilled = math.ceil(elapsed * limit / 60)
    assert limit <= admitted <= limit + refilled, (admitted, limit, elapsed)


def test_two_gateway_processes_admit_exactly_the_rpm_between_them(
    tmp_path: Path, redis: Redis
) -> None:
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        (folder / "routes.yaml").write_text(ROUTES)
        (folder / "keys.yaml").write_text(keys(rpm=30))
    common = ["--routes", "routes.yaml", "--keys", "keys.yaml", "--state", redis.url]
    a, b = free_port(), free_port()
    with (
        serving(tmp_path / "a", [*common, "--port", str(a)], clean_env(), a) as (_, url_a),
        serving(tmp_path / "b", [*common, "--port", str(b)], clean_env(), b) as (_, url_b),
        httpx.Client(timeout=10) as client,
    ):
        t0 = time.monotonic()
        codes = [
            client.post(f"{url}/v1/chat/completions", json=CHAT, headers=TEAM).status_code
            for _ in range(30)
            for url in (url_a, url_b)
        ]
        elapsed = time.monotonic() - t0
        # Without Redis each process would admit 30: 60 in all.
        admitted_within(30, codes.count(200), elapsed)
        assert set(codes) == {200, 429}
        r = client.post(f"{url_b}/v1/chat/completions", json=CHAT, headers=TEAM)
        assert_envelope(r, 429, "rate_limited")
        assert r.headers["x-ratelimit-limit-requests"] == "30"
        # An unlimited key through the same gateways: no limit, no round trip.
        before = metric(client.get(f"{url_a}/metrics").text, "gateway_state_round_trips_total")
        for _ in range(5):
            r = client.post(f"{url_a}/v1/chat/completions", json=CHAT, headers=FREE)
            assert r.status_code == 200
        after = metric(client.get(f"{url_a}/metrics").text, "gateway_state_round_trips_total")
        assert after == before


def test_two_workers_admit_exactly_the_rpm_and_a_restart_keeps_the_spend(
    tmp_path: Path, redis: Redis
) -> None:
    (tmp_path / "routes.yaml").write_text(ROUTES)
    (tmp_path / "keys.yaml").write_text(keys(rpm=20, budget={"usd": 1000, "period": "month"}))
    port = free_port()
    command = ["--routes", "routes.yaml", "--keys", "keys.yaml", "--port", str(port),
               "--state", redis.url, "--workers", "2"]  # fmt: skip
    with serving(tmp_path, command, clean_env(), port) as (proc, url):
        t0 = time.monotonic()
        codes = []
        for _ in range(40):  # a fresh connection each: the kernel spreads them
            with httpx.Client(timeout=10) as client:
                r = client.post(f"{url}/v1/chat/completions", json=CHAT, headers=TEAM)
                codes.append(r.status_code)
        admitted_within(20, codes.count(200), time.monotonic() - t0)
        with httpx.Client(timeout=10) as client:
            before = client.get(f"{url}/v1/key", headers=TEAM).json()["usage"]["month"]
        assert before["requests"] == codes.count(200) and before["cost_usd"] > 0
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    with (
        serving(tmp_path, command[:-2], clean_env(), port) as (_, url),
        httpx.Client(timeout=10) as client,
    ):
        after = client.get(f"{url}/v1/key", headers=TEAM).json()["usage"]["month"]
        assert after == before


async def test_token_limits_quota_and_budget_count_in_redis_by_the_calendar(
    gateway: GatewayFactory, client: httpx.AsyncClient, redis: Redis
) -> None:
    """tpm, a daily token quota and a total budget, checked and charged in Redis; an
    injected calendar moves the day on (not by waiting for midnight)."""
    limits = {"tpm": 30, "token_quota": {"tokens": 46, "period": "day"},
              "budget": {"usd": 0.06, "period": "total"}}  # fmt: skip
    gw = await gateway(ROUTES, keys(**limits), state=redis.url)
    other = await gateway(ROUTES, keys(**limits), state=redis.url)
    now = [datetime(2026, 11, 25, 23, 0, tzinfo=UTC)]
    for g in (gw, other):
        g.runtime.shared.wall = lambda: now[0]
    url = f"{gw.base_url}/chat/completions"
    for _ in range(3):  # 13 tokens each: 39, over the tpm of 30 after the third
        r = await client.post(url, json=CHAT, headers=TEAM)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] == 13  # the echo's count, at $0.001 each
    # Another replica sees a charge once it is sent: with the key's next check here, or
    # within CHARGE_EVERY (50 ms). The test sends it now rather than wait.
    await gw.runtime.shared.flush()
    r = await client.post(f"{other.base_url}/chat/completions", json=CHAT, headers=TEAM)
    body = assert_envelope(r, 429, "rate_limited")
    assert body["details"]["limit"] == "tpm" and int(r.headers["retry-after"]) >= 1
    assert r.headers["x-ratelimit-limit-tokens"] == "30"
    # The day's quota (46) comes next: the tpm bucket is emptied by hand. 7 tokens remain,
    # just what the prompt's estimate needs (SPEC §13): admitted, holding those 7, and it
    # costs 13: the one request held short may overshoot by the difference.
    redis.cli("del", PREFIX + "{team}:tpm")
    r = await client.post(url, json=CHAT, headers=TEAM)
    assert r.status_code == 200, r.text
    await gw.runtime.shared.flush()
    redis.cli("del", PREFIX + "{team}:tpm")
    r = await client.post(f"{other.base_url}/chat/completions", json=CHAT, headers=TEAM)
    body = assert_envelope(r, 429, "subscription_limit")
    assert body["details"] == {"token_quota": 46, "used": 52, "held": 0, "period": "day"}
    info = (await client.get(f"{other.base_url}/key", headers=TEAM)).json()
    assert info["usage"]["day"]["tokens"] == 52 and info["remaining"]["tokens"] == 0
    assert info["usage"]["day"]["resets_at"] == "2026-11-26T00:00:00Z"
    assert info["usage"]["total"]["cost_usd"] == pytest.approx(0.052)

    now[0] += timedelta(hours=2)  # a new UTC day: a new quota, the same total budget
    r = await client.post(url, json=CHAT, headers=TEAM)
    assert r.status_code == 200  # 0.065 of 0.06 USD: over after this one
    await gw.runtime.shared.flush()
    r = await client.post(f"{other.base_url}/chat/completions", json=CHAT, headers=TEAM)
    body = assert_envelope(r, 429, "subscription_limit")
    assert body["details"]["budget_usd"] == 0.06
    info = (await client.get(f"{gw.base_url}/key", headers=TEAM)).json()
    assert info["usage"]["day"] == {"period": "2026-11-26", "requests": 1, "tokens": 13,
                                    "cost_usd": 0.013,
                                    "resets_at": "2026-11-27T00:00:00Z"}  # fmt: skip
    assert info["remaining"] == {"tokens": 33, "usd": 0.0}
    # Day hashes expire once their day has gone; the total never does.
    assert 0 < int(redis.cli("ttl", PREFIX + "{team}:day:2026-11-26")) <= 3 * 86400
    assert redis.cli("ttl", PREFIX + "{team}:total") == "-1"


async def test_a_response_id_made_through_one_gateway_is_found_by_another(
    gateway: GatewayFactory, client: httpx.AsyncClient, redis: Redis
) -> None:
    a = await gateway(ROUTES, state=redis.url)
    b = await gateway(ROUTES, state=redis.url)
    r = await client.post(f"{a.base_url}/responses", json={"model": "echo", "input": "hi"})
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    await until(lambda: redis.cli("exists", PREFIX + "response:" + rid) == "1")
    assert 0 < int(redis.cli("ttl", PREFIX + "response:" + rid)) <= 86400
    # No `model`: only the id says where it goes; without Redis this is 404.
    r = await client.post(f"{b.base_url}/responses", json={"previous_response_id": rid,
                                                          "input": "more"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "echo"
    r = await client.post(f"{b.base_url}/responses", json={"previous_response_id": "resp_no"})
    assert_envelope(r, 404, "response_not_found")


async def test_redis_away_serves_unlimited_counted_and_logged_then_enforces_again(
    gateway: GatewayFactory,
    client: httpx.AsyncClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis = Redis(tmp_path, "--requirepass", "s3cret-redis-pw")
    try:
        url = f"redis://:s3cret-redis-pw@127.0.0.1:{redis.port}/0"
        gw = await gateway(ROUTES, keys(rpm=2), state=url)
        chat = f"{gw.base_url}/chat/completions"
        assert (await client.post(chat, json=CHAT, headers=TEAM)).status_code == 200
        redis.stop()
        codes = [(await client.post(chat, json=CHAT, headers=TEAM)).status_code
                 for _ in range(4)]  # fmt: skip
        assert codes == [200] * 4  # rpm 2, but nothing can count it
        text = (await client.get(f"{gw.url}/metrics")).text
        assert metric(text, "gateway_state_unavailable_total") == 4
        served = [m for m in caplog.messages if "served without its limits" in m]
        assert len(served) == 4
        assert any("unreachable" in m and "***@127.0.0.1" in m for m in caplog.messages)
        r = await client.get(f"{gw.base_url}/key", headers=TEAM)
        assert_envelope(r, 503, "state_unavailable")
        assert "s3cret" not in caplog.text and "s3cret" not in text

        redis.start()  # back (empty: this one keeps nothing): limits count again
        gw.runtime.shared.retry_at = 0.0  # no need to wait out RETRY_EVERY
        codes = [(await client.post(chat, json=CHAT, headers=TEAM)).status_code
                 for _ in range(3)]  # fmt: skip
        assert codes == [200, 200, 429]
        assert any("answers again" in m for m in caplog.messages)
    finally:
        redis.stop()


async def test_redis_away_with_state_fail_closed_is_503(
    gateway: GatewayFactory, client: httpx.AsyncClient, redis: Redis
) -> None:
    gw = await gateway(ROUTES, keys(rpm=100), state=redis.url, state_fail="closed")
    chat = f"{gw.base_url}/chat/completions"
    assert (await client.post(chat, json=CHAT, headers=TEAM)).status_code == 200
    redis.stop()
    r = await client.post(chat, json=CHAT, headers=TEAM)
    assert_envelope(r, 503, "state_unavailable")
    r = await client.post(f"{gw.base_url}/messages", headers=TEAM, json={
        "model": "echo", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
    # A key without limits never needed Redis: still served.
    assert (await client.post(chat, json=CHAT, headers=FREE)).status_code == 200


async def test_one_round_trip_per_limited_request_and_scripts_reloaded(
    gateway: GatewayFactory,
    client: httpx.AsyncClient,
    redis: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key with tpm and a quota: each check carries the last answer's charge (one
    round trip per request, sequentially); a Redis that lost its scripts gets them
    again, and no charge is lost or counted twice on the way. The batch waits a minute
    here (not 50 ms), so a slow machine between two requests cannot send one early."""
    monkeypatch.setattr(redis_state, "CHARGE_EVERY", 60.0)
    limits = {"tpm": 1_000_000, "token_quota": {"tokens": 10**9, "period": "day"}}
    gw = await gateway(ROUTES, keys(**limits), state=redis.url)
    shared = gw.runtime.shared
    chat = f"{gw.base_url}/chat/completions"
    trips = gw.runtime.metrics.round_trips
    assert (await client.post(chat, json=CHAT, headers=TEAM)).status_code == 200
    start = trips.value
    for _ in range(10):
        assert (await client.post(chat, json=CHAT, headers=TEAM)).status_code == 200
    assert trips.value - start == 10  # 10 checks, each carrying the last charge
    redis.cli("script", "flush")  # the check's script: loaded again by the client
    assert (await client.post(chat, json=CHAT, headers=TEAM)).status_code == 200
    redis.cli("script", "flush")  # the batch's script: loaded again by flush()
    team = next(k for k in gw.runtime.config.keys.entries if k.name == "team")
    shared.charge(team, 6)
    assert await shared.flush()
    info = (await client.get(f"{gw.base_url}/key", headers=TEAM)).json()
    assert info["usage"]["day"]["requests"] == 12
    assert info["usage"]["day"]["tokens"] == 12 * 13 + 6


def test_serve_names_the_missing_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    from gateway import cli

    (tmp_path / "routes.yaml").write_text(ROUTES)
    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a)
    )
    code = cli.main(["serve", "--port", str(free_port()), "--state", "redis://127.0.0.1:1/0"])
    assert code == 1
    assert "pip install redis hiredis" in capsys.readouterr().err


@given(st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=20), st.integers()),
                min_size=1, max_size=12))  # fmt: skip
def test_pack_is_a_resp_array_of_bulk_strings(args: list[bytes | str | int]) -> None:
    import hiredis

    from gateway.state.pipeline import pack

    reader = hiredis.Reader()
    reader.feed(pack(*args))
    assert reader.gets() == [a if isinstance(a, bytes) else str(a).encode() for a in args]
    assert reader.gets() is False  # nothing left over


async def test_concurrent_calls_share_a_batch_and_an_error_reply_stays_its_own(
    redis: Redis,
) -> None:
    import redis.asyncio as aioredis
    from redis.exceptions import NoScriptError, ResponseError

    from gateway.state.pipeline import AutoPipeline, pack

    pool = aioredis.ConnectionPool.from_url(redis.url)
    batches: list[int] = []
    pipe = AutoPipeline(pool, 2.0, ResponseError, lambda: batches.append(1))
    try:
        calls = [pipe.call(pack("INCR", "n")) for _ in range(20)]
        calls.insert(7, pipe.call(pack("EVALSHA", "0" * 40, 0)))  # NOSCRIPT
        replies = await asyncio.gather(*calls, return_exceptions=True)
        assert isinstance(replies[7], NoScriptError)
        assert sorted(r for r in replies if isinstance(r, int)) == list(range(1, 21))
        assert len(batches) == 1  # 21 commands, one write, one round trip
        assert pipe.sender.value == "idle"
        # A connection lost mid-batch fails that batch, each caller told, none waiting.
        redis.stop()
        replies = await asyncio.gather(*(pipe.call(pack("INCR", "n")) for _ in range(5)),
                                       return_exceptions=True)  # fmt: skip
        assert all(isinstance(r, Exception) for r in replies)
        assert pipe.sender.value == "idle" and not pipe.queue
    finally:
        await pool.aclose()
