"""SPEC §13, the upstream side: what reaches the provider and what reaches the client.

One header policy (gateway/upstream/head.py) for every family path and the by-id paths:
account-steering and cloud-credential headers never reach the provider unless it lists
them in `forward_headers`; headers that speak for the gateway, and trailer fields, never
reach the client from the upstream. Bodies are decoded whole or answered 502. OAuth2
token endpoint errors are said by their code alone. A base_url never carries a password.
The provider's query wins on the by-id Responses paths. Real sockets on 127.0.0.1 with the
scriptable upstream (tests/scripted_upstream.py); config and pure functions from values.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest
import yaml

from gateway.upstream.client import Decoder
from gateway.upstream.connection import AWAIT_HEAD, MAX_HEAD_BYTES, ConnectionLost, H1Connection
from gateway.upstream.head import join_query, prepare, request_head, response_headers
from tests.config.test_config import assert_problems, routes_of
from tests.conftest import GatewayFactory, RunningGateway
from tests.helpers import assert_envelope
from tests.scripted_upstream import DONE, Json, Raw, Sse, Upstream, chat_completion, chunk

MESSAGES = [{"role": "user", "content": "hi"}]
KiB = 1024

# What a tenant may send to steer the provider account or pass cloud credentials.
STEERING = {
    "OpenAI-Organization": "org-tenant",
    "OpenAI-Project": "proj-tenant",
    "x-goog-user-project": "tenant-gcp-project",
    "x-goog-api-key": "AIza-tenant-key",
    "x-amz-security-token": "tenant-session-token",
    "x-amz-date": "20260101T000000Z",
}
STEERING_NAMES = {name.lower() for name in STEERING}


def routes(upstream: Upstream, **provider: Any) -> str:
    """One provider `p` at the upstream (with these extra fields), one model `m`."""
    p = {"base_url": upstream.url, "api_key": "sk-upstream-secret", **provider}
    models = {"m": {"providers": [{"provider": "p", "model": "upstream-model"}]}}
    return yaml.safe_dump({"providers": {"p": p}, "models": models}, sort_keys=False)


def response_obj(rid: str) -> dict[str, Any]:
    return {"id": rid, "object": "response", "model": "upstream-model", "status": "completed",
            "output": [], "usage": None}  # fmt: skip


async def chat(client: httpx.AsyncClient, gw: RunningGateway, **kw: Any) -> httpx.Response:
    body = {"model": "m", "messages": MESSAGES, **kw.pop("body", {})}
    return await client.post(f"{gw.base_url}/chat/completions", json=body, **kw)


# ------------------------------------------------------------- what reaches the provider


async def test_steering_headers_never_reach_the_upstream_on_any_path(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """Chat, embeddings, a Responses create and its four by-id paths: each request the
    upstream gets lacks every steering header; the client's other headers pass."""
    gw = await gateway(routes(upstream))
    headers = {**STEERING, "x-team": "search"}
    upstream.script(
        Json(chat_completion()),
        Json({"object": "list", "data": [], "model": "upstream-model"}),
        Json(response_obj("resp_1")),
        Json(response_obj("resp_1")),
        Json({"object": "list", "data": []}),
        Json(response_obj("resp_1")),
        Json({"id": "resp_1", "object": "response.deleted", "deleted": True}),
    )
    base = gw.base_url
    answers = [
        await chat(client, gw, headers=headers),
        await client.post(f"{base}/embeddings", json={"model": "m", "input": "x"},
                          headers=headers),
        await client.post(f"{base}/responses", json={"model": "m", "input": "x"},
                          headers=headers),
        await client.get(f"{base}/responses/resp_1", headers=headers),
        await client.get(f"{base}/responses/resp_1/input_items", headers=headers),
        await client.post(f"{base}/responses/resp_1/cancel", headers=headers),
        await client.delete(f"{base}/responses/resp_1", headers=headers),
    ]  # fmt: skip
    assert [r.status_code for r in answers] == [200] * 7, [r.text for r in answers]
    seen = [(r.method, r.path) for r in upstream.requests]
    assert seen == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/responses"),
        ("GET", "/v1/responses/resp_1"),
        ("GET", "/v1/responses/resp_1/input_items"),
        ("POST", "/v1/responses/resp_1/cancel"),
        ("DELETE", "/v1/responses/resp_1"),
    ]
    for req in upstream.requests:
        names = {name for name, _ in req.headers}
        assert not names & STEERING_NAMES, (req.path, req.headers)
        values = " ".join(value for _, value in req.headers)
        for value in STEERING.values():
            assert value not in values, (req.path, value)
        assert req.header("x-team") == "search"


