"""Observability: the access log, /metrics (one process and --workers 2), Server-Timing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayFactory, RunningGateway
from tests.helpers import free_port
from tests.scripted_upstream import DONE, Drop, Json, Sse, Upstream, chat_completion, chunk

ACCESS = "gateway.access"
UPSTREAM_SECRET_A = "sk-upstream-secret-aaaa"
UPSTREAM_SECRET_B = "sk-upstream-secret-bbbb"
SVC_SECRET = "sk-gw-svc-secret-0123456789abcdef"
LIM_SECRET = "sk-gw-lim-secret-fedcba9876543210"
WRONG_SECRET = "sk-gw-wrong-secret-not-a-key-42"
MSG = [{"role": "user", "content": "hello"}]
TIMING_ENTRY = re.compile(r"^([A-Za-z0-9_-]+);dur=([0-9]+(?:\.[0-9]+)?)$")


def sha(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def keys_yaml(svc: str = "", lim: str = "rpm: 1") -> str:
    svc_extra = f"    {svc}\n" if svc else ""
    return (
        "keys:\n"
        f"  - name: svc\n    sha256: {sha(SVC_SECRET)}\n{svc_extra}"
        f"  - name: lim\n    sha256: {sha(LIM_SECRET)}\n    {lim}\n"
    )


def two_providers(a: Upstream, b: Upstream | None = None, slug: str = "m") -> str:
    """Model `slug` on provider a (model-a), then b (model-b): fallback order."""
    text = (
        "providers:\n"
        f"  a:\n    base_url: {a.url}\n    api_key: {UPSTREAM_SECRET_A}\n"
        + (f"  b:\n    base_url: {b.url}\n    api_key: {UPSTREAM_SECRET_B}\n" if b else "")
        + f"models:\n  {slug}:\n    providers:\n      - provider: a\n        model: model-a\n"
    )
    if b is not None:
        text += "      - provider: b\n        model: model-b\n"
    return text


def auth(secret: str = SVC_SECRET) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def usage_chunk(prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "completion_tokens": completion}
    usage["total_tokens"] = prompt + completion
    return chunk(None, choices=[], usage=usage)


async def chat(
    client: httpx.AsyncClient,
    gw: RunningGateway,
    secret: str | None = SVC_SECRET,
    headers: dict[str, str] | None = None,
    **body: Any,
) -> httpx.Response:
    payload: dict[str, Any] = {"model": "m", "messages": MSG, **body}
    hdrs = {**(auth(secret) if secret else {}), **(headers or {})}
    return await client.post(f"{gw.base_url}/chat/completions", json=payload, headers=hdrs)


# --------------------------------------------------------------------------- access log


class AccessLog:
    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.caplog.records if r.name == ACCESS]

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for message in self.messages():
            assert "\n" not in message, f"an access line spans lines: {message!r}"
            parsed = json.loads(message)
            assert isinstance(parsed, dict), message
            out.append(parsed)
        return out

    def by_id(self, request_id: str) -> dict[str, Any]:
        found = [line for line in self.lines() if line.get("request_id") == request_id]
        assert len(found) == 1, f"{len(found)} access lines for {request_id}: {self.messages()}"
        return found[0]

    async def wait(self, count: int, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (a bound)
        """Bounded: until `count` access records exist (a disconnect is logged a bit later)."""
        deadline = time.monotonic() + timeout
        while len(self.messages()) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert len(self.messages()) == count, self.messages()

    def everything(self) -> str:
        """Every record of every logger, message and formatted text, as one string."""
        parts = [self.caplog.text]
        for r in self.caplog.records:
            parts.append(r.getMessage())
            parts.append(repr(r.args))
            parts.append(repr(getattr(r, "__dict__", {})))
        return "\n".join(parts)


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> AccessLog:
    logger = logging.getLogger(ACCESS)
    # Only gateway.telemetry.accesslog.configure() (serve) stops propagation; in-process it must flow
    # to the root logger where caplog listens, or these tests would see nothing.
    assert logger.propagate, "gateway.access does not propagate in-process: caplog sees nothing"
    caplog.set_level(logging.DEBUG)  # every logger: the secret checks read all of it
    caplog.set_level(logging.INFO, logger=ACCESS)
    return AccessLog(caplog)


def parse_log_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.tzinfo is not None, value
    return parsed


async def test_access_line_json_fields_of_a_served_request(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    upstream.script(Json(delay=0.3))
    gw = await gateway(two_providers(upstream), keys_yaml())
    before = datetime.now(UTC)
    r = await chat(
        client,
        gw,
        headers={"x-request-id": "obs-req-1", "x-session-id": "sess-header"},
        session_id="sess-body",
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "obs-req-1"
    await access.wait(1)
    line = access.by_id("obs-req-1")
    assert before.timestamp() - 1 <= parse_log_time(line["time"]).timestamp() <= time.time() + 1
    assert line["key"] == "svc"
    assert line["session_id"] == "sess-body"  # the body wins over the header
    assert line["slug"] == "m"
    assert line["provider"] == "a"
    assert line["upstream_model"] == "model-a"
    assert line["status"] == 200
    assert line["stream"] is False
    assert line["attempts"] == 1
    assert line["prompt_tokens"] == 5
    assert line["completion_tokens"] == 2
    assert line["client_disconnected"] is False
    assert isinstance(line["ttfb_ms"], int | float)
    assert isinstance(line["duration_ms"], int | float)
    assert line["ttfb_ms"] >= 250, line  # the upstream took 300 ms to answer
    assert line["duration_ms"] >= line["ttfb_ms"], line


async def test_access_line_session_from_header_and_minted_request_id(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    gw = await gateway(two_providers(upstream), keys_yaml())
    r1 = await chat(client, gw, headers={"x-session-id": "sess-from-header"})
    r2 = await chat(client, gw)
    assert r1.status_code == r2.status_code == 200
    await access.wait(2)
    l1 = access.by_id(r1.headers["x-request-id"])
    l2 = access.by_id(r2.headers["x-request-id"])
    assert r1.headers["x-request-id"] != r2.headers["x-request-id"]
    assert l1["session_id"] == "sess-from-header"
    assert l2["session_id"] is None


@pytest.mark.parametrize(
    ("headers", "session"),
    [
        ({"x-claude-code-session-id": "cc-1"}, "cc-1"),  # Claude Code
        ({"session-id": "codex-1", "thread-id": "codex-thread"}, "codex-1"),  # Codex
        ({"session_id": "codex-2"}, "codex-2"),
        ({"thread-id": "codex-thread"}, "codex-thread"),
        ({"x-session-id": "mine", "x-claude-code-session-id": "cc-2"}, "mine"),
    ],
)
async def test_access_line_session_from_the_agents_headers(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    access: AccessLog,
    headers: dict[str, str],
    session: str,
) -> None:
    """SPEC §14: the first of the body's session_id, then x-session-id,
    x-claude-code-session-id, session-id, session_id, thread-id."""
    gw = await gateway(two_providers(upstream), keys_yaml())
    r = await chat(client, gw, headers=headers)
    assert r.status_code == 200, r.text
    await access.wait(1)
    assert access.by_id(r.headers["x-request-id"])["session_id"] == session


async def test_access_line_of_a_stream_with_usage(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    upstream.script(Sse([chunk("a"), chunk("b"), usage_chunk(11, 3), DONE], first_delay=0.2))
    gw = await gateway(two_providers(upstream), keys_yaml())
    r = await chat(client, gw, stream=True)
    assert r.status_code == 200
    assert r.text.rstrip().endswith("data: [DONE]")
    await access.wait(1)
    line = access.by_id(r.headers["x-request-id"])
    assert line["stream"] is True
    assert line["status"] == 200
    assert line["provider"] == "a"
    assert line["upstream_model"] == "model-a"
    assert line["prompt_tokens"] == 11
    assert line["completion_tokens"] == 3
    assert line["client_disconnected"] is False
    assert line["ttfb_ms"] >= 150, line  # the first event came 200 ms after the head


async def test_access_line_of_a_stream_without_usage_has_no_token_counts(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    upstream.script(Sse([chunk("a"), DONE]))
    gw = await gateway(two_providers(upstream), keys_yaml())
    r = await chat(client, gw, stream=True)
    assert r.status_code == 200
    await access.wait(1)
    line = access.by_id(r.headers["x-request-id"])
    assert line.get("prompt_tokens") is None
    assert line.get("completion_tokens") is None


async def test_access_line_of_a_failover(
    gateway: GatewayFactory,
    make_upstream: Any,
    client: httpx.AsyncClient,
    access: AccessLog,
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.script(Json({"error": {"message": "boom"}}, status=500))
    gw = await gateway(two_providers(a, b), keys_yaml())
    r = await chat(client, gw)
    assert r.status_code == 200
    await access.wait(1)
    line = access.by_id(r.headers["x-request-id"])
    assert line["attempts"] == 2
    assert line["provider"] == "b"
    assert line["upstream_model"] == "model-b"
    assert line["status"] == 200


async def test_access_line_marks_a_client_that_left_mid_stream(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    upstream.script(Sse([chunk("a")] + [chunk("x")] * 100, delay=0.05))
    gw = await gateway(two_providers(upstream), keys_yaml())
    body = {"model": "m", "messages": MSG, "stream": True}
    url = f"{gw.base_url}/chat/completions"
    async with client.stream("POST", url, json=body, headers=auth()) as r:
        assert r.status_code == 200
        rid = r.headers["x-request-id"]
        async for part in r.aiter_raw():
            if part:
                break
    # Closing an unread stream drops the connection: the gateway notices and logs once.
    await access.wait(1)
    line = access.by_id(rid)
    assert line["client_disconnected"] is True
    assert line["stream"] is True
    assert line["status"] == 200
    assert line["provider"] == "a"


async def test_refused_requests_log_one_line_with_status_and_code(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    gw = await gateway(two_providers(upstream), keys_yaml())
    r401 = await chat(client, gw, secret=WRONG_SECRET)
    r422 = await client.post(f"{gw.base_url}/chat/completions", json={"model": "m"}, headers=auth())
    ok = await chat(client, gw, secret=LIM_SECRET)
    r429 = await chat(client, gw, secret=LIM_SECRET)
    assert (r401.status_code, r422.status_code, ok.status_code, r429.status_code) == (
        401,
        422,
        200,
        429,
    )
    await access.wait(4)
    expect = {
        r401: (401, "unauthorized", None),
        r422: (422, "validation_error", "svc"),
        r429: (429, "rate_limited", "lim"),
    }
    for resp, (status, code, key) in expect.items():
        line = access.by_id(resp.headers["x-request-id"])
        assert line["status"] == status, line
        assert line["code"] == code, line
        assert line["key"] == key, line
        assert isinstance(line["duration_ms"], int | float), line
        parse_log_time(line["time"])
    assert access.by_id(ok.headers["x-request-id"])["status"] == 200


async def test_secrets_never_reach_any_log_record(
    gateway: GatewayFactory,
    make_upstream: Any,
    client: httpx.AsyncClient,
    access: AccessLog,
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.script(
        Json(),
        Sse([chunk("a"), usage_chunk(1, 1), DONE]),
        Json({"error": {"message": "down"}}, status=503),
        Drop(),
    )
    gw = await gateway(two_providers(a, b), keys_yaml(svc="tpm: 100000"))
    results = [
        await chat(client, gw),
        await chat(client, gw, stream=True),
        await chat(client, gw),  # 503 on a, then b
        await chat(client, gw),  # dropped by a, then b
        await chat(client, gw, secret=WRONG_SECRET),
        await chat(client, gw, secret=LIM_SECRET),
        await chat(client, gw, secret=LIM_SECRET),  # 429
        await client.get(f"{gw.base_url}/models", headers=auth()),
    ]
    assert [r.status_code for r in results] == [200, 200, 200, 200, 401, 200, 429, 200]
    await access.wait(7)
    # The secrets were in play: the upstreams got their keys, the gateway its own.
    assert a.requests[0].header("authorization") == f"Bearer {UPSTREAM_SECRET_A}"
    assert b.requests[0].header("authorization") == f"Bearer {UPSTREAM_SECRET_B}"
    text = access.everything()
    for secret in (SVC_SECRET, LIM_SECRET, WRONG_SECRET, UPSTREAM_SECRET_A, UPSTREAM_SECRET_B):
        assert secret not in text, f"{secret} appears in the logs"
    for secret in (SVC_SECRET, LIM_SECRET):
        assert sha(secret) not in text
    assert {line["key"] for line in access.lines()} == {"svc", "lim", None}


def parse_text_line(message: str) -> dict[str, str]:
    fields = {}
    for token in shlex.split(message):
        name, sep, value = token.partition("=")
        assert sep, f"not a key=value pair: {token!r} in {message!r}"
        assert name not in fields, f"{name} twice in {message!r}"
        fields[name] = value
    return fields


async def test_text_format_is_key_value_pairs(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    gw = await gateway(two_providers(upstream), keys_yaml(), log_format="text")
    r = await chat(client, gw, headers={"x-request-id": "text-req-1"}, session_id="s1")
    refused = await chat(client, gw, secret=WRONG_SECRET, headers={"x-request-id": "text-req-2"})
    assert (r.status_code, refused.status_code) == (200, 401)
    await access.wait(2)
    served_msg, refused_msg = access.messages()
    for message in (served_msg, refused_msg):
        assert not message.lstrip().startswith("{"), message
        with pytest.raises(json.JSONDecodeError):
            json.loads(message)
    served = parse_text_line(served_msg)
    assert served["request_id"] == "text-req-1"
    assert served["key"] == "svc"
    assert served["session_id"] == "s1"
    assert served["slug"] == "m"
    assert served["provider"] == "a"
    assert served["upstream_model"] == "model-a"
    assert served["status"] == "200"
    assert served["attempts"] == "1"
    assert served["prompt_tokens"] == "5"
    assert served["completion_tokens"] == "2"
    assert float(served["duration_ms"]) >= 0
    assert float(served["ttfb_ms"]) >= 0
    parse_log_time(served["time"])
    bad = parse_text_line(refused_msg)
    assert bad["request_id"] == "text-req-2"
    assert bad["status"] == "401"
    assert bad["code"] == "unauthorized"


async def test_text_format_stays_one_line_with_a_hostile_session_id(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    """A client-chosen value must not forge fields or a second line in the text log."""
    hostile = "x key=admin status=200\nforged=line"
    gw = await gateway(two_providers(upstream), keys_yaml(), log_format="text")
    r = await chat(client, gw, session_id=hostile)
    assert r.status_code == 200
    await access.wait(1)
    (message,) = access.messages()
    assert "\n" not in message and "\r" not in message, f"the line was split: {message!r}"
    fields = parse_text_line(message)
    assert fields["key"] == "svc"
    assert fields["status"] == "200"
    assert "forged" not in fields


async def test_json_format_stays_one_line_with_a_hostile_session_id(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    hostile = 'x", "key": "admin"\nforged'
    gw = await gateway(two_providers(upstream), keys_yaml())
    r = await chat(client, gw, session_id=hostile)
    assert r.status_code == 200
    await access.wait(1)
    line = access.by_id(r.headers["x-request-id"])
    assert line["session_id"] == hostile
    assert line["key"] == "svc"


# --------------------------------------------------------------------------- metrics


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            (s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        ]

    def find(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        return [
            (lab, v)
            for n, lab, v in self.samples
            if n == name and all(lab.get(k) == want for k, want in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the matching samples; 0 when none match."""
        return sum(v for _, v in self.find(name, **labels))

    def table(self, name: str, *label_names: str) -> dict[tuple[str, ...], float]:
        """Every sample of `name`, keyed by the given labels' values (summed over others)."""
        out: dict[tuple[str, ...], float] = {}
        for labels, v in self.find(name):
            key = tuple(labels.get(n, "") for n in label_names)
            out[key] = out.get(key, 0.0) + v
        return out


async def scrape(client: httpx.AsyncClient, url: str) -> Scrape:
    r = await client.get(f"{url}/metrics")  # no key, even though keys are configured
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    assert "version=0.0.4" in r.headers["content-type"]
    return Scrape(r.text)


async def test_metrics_after_a_known_sequence(
    gateway: GatewayFactory, make_upstream: Any, client: httpx.AsyncClient
) -> None:
    a, b = await make_upstream(), await make_upstream()
    gw = await gateway(two_providers(a, b), keys_yaml(svc="tpm: 1000000"))

    for _ in range(3):
        assert (await chat(client, gw)).status_code == 200
    mid = await scrape(client, gw.url)
    assert mid.value("gateway_event_relay_delay_seconds_count") == 0  # no stream yet

    a.script(Sse([chunk("a"), chunk("b"), chunk("c"), usage_chunk(11, 3), DONE], delay=0.01))
    stream = await chat(client, gw, stream=True)
    assert stream.status_code == 200
    assert stream.text.count("data: ") == 4  # the injected usage chunk is hidden
    a.script(Json({"error": {"message": "boom"}}, status=500))
    failover = await chat(client, gw)
    assert failover.status_code == 200
    assert failover.headers["x-gateway-provider"] == "b"
    assert (await chat(client, gw, secret=WRONG_SECRET)).status_code == 401
    assert (await chat(client, gw, secret=LIM_SECRET)).status_code == 200
    assert (await chat(client, gw, secret=LIM_SECRET)).status_code == 429

    s = await scrape(client, gw.url)
    assert s.table("gateway_requests_total", "slug", "provider", "status", "stream") == {
        ("m", "a", "200", "false"): 4,
        ("m", "a", "200", "true"): 1,
        ("m", "b", "200", "false"): 1,
        ("(none)", "", "401", ""): 1,
        ("(none)", "", "429", ""): 1,
    }
    assert s.table("gateway_upstream_attempts_total", "provider") == {("a",): 6, ("b",): 1}
    assert s.table("gateway_failovers_total", "slug") == {("m",): 1}
    assert s.table("gateway_limit_rejections_total", "key", "limit") == {("lim", "rpm"): 1}
    # svc: 4 JSON answers with usage 5/2 (3 on a, 1 on b) and a stream with usage 11/3.
    assert s.value("gateway_tokens_total", key="svc", kind="prompt") == 4 * 5 + 11
    assert s.value("gateway_tokens_total", key="svc", kind="completion") == 4 * 2 + 3
    assert s.value("gateway_tokens_total", kind="estimated") == 0
    assert s.value("gateway_in_flight_requests") == 0
    assert s.find("gateway_in_flight_requests"), "the in-flight gauge is not exported"
    assert s.value("gateway_request_duration_seconds_count", slug="m") == 6
    assert s.value("gateway_request_duration_seconds_count") == 6
    assert s.value("gateway_time_to_first_byte_seconds_count", slug="m", provider="a") == 5
    assert s.value("gateway_time_to_first_byte_seconds_count", slug="m", provider="b") == 1
    assert s.value("gateway_event_relay_delay_seconds_count") > 0
    # Histograms are consistent: +Inf bucket == count.
    inf = s.value("gateway_request_duration_seconds_bucket", slug="m", le="+Inf")
    assert inf == 6
    # a failed once (below the breaker's 3), then served: both entries are up.
    assert s.table("gateway_provider_up", "provider", "model") == {
        ("a", "model-a"): 1,
        ("b", "model-b"): 1,
    }
    assert s.value("gateway_hedged_requests_total") == 0