async def test_forward_headers_lets_the_listed_ones_through(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """Listed names pass (case-insensitively, an x-amz-* one too), the others stay out."""
    gw = await gateway(routes(upstream, forward_headers=["OpenAI-Project", "X-Amz-Date"]))
    r = await chat(client, gw, headers=STEERING)
    assert r.status_code == 200, r.text
    req = upstream.requests[-1]
    assert req.header("openai-project") == "proj-tenant"
    assert req.header("x-amz-date") == "20260101T000000Z"
    names = {name for name, _ in req.headers}
    assert not names & (STEERING_NAMES - {"openai-project", "x-amz-date"}), req.headers
    assert [v for k, v in req.headers if k == "authorization"] == ["Bearer sk-upstream-secret"]


def test_forward_headers_cannot_bring_back_credentials_or_hop_by_hop() -> None:
    text = """\
providers:
  p:
    base_url: http://127.0.0.1:9/v1
    headers: {OpenAI-Organization: org-gateway}
    forward_headers: [Authorization, cookie, X-API-Key, connection, transfer-encoding,
                      host, "x-amz-*", openai-organization, "bad name", openai-project]
  q:
    base_url: http://127.0.0.1:9/v1
    forward_headers: openai-project
  r:
    base_url: http://127.0.0.1:9/v1
    forward_header: [openai-project]
models:
  m: {providers: [{provider: p}, {provider: q}, {provider: r}]}
"""
    parsed, problems = routes_of(text)
    assert_problems(
        problems,
        [
            (5, "'Authorization' is a credential or hop-by-hop header"),
            (5, "'cookie' is a credential or hop-by-hop header"),
            (5, "'X-API-Key' is a credential or hop-by-hop header"),
            (5, "'connection' is a credential or hop-by-hop header"),
            (5, "'transfer-encoding' is a credential or hop-by-hop header"),
            (5, "'host' is a credential or hop-by-hop header"),
            (5, "'x-amz-*' is not a header name"),
            (5, "'openai-organization' is set by the provider's headers"),
            (5, "'bad name' is not a header name"),
            (9, "forward_headers must be a list"),
            (12, "forward_header"),  # unknown keys stay errors
        ],
    )
    assert parsed.providers["p"].forward_headers == frozenset({"openai-project"})


def test_request_head_filter_from_values() -> None:
    """The table, directly: drop, forward when listed, own headers win, SigV4's names
    never come from the client of an aws provider."""
    text = """\
providers:
  plain: {base_url: "http://up:8080/v1", api_key: k, forward_headers: [x-goog-user-project]}
  custom: {base_url: "http://up/v1", api_key: k, auth: {header: x-my-key}}
  bedrock:
    base_url: https://bedrock-runtime.us-east-1.amazonaws.com/openai/v1
    auth: {aws: {region: us-east-1}}
    forward_headers: [x-amz-date, x-amz-bedrock-trace]
models:
  m: {providers: [{provider: plain}, {provider: custom}, {provider: bedrock}]}
"""
    parsed, problems = routes_of(text)
    assert problems == []
    client = [(name.lower().encode(), value.encode()) for name, value in STEERING.items()]
    client += [(b"x-my-key", b"tenant"), (b"x-amz-bedrock-trace", b"on"), (b"x-team", b"a")]

    plain = request_head(prepare(parsed.providers["plain"]), "/x", client, 2)
    assert b"x-goog-user-project: tenant-gcp-project\r\n" in plain
    assert b"x-team: a\r\n" in plain and b"x-my-key: tenant\r\n" in plain
    for name in STEERING_NAMES - {"x-goog-user-project"}:
        assert b"\r\n" + name.encode() + b":" not in plain, name
    custom = request_head(prepare(parsed.providers["custom"]), "/x", client, 2)
    assert custom.count(b"x-my-key:") == 1 and b"x-my-key: k\r\n" in custom
    bedrock = request_head(prepare(parsed.providers["bedrock"]), "/x", client, 2)
    assert b"x-amz-bedrock-trace: on\r\n" in bedrock
    assert b"x-amz-date" not in bedrock  # the signature's own, listed or not
    assert b"x-amz-security-token" not in bedrock


def test_join_query_provider_wins_client_order_and_repeats_kept() -> None:
    text = """\
providers:
  azure: {base_url: "http://up/openai/v1", api_key: k, query: {api-version: preview}}
  none: {base_url: "http://up/v1", api_key: k}
models:
  m: {providers: [{provider: azure}, {provider: none}]}
"""
    parsed, _ = routes_of(text)
    azure, none = prepare(parsed.providers["azure"]), prepare(parsed.providers["none"])
    assert join_query(azure, "/chat/completions") == "/chat/completions?api-version=preview"
    path = "/responses/r/input_items?limit=5&api-version=evil&include[]=a&after=x&include[]=b"
    assert join_query(azure, path) == (
        "/responses/r/input_items?limit=5&include[]=a&after=x&include[]=b&api-version=preview"
    )
    # A name percent-encoded or with a `+` still names the provider's parameter.
    assert join_query(azure, "/responses/r?api%2Dversion=x&api-version&limit=1") == (
        "/responses/r?limit=1&api-version=preview"
    )
    assert join_query(azure, "/responses/r?api-version=evil") == "/responses/r?api-version=preview"
    assert join_query(none, "/responses/r?limit=1&limit=2") == "/responses/r?limit=1&limit=2"
    assert join_query(none, "/responses/r") == "/responses/r"
    head = request_head(azure, path, [], 0, b"GET")
    assert head.startswith(
        b"GET /openai/v1/responses/r/input_items?limit=5&include[]=a&after=x&include[]=b"
        b"&api-version=preview HTTP/1.1\r\n"
    )


async def test_provider_query_wins_on_the_by_id_paths(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream, query={"api-version": "2025-04-01-preview"}))
    upstream.script(Json(response_obj("resp_q")))
    r = await client.post(f"{gw.base_url}/responses", json={"model": "m", "input": "x"})
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].query == "api-version=2025-04-01-preview"
    query = "api-version=tenant&limit=5&after=item_1&include[]=a&include[]=b"
    for method, tail in [("GET", ""), ("GET", "/input_items"), ("POST", "/cancel"),
                         ("DELETE", "")]:  # fmt: skip
        upstream.script(Json(response_obj("resp_q")))
        url = f"{gw.base_url}/responses/resp_q{tail}?{query}"
        r = await client.request(method, url)
        assert r.status_code == 200, r.text
        got = upstream.requests[-1]
        assert (got.method, got.path) == (method, f"/v1/responses/resp_q{tail}")
        assert parse_qsl(got.query) == [
            ("limit", "5"),
            ("after", "item_1"),
            ("include[]", "a"),
            ("include[]", "b"),
            ("api-version", "2025-04-01-preview"),
        ], got.query


# --------------------------------------------------------------- what reaches the client

FORGED = [
    ("x-gateway-cost-usd", "0.000000"),
    ("x-gateway-provider", "someone-else"),
    ("x-gateway-attempts", "9"),
    ("x-ratelimit-remaining-requests", "4999"),
    ("x-ratelimit-limit-tokens", "2000000"),
    ("server-timing", "db;dur=53"),
    ("x-upstream-model", "forged-model"),
    ("openai-processing-ms", "12"),
]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_upstream_headers_that_speak_for_the_gateway_are_dropped(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, stream: bool
) -> None:
    keys = yaml.safe_dump({"keys": [{"name": "t", "key": "sk-tenant", "rpm": 60}]})
    priced = {"provider": "p", "model": "upstream-model", "price": {"input": 1e5, "output": 1e5}}
    text = yaml.safe_dump({"providers": {"p": {"base_url": upstream.url, "api_key": "sk-up"}},
                           "models": {"m": {"providers": [priced]}}})  # fmt: skip
    gw = await gateway(text, keys)
    if stream:
        upstream.script(Sse([chunk("hi"), chunk(usage={"prompt_tokens": 1, "completion_tokens": 1,
                                                       "total_tokens": 2}), DONE], headers=FORGED))  # fmt: skip
    else:
        upstream.script(Json(chat_completion(), headers=FORGED))
    r = await chat(
        client, gw, body={"stream": stream}, headers={"authorization": "Bearer sk-tenant"}
    )
    assert r.status_code == 200, r.text
    h = r.headers
    assert h.get_list("x-gateway-provider") == ["p"]
    assert h.get_list("x-gateway-attempts") == ["1"]
    assert h.get_list("x-upstream-model") == ["upstream-model"]
    # The gateway's own price of the answer, or none where the head left before usage.
    costs = h.get_list("x-gateway-cost-usd")
    assert costs == ([] if stream else ["0.7"]), costs
    # The key's own limits, never the provider account's.
    assert h.get_list("x-ratelimit-limit-requests") == ["60"]
    assert "x-ratelimit-limit-tokens" not in h
    assert "4999" not in h.get_list("x-ratelimit-remaining-requests")
    timing = h.get_list("server-timing")
    assert len(timing) == 1 and timing[0].startswith("gateway;dur=") and "db" not in timing[0]
    assert h["openai-processing-ms"] == "12"  # the provider's own news still passes