async def test_in_flight_gauge_counts_a_running_stream(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Sse([chunk("a"), chunk("b"), DONE], delay=0.5))
    gw = await gateway(two_providers(upstream), keys_yaml())
    body = {"model": "m", "messages": MSG, "stream": True}
    async with (
        httpx.AsyncClient(timeout=10) as other,
        other.stream("POST", f"{gw.base_url}/chat/completions", json=body, headers=auth()) as r,
    ):
        assert r.status_code == 200
        during = await scrape(client, gw.url)
        await r.aread()
    after = await scrape(client, gw.url)
    assert during.value("gateway_in_flight_requests") == 1
    assert after.value("gateway_in_flight_requests") == 0


async def test_provider_up_is_0_once_the_breaker_opens(
    gateway: GatewayFactory, make_upstream: Any, client: httpx.AsyncClient
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.default = Json({"error": {"message": "down"}}, status=500)
    gw = await gateway(two_providers(a, b), keys_yaml())
    for i in range(2):
        assert (await chat(client, gw)).headers["x-gateway-provider"] == "b"
        s = await scrape(client, gw.url)
        assert s.value("gateway_provider_up", provider="a", model="model-a") == 1, i
    assert (await chat(client, gw)).status_code == 200  # third failure on a: it opens
    s = await scrape(client, gw.url)
    assert s.table("gateway_provider_up", "provider", "model") == {
        ("a", "model-a"): 0,
        ("b", "model-b"): 1,
    }
    assert len(a.requests) == 3
    r = await chat(client, gw)  # a is cooling down: straight to b
    assert r.headers["x-gateway-attempts"] == "1"
    assert len(a.requests) == 3
    s = await scrape(client, gw.url)
    assert s.value("gateway_provider_up", provider="a", model="model-a") == 0
    assert s.value("gateway_failovers_total", slug="m") == 3
    assert s.value("gateway_upstream_attempts_total", provider="a") == 3
    assert s.value("gateway_upstream_attempts_total", provider="b") == 4


async def test_tokens_metric_counts_usage_for_a_key_without_token_limits(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """The tokens metric is what an operator reads for usage and cost: every key's usage."""
    gw = await gateway(two_providers(upstream), keys_yaml())  # svc has no rpm/tpm/quota
    for _ in range(2):
        assert (await chat(client, gw)).status_code == 200
    s = await scrape(client, gw.url)
    assert s.value("gateway_tokens_total", key="svc", kind="prompt") == 10
    assert s.value("gateway_tokens_total", key="svc", kind="completion") == 4


async def test_metrics_needs_no_key_and_is_not_counted_or_logged(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, access: AccessLog
) -> None:
    gw = await gateway(two_providers(upstream), keys_yaml())
    assert (await client.get(f"{gw.base_url}/models")).status_code == 401  # keys are on
    for _ in range(3):
        s = await scrape(client, gw.url)
    assert s.value("gateway_requests_total") == 0
    assert access.messages() == []


# --------------------------------------------------------------------------- two workers


ECHO_ROUTES = """\
providers:
  echo:
    base_url: builtin:echo
models:
  echo:
    providers:
      - provider: echo
"""


def worker_request_counts(supervisor: int) -> dict[int, float] | None:
    """Per worker pid, gateway_requests_total from its metrics file (Linux /proc)."""
    try:
        children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    except OSError:
        return None
    counts: dict[int, float] = {}
    for pid in map(int, children):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        env = dict(item.decode(errors="replace").partition("=")[::2] for item in environ)
        directory = env.get("GATEWAY_METRICS_DIR")
        file = Path(directory or "/nonexistent") / f"metrics-{pid}.json"
        if not file.exists():
            continue
        lines = [json.loads(line) for line in file.read_text().splitlines() if line]
        counts[pid] = sum(
            row[-1] for name, rows in lines if name == "gateway_requests" for row in rows
        )
    return counts


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    (tmp_path / "keys.yaml").write_text(f"keys:\n  - name: svc\n    sha256: {sha(SVC_SECRET)}\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    args = ["--workers", "2", "--routes", "routes.yaml", "--keys", "keys.yaml"]
    with out.open("ab") as stdout, err.open("ab") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", *args, "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 15
        ready = False
        with httpx.Client(timeout=1) as c:
            while not ready and time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = c.get(f"{url}/healthz").status_code == 200
                except httpx.TransportError:
                    time.sleep(0.05)
        assert ready, f"gateway --workers 2 did not become healthy:\n{err.read_text()}"
        yield proc, url, tmp_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def test_metrics_and_access_log_with_two_workers(
    two_workers: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    proc, url, tmp_path = two_workers
    ids = []
    with httpx.Client(timeout=10, headers={"connection": "close"}) as c:
        for i in range(20):
            r = c.post(
                f"{url}/v1/chat/completions",
                json={"model": "echo", "messages": MSG, "stream": i % 4 == 0},
                headers=auth(),
            )
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-request-id"])
        # Each worker writes its values at most DUMP_AFTER seconds after they change, and
        # a scrape is answered by either worker: wait until eight in a row agree.
        deadline = time.monotonic() + 5
        while True:
            scrapes = []
            for _ in range(8):
                m = c.get(f"{url}/metrics")
                assert m.status_code == 200
                scrapes.append(Scrape(m.text))
            if time.monotonic() > deadline:
                break
            if all(s.value("gateway_requests_total") == 20 for s in scrapes):
                break
            time.sleep(0.05)
    for s in scrapes:
        assert s.value("gateway_requests_total", slug="echo") == 20, s.text
        assert s.table("gateway_requests_total", "slug", "provider", "status", "stream") == {
            ("echo", "echo", "200", "false"): 15,
            ("echo", "echo", "200", "true"): 5,
        }
        assert s.value("gateway_upstream_attempts_total", provider="echo") == 20
        assert s.value("gateway_request_duration_seconds_count", slug="echo") == 20
        assert s.value("gateway_time_to_first_byte_seconds_count", slug="echo") == 20
        assert s.value("gateway_event_relay_delay_seconds_count") > 0
        assert s.value("gateway_in_flight_requests") == 0
        assert s.value("gateway_provider_up", provider="echo") == 1
    per_worker = worker_request_counts(proc.pid)
    if per_worker is not None:
        assert len(per_worker) == 2, f"expected 2 workers writing metric files: {per_worker}"
        assert sum(per_worker.values()) == 20, per_worker

    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    stdout = (tmp_path / "stdout.log").read_text()
    lines = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    # One line per chat request; /healthz and /metrics are not logged.
    assert len(lines) == 20, stdout
    assert sorted(line["request_id"] for line in lines) == sorted(ids)
    assert {line["key"] for line in lines} == {"svc"}
    assert sum(line["stream"] is True for line in lines) == 5
    assert SVC_SECRET not in stdout + (tmp_path / "stderr.log").read_text()


# --------------------------------------------------------------------------- Server-Timing


def server_timing(r: httpx.Response) -> dict[str, float]:
    header = r.headers.get("server-timing")
    assert header is not None, f"no Server-Timing on {r.status_code} {r.request.url}"
    out = {}
    for entry in header.split(","):
        match = TIMING_ENTRY.fullmatch(entry.strip())
        assert match, f"bad Server-Timing entry {entry!r} in {header!r}"
        out[match[1]] = float(match[2])
    assert all(v >= 0 for v in out.values()), header
    return out


async def test_server_timing_on_relayed_json_and_sse(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Json(), Sse([chunk("a"), chunk("b"), DONE]), Json(delay=0.3))
    gw = await gateway(two_providers(upstream), keys_yaml())
    fast = await chat(client, gw)
    stream = await chat(client, gw, stream=True)
    slow = await chat(client, gw)
    assert [r.status_code for r in (fast, stream, slow)] == [200, 200, 200]
    assert stream.headers["content-type"].startswith("text/event-stream")
    for r in (fast, stream, slow):
        timing = server_timing(r)
        assert set(timing) == {"gateway", "upstream"}, r.headers["server-timing"]
    assert server_timing(fast)["upstream"] < 250
    assert server_timing(slow)["upstream"] >= 250, slow.headers["server-timing"]
    assert server_timing(slow)["gateway"] >= 250, slow.headers["server-timing"]


async def test_server_timing_on_a_failover_and_a_relayed_client_error(
    gateway: GatewayFactory, make_upstream: Any, client: httpx.AsyncClient
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.script(Json({"error": {"message": "x"}}, status=500), Json({"error": "no"}, status=400))
    b.script(Json(delay=0.3))
    gw = await gateway(two_providers(a, b), keys_yaml())
    failover = await chat(client, gw)
    relayed = await chat(client, gw)
    assert (failover.status_code, relayed.status_code) == (200, 400)
    assert server_timing(failover)["upstream"] >= 250  # the serving attempt's own wait
    assert set(server_timing(relayed)) == {"gateway", "upstream"}


async def test_server_timing_on_gateway_errors(
    gateway: GatewayFactory, make_upstream: Any, client: httpx.AsyncClient
) -> None:
    a = await make_upstream()
    a.default = Json({"error": {"message": "down"}}, status=503)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    routes = two_providers(a).replace(
        "models:\n", f"  d:\n    base_url: {dead}\n    api_key: {UPSTREAM_SECRET_B}\nmodels:\n"
    )
    routes += "  gone:\n    providers:\n      - provider: d\n"
    gw = await gateway(routes, keys_yaml())
    responses = {
        "401": await chat(client, gw, secret=WRONG_SECRET),
        "422": await client.post(
            f"{gw.base_url}/chat/completions", json={"model": "m"}, headers=auth()
        ),
        "400 unknown model": await chat(client, gw, model="nope"),
        "400 not json": await client.post(
            f"{gw.base_url}/chat/completions", content=b"{", headers=auth()
        ),
        "503 relayed from upstream": await chat(client, gw),
        "502 unreachable": await chat(client, gw, model="gone"),
        "lim, 503 from a": await chat(client, gw, secret=LIM_SECRET),
        "429": await chat(client, gw, secret=LIM_SECRET),
    }
    assert {k: r.status_code for k, r in responses.items()} == {
        "401": 401,
        "422": 422,
        "400 unknown model": 400,
        "400 not json": 400,
        "503 relayed from upstream": 503,
        "502 unreachable": 502,
        "lim, 503 from a": 503,
        "429": 429,
    }
    for name, r in responses.items():
        assert "gateway" in server_timing(r), name


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/metrics", 200),
        ("GET", "/v1/models", 200),
        ("GET", "/v1/nope", 404),
        ("GET", "/v1/chat/completions", 405),
    ],
)
async def test_server_timing_on_every_other_response(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    method: str,
    path: str,
    status: int,
) -> None:
    """The issue: 'Every response carries a Server-Timing header'."""
    gw = await gateway(two_providers(upstream), keys_yaml())
    r = await client.request(method, f"{gw.url}{path}", headers=auth())
    assert r.status_code == status
    assert "gateway" in server_timing(r)


@pytest.mark.parametrize(
    ("usage", "read", "written", "uncached"),
    [
        ({"prompt_tokens": 100, "completion_tokens": 2, "total_tokens": 102,
          "prompt_tokens_details": {"cached_tokens": 80}}, 80, 0, 20),
        ({"input_tokens": 4, "output_tokens": 2, "cache_read_input_tokens": 90,
          "cache_creation_input_tokens": 30}, 90, 30, 4),
    ],
)  # fmt: skip
async def test_prompt_cache_tokens_reach_the_metric_and_the_log(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    access: AccessLog,
    usage: dict[str, Any],
    read: int,
    written: int,
    uncached: int,
) -> None:
    """SPEC §14: gateway_prompt_tokens_total{key,slug,provider,kind} and the access log's
    cache_read_tokens / cache_write_tokens, from OpenAI's and Anthropic's usage."""
    upstream.script(Json({**chat_completion(), "usage": usage}))
    gw = await gateway(two_providers(upstream), keys_yaml())
    r = await chat(client, gw)
    assert r.status_code == 200, r.text
    await access.wait(1)
    line = access.by_id(r.headers["x-request-id"])
    assert (line["cache_read_tokens"], line["cache_write_tokens"]) == (read, written)
    text = (await client.get(f"{gw.url}/metrics")).text
    for kind, count in (("cache_read", read), ("cache_write", written), ("uncached", uncached)):
        series = f'gateway_prompt_tokens_total{{key="svc",slug="m",provider="a",kind="{kind}"}}'
        if count:
            assert f"{series} {float(count)}" in text or f"{series} {count}" in text, text
        else:
            assert series not in text