def test_response_headers_table_from_values() -> None:
    raw = [(name.encode(), value.encode()) for name, value in FORGED]
    raw += [(b"x-request-id", b"up-1"), (b"x-gateway-anything", b"x"), (b"trailer", b"x-t")]
    out = dict(response_headers(raw))
    assert out == {b"openai-processing-ms": b"12", b"x-upstream-request-id": b"up-1"}


def trailered(body: bytes, ctype: bytes, trailers: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\ntransfer-encoding: chunked\r\n"
        b"trailer: x-checksum, x-gateway-cost-usd\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n" % (len(body), body)
        + trailers
        + b"\r\n"
    )


TRAILERS = b"x-checksum: abc123\r\nx-gateway-cost-usd: 99\r\nx-ratelimit-remaining-requests: 7\r\n"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_trailer_fields_never_become_headers(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, stream: bool
) -> None:
    """The whole answer in one write: the trailers are parsed before the response's
    headers are read, where they used to join them."""
    if stream:
        data = trailered(chunk("hi") + DONE, b"text/event-stream", TRAILERS)
    else:
        data = trailered(json.dumps(chat_completion()).encode(), b"application/json", TRAILERS)
    upstream.script(Raw(data))
    gw = await gateway(routes(upstream))
    r = await chat(client, gw, body={"stream": stream})
    assert r.status_code == 200, r.text
    for name in ("x-checksum", "x-gateway-cost-usd", "x-ratelimit-remaining-requests", "trailer"):
        assert name not in r.headers, (name, r.headers)
    if stream:
        assert b'"content": "hi"' in r.content and r.content.endswith(DONE)
    else:
        assert r.json()["choices"][0]["message"]["content"] == "hi"


def fed(data: bytes) -> H1Connection:
    conn = H1Connection()
    conn.state = AWAIT_HEAD  # as send() leaves it
    conn.data_received(data)
    return conn


def test_trailers_are_dropped_and_bounded_on_the_connection() -> None:
    conn = fed(trailered(b"{}", b"application/json", TRAILERS))
    assert conn.ended and conn.error is None
    assert [name for name, _ in conn.headers] == [b"content-type", b"transfer-encoding",
                                                  b"trailer"]  # fmt: skip
    endless = b"".join(b"x-t%d: %s\r\n" % (i, b"v" * 100) for i in range(MAX_HEAD_BYTES // 100))
    conn = fed(trailered(b"{}", b"application/json", endless))
    assert conn.error is not None and "trailer" in str(conn.error)


# ----------------------------------------------------------------------- whole or 502


def gz(text: bytes) -> bytes:
    return gzip.compress(text, mtime=0)


def members(body: bytes, parts: int) -> bytes:
    """`body` as `parts` gzip members, one after another (RFC 1952 §2.2)."""
    step = -(-len(body) // parts)
    return b"".join(gz(body[i : i + step]) for i in range(0, len(body), step))


def gzipped(payload: bytes, status: int = 200, coding: str = "gzip") -> Json:
    return Json(payload, status=status, headers=[("content-encoding", coding)])


def decode_in_reads(decoder: Decoder, data: bytes, cuts: list[int], step: int) -> bytes:
    """What H1Response does: each read decoded in steps of at most `step` bytes out."""
    out = []
    bounds = [0, *cuts, len(data)]
    for start, end in itertools.pairwise(bounds):
        pending = data[start:end]
        while pending:
            chunk, pending = decoder.decode(pending, step)
            out.append(chunk)
    out.append(decoder.finish())
    return b"".join(out)


def test_decoder_output_does_not_depend_on_how_the_body_was_split() -> None:
    body = bytes(range(256)) * 40
    data = members(body, 3)
    for cut in range(1, len(data), 7):
        for step in (1 << 20, 100):
            assert decode_in_reads(Decoder(gzip=True), data, [cut], step) == body, (cut, step)
    assert decode_in_reads(Decoder(gzip=True), data, list(range(1, len(data))), 64) == body
    with pytest.raises(ConnectionLost, match="truncated"):
        decode_in_reads(Decoder(gzip=True), data[:-1], [len(data) // 2], 100)
    deflated = zlib.compress(body)
    assert decode_in_reads(Decoder(gzip=False), deflated, [5], 100) == body
    with pytest.raises(ConnectionLost, match="after the end"):
        decode_in_reads(Decoder(gzip=False), deflated + b"x", [len(deflated)], 100)
    assert decode_in_reads(Decoder(gzip=True), b"", [], 100) == b""  # an empty body


async def test_multi_member_gzip_is_decoded_whole(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream))
    body = json.dumps(chat_completion(content="one two three " * 50)).encode()
    assert zlib.decompressobj(31).decompress(members(body, 2)) != body  # the old truncation
    upstream.script(gzipped(members(body, 2)), gzipped(members(body, 7)))
    for _ in range(2):
        r = await chat(client, gw)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "one two three " * 50
        assert "content-encoding" not in r.headers


async def test_multi_member_gzip_stream_is_relayed_whole(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """Each event its own member, as a server that compresses per flush sends them."""
    events = [chunk("one"), chunk(" two"), chunk(" three"), DONE]
    upstream.script(Sse([gz(e) for e in events], headers=[("content-encoding", "gzip")]))
    gw = await gateway(routes(upstream))
    r = await chat(client, gw, body={"stream": True})
    assert r.status_code == 200, r.text
    assert r.content.count(b"data: ") == 4 and r.content.endswith(DONE)
    texts = [json.loads(line[6:])["choices"][0]["delta"]["content"]
             for line in r.content.split(b"\n\n") if line.startswith(b"data: {")]  # fmt: skip
    assert "".join(texts) == "one two three"


BODY = json.dumps(chat_completion(content="x" * 2000)).encode()
BROKEN = {
    "truncated": gz(BODY)[:-10],
    "truncated-second-member": gz(BODY[:100]) + gz(BODY[100:])[:-5],
    "garbage-after": gz(BODY) + b"garbage",
    "bad-second-member": gz(BODY[:100]) + b"\x1f\x8b\x08\x00" + b"\xff" * 40,
    "corrupt": gz(BODY)[:20] + b"\x00" * 40 + gz(BODY)[60:],
}


@pytest.mark.parametrize("payload", BROKEN.values(), ids=BROKEN.keys())
async def test_a_body_that_does_not_decode_to_its_end_is_502(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, payload: bytes
) -> None:
    upstream.script(gzipped(payload))
    gw = await gateway(routes(upstream))
    r = await chat(client, gw)
    err = assert_envelope(r, 502, "upstream_unavailable")
    assert "could not be decoded" in err["details"]["cause"]
    assert "xxxx" not in r.text and "Error -3" not in r.text  # nothing of it, no zlib text


async def test_deflate_with_bytes_after_its_end_is_502(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(gzipped(zlib.compress(BODY) + zlib.compress(b"{}"), coding="deflate"),
                    gzipped(zlib.compress(BODY), coding="deflate"))  # fmt: skip
    gw = await gateway(routes(upstream))
    assert_envelope(await chat(client, gw), 502, "upstream_unavailable")
    r = await chat(client, gw)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "x" * 2000


async def test_a_stream_that_stops_decoding_ends_with_an_error_event(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    events = [gz(chunk("one")), gz(chunk(" two")), gz(chunk(" three"))[:-14]]
    upstream.script(Sse(events, headers=[("content-encoding", "gzip")]))
    gw = await gateway(routes(upstream))
    r = await chat(client, gw, body={"stream": True})
    assert r.status_code == 200
    blocks = [b for b in r.content.split(b"\n\n") if b]
    assert b'"one"' in blocks[0] and b'" two"' in blocks[1]
    last = json.loads(blocks[-1][len(b"data: ") :])
    assert last["error"]["code"] == "upstream_disconnected", last
    assert b"[DONE]" not in r.content and b"three" not in r.content


async def test_the_response_limit_counts_every_member(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """No zip bomb through many members: 200 members of 1 KiB each against 64 KiB."""
    pad = b" " * KiB
    payload = (
        gz(b'{"object": "chat.completion", "model": "upstream-model", "pad": "')
        + b"".join(gz(pad) for _ in range(200))
        + gz(b'"}')
    )
    upstream.script(gzipped(payload), gzipped(members(BODY, 30)))
    gw = await gateway(routes(upstream), max_response_bytes=64 * KiB)
    assert_envelope(await chat(client, gw), 502, "upstream_response_too_large")
    r = await chat(client, gw)  # under the limit across 30 members: whole
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "x" * 2000


# ------------------------------------------------------------------------- OAuth2 errors

SECRET = "cs-tenancy-client-secret-77"


def echoing_error(code: str) -> Json:
    """An IdP that explains too much: a description with a line break and the secret,
    and the whole form echoed back."""
    return Json(
        {
            "error": code,
            "error_description": f"AADSTS7000215: bad secret\n2026-12-07 INFO forged {SECRET}",
            "error_uri": f"https://login.example/error?secret={SECRET}",
            "request": f"grant_type=client_credentials&client_id=gw&client_secret={SECRET}",
        },
        status=401,
    )


@pytest.mark.parametrize(
    ("code", "shown"),
    [("invalid_client", "invalid_client"), (f"invalid_client\nforged {SECRET}", "no code"),
     ("Invalid-Client", "no code"), ("x" * 65, "no code")],
    ids=["code", "code-with-newline-and-secret", "not-a-code", "too-long"],
)  # fmt: skip
async def test_oauth2_errors_reach_logs_and_console_only_as_their_code(
    gateway: GatewayFactory,
    make_upstream: Any,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    code: str,
    shown: str,
) -> None:
    upstream, tokens, plain = await make_upstream(), await make_upstream(), await make_upstream()
    tokens.default = echoing_error(code)
    auth = {"oauth2": {"token_url": f"http://127.0.0.1:{tokens.port}/token",
                       "client_id": "gw", "client_secret": SECRET}}  # fmt: skip
    providers = {"p": {"base_url": upstream.url, "auth": auth},
                 "plain": {"base_url": plain.url, "api_key": "sk-plain"}}  # fmt: skip
    models = {"m": {"providers": [{"provider": "p", "model": "upstream-model"},
                                  {"provider": "plain", "model": "upstream-model"}]}}  # fmt: skip
    gw = await gateway(yaml.safe_dump({"providers": providers, "models": models}))
    caplog.set_level(logging.DEBUG)
    r = await chat(client, gw)
    assert r.status_code == 200 and r.headers["x-gateway-provider"] == "plain", r.text
    assert len(tokens.requests) == 1 and SECRET.encode() in tokens.requests[0].body
    assert upstream.requests == []

    console = (await client.get(f"{gw.url}/console/data")).text
    logged = [record.getMessage() for record in caplog.records]
    logged += [str(record.args) for record in caplog.records]
    for text in [*logged, console, r.text]:
        assert SECRET not in text and "forged" not in text and "AADSTS" not in text, text
    assert any(f"token endpoint answered 401 ({shown})" in m for m in logged), logged
    assert f"token endpoint answered 401 ({shown})" in console


# ------------------------------------------------------------------ a base_url's password


def test_a_password_in_base_url_is_a_problem_that_does_not_print_it() -> None:
    os.environ["TENANCY_BASE"] = "https://svc:env-pass-9@api.example.com/v1"
    try:
        text = """\
providers:
  a:
    base_url: https://user:hunter2-pw@api.example.com/v1
  b:
    base_url: https://only-user@api.example.com/v1
  c:
    base_url: ${TENANCY_BASE}
  d:
    base_url: ftp://user:ftp-pw@api.example.com/v1
  e:
    base_url: https://api.example.com:99999/v1
models:
  m: {providers: [{provider: a}, {provider: b}, {provider: c}, {provider: d}, {provider: e}]}
"""
        _, problems = routes_of(text)
    finally:
        del os.environ["TENANCY_BASE"]
    assert_problems(
        problems,
        [
            (3, "must not carry a user or password"),
            (5, "must not carry a user or password"),
            (7, "must not carry a user or password"),
            (9, "must start with http:// or https://, got 'ftp://api.example.com/v1'"),
            (11, "not a valid URL"),
        ],
    )
    for problem in problems:
        for secret in ("hunter2-pw", "env-pass-9", "ftp-pw", "only-user"):
            assert secret not in str(problem), problem


@pytest.mark.parametrize("command", ["check", "serve"])
def test_check_and_start_refuse_a_password_in_base_url(tmp_path: Path, command: str) -> None:
    (tmp_path / "routes.yaml").write_text(
        "providers:\n  p:\n    base_url: http://gw:s3cr3t-pw@127.0.0.1:9/v1\n"
        "models:\n  m: {providers: [{provider: p}]}\n"
    )
    (tmp_path / "keys.yaml").write_text("")
    args = ["--routes", "routes.yaml", "--keys", "keys.yaml"]
    if command == "serve":
        args += ["--port", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run([sys.executable, "-m", "gateway", command, *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "routes.yaml:3: base_url must not carry a user or password" in done.stderr
    assert "s3cr3t-pw" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


# ----------------------------------------------------------------- the extra's own module


@pytest.mark.parametrize(("kind", "module", "extra"),
                         [("gcp", "google.auth", "gcp"), ("aws", "botocore", "aws")])  # fmt: skip
def test_check_probes_the_module_not_a_namespace(
    tmp_path: Path, kind: str, module: str, extra: str
) -> None:
    """`google` stays importable (here a bare namespace directory first on sys.path, as
    protobuf provides one) while `google.auth` is not: check still names the extra."""
    (tmp_path / "ns" / "google").mkdir(parents=True)
    auth = {"gcp": "{gcp: {}}", "aws": "{aws: {region: us-east-1}}"}[kind]
    (tmp_path / "routes.yaml").write_text(
        f"providers:\n  c:\n    base_url: http://x/v1\n    auth: {auth}\n"
        "models:\n  m: {providers: [{provider: c}]}\n"
    )
    (tmp_path / "keys.yaml").write_text("")
    code = (
        f"import sys, importlib.util; sys.path.insert(0, {str(tmp_path / 'ns')!r}); "
        f"sys.modules[{module!r}] = None; "
        "assert importlib.util.find_spec('google') is not None; "
        "from gateway.cli import main; sys.exit(main())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "check", "--routes", str(tmp_path / "routes.yaml"),
         "--keys", str(tmp_path / "keys.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "routes.yaml:4" in done.stderr and f"pip install -e '.[{extra}]'" in done.stderr
