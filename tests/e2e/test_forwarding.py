"""Forwarding: request bytes and headers upstream, response bytes and headers back.

Everything goes over real loopback sockets: httpx -> gateway (uvicorn) -> scripted upstream.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.helpers import assert_envelope
from tests.scripted_upstream import Json, Upstream, chat_completion

MakeUpstream = Callable[[], Awaitable[Upstream]]
MESSAGES = [{"role": "user", "content": "hi"}]
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def routes(providers: dict[str, dict[str, Any]], models: dict[str, dict[str, Any]]) -> str:
    return yaml.safe_dump({"providers": providers, "models": models}, sort_keys=False)


def single(upstream: Upstream, **provider: Any) -> str:
    """Provider `p` at the upstream (api key sk-upstream-secret); model `m` -> upstream-model."""
    return routes(
        {"p": {"base_url": upstream.url, "api_key": "sk-upstream-secret", **provider}},
        {"m": {"providers": [{"provider": "p", "model": "upstream-model"}]}},
    )


async def post_raw(
    client: httpx.AsyncClient,
    gw: RunningGateway,
    body: bytes,
    path: str = "/v1/chat/completions",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await client.post(
        gw.url + path,
        content=body,
        headers={"content-type": "application/json", **(headers or {})},
    )


def names_field(details: dict[str, Any], field: str) -> bool:
    return any(field == v or (isinstance(v, str) and field in v) for v in details.values())


# --- request body ---------------------------------------------------------------------


async def test_body_forwarded_byte_for_byte_except_model(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(single(upstream))
    # Odd spacing, tabs, unicode escapes, a raw U+2028, unusual number spellings, unknown
    # fields, and "model" keys nested in messages and in an unknown object.
    template = (
        '{ "model" :  %s ,\n\t"messages":[ {"role":"user", "content":"caf\\u00e9 \\ud83d\\ude00'
        ' \\"model\\": \\"m\\" \u2028 end", "model": "m"} ],'
        '  "x_unknown": {"model": "m", "n": [1, 2.50, 1e3, -0.0]},"temperature":0.70 ,'
        '"metadata":{"provider":"keep","session_id":"keep"}   }'
    )
    sent = (template % '"m"').encode()
    r = await post_raw(client, gw, sent)
    assert r.status_code == 200, r.text
    assert len(upstream.requests) == 1
    assert upstream.requests[0].body == (template % '"upstream-model"').encode()


async def test_gateway_fields_removed_rest_untouched(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(single(upstream))
    sent = (
        b'{"model":"m","models":["m"],"route":"fallback","provider":{"order":["p"]},'
        b'"messages":[{"role":"user","content":"x","session_id":"inner"}],'
        b'"session_id":"s-1","user":"u  1","extra":{"provider":"nested","models":[1]}}'
    )
    r = await post_raw(client, gw, sent)
    assert r.status_code == 200, r.text
    assert upstream.requests[0].body == (
        b'{"model":"upstream-model",'
        b'"messages":[{"role":"user","content":"x","session_id":"inner"}],'
        b'"user":"u  1","extra":{"provider":"nested","models":[1]}}'
    )


async def test_gateway_field_last_member_removed_cleanly(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(single(upstream))
    sent = b'{"model":"m","messages":[{"role":"user","content":"x"}],"session_id":"s-1"}'
    r = await post_raw(client, gw, sent)
    assert r.status_code == 200, r.text
    assert upstream.requests[0].body == (
        b'{"model":"upstream-model","messages":[{"role":"user","content":"x"}]}'
    )


async def test_models_list_without_model(
    gateway: GatewayFactory, make_upstream: MakeUpstream, client: httpx.AsyncClient
) -> None:
    up_a: Upstream = await make_upstream()
    up_b: Upstream = await make_upstream()
    gw = await gateway(
        routes(
            {"pa": {"base_url": up_a.url}, "pb": {"base_url": up_b.url}},
            {
                "a": {"providers": [{"provider": "pa", "model": "model-a"}]},
                "b": {"providers": [{"provider": "pb", "model": "model-b"}]},
            },
        )
    )
    body = {"models": ["a", "b"], "messages": MESSAGES, "temperature": 0.5}
    r = await client.post(f"{gw.base_url}/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "a"
    sent = up_a.requests[0].json()
    assert sent == {"model": "model-a", "messages": MESSAGES, "temperature": 0.5}
    assert up_b.requests == []

    # `a` fails with a 500: `b` serves, and the response names `b`.
    up_a.script(Json({"error": {"message": "boom"}}, status=500))
    r = await client.post(f"{gw.base_url}/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "b"
    assert r.headers["x-gateway-provider"] == "pb"
    assert r.headers["x-upstream-model"] == "model-b"
    assert up_b.requests[0].json() == {"model": "model-b", "messages": MESSAGES, "temperature": 0.5}


async def test_models_list_validation(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(single(upstream))
    url = f"{gw.base_url}/chat/completions"
    r = await client.post(url, json={"models": ["m", "nope"], "messages": MESSAGES})
    assert_envelope(r, 400, "model_not_found")
    r = await client.post(url, json={"models": ["m"], "route": "cheapest", "messages": MESSAGES})
    err = assert_envelope(r, 422, "validation_error")
    assert names_field(err["details"], "route"), err
    assert upstream.requests == []


async def test_stream_null_means_absent(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(single(upstream))
    sent = b'{"model":"m","stream":null,"messages":[{"role":"user","content":"x"}]}'
    r = await post_raw(client, gw, sent)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["model"] == "m"
    assert upstream.requests[0].body == sent.replace(b'"m"', b'"upstream-model"')


# --- request headers ------------------------------------------------------------------


async def test_request_headers_filtered(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(
        single(upstream, headers={"X-Team": "search"}, query={"api-version": "2024-10-21"})
    )
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "messages": MESSAGES},
        headers={
            "Authorization": "Bearer client-secret",
            "Cookie": "session=client-cookie",
            "Accept-Encoding": "gzip, br",
            "Connection": "keep-alive, X-Drop-Me",
            "X-Drop-Me": "named-in-connection",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic Y2xpZW50OnNlY3JldA==",
            "Proxy-Connection": "keep-alive",
            "User-Agent": "my-sdk/1.2.3",
            "X-Custom": "abc",
        },
    )
    assert r.status_code == 200, r.text
    req = upstream.requests[0]
    names = [k for k, _ in req.headers]
    values = " ".join(v for _, v in req.headers)

    assert req.method == "POST"
    assert req.path == "/v1/chat/completions"
    assert "api-version=2024-10-21" in req.query.split("&")
    # The provider's credentials and extra headers arrive; the client's never do.
    assert [v for k, v in req.headers if k == "authorization"] == ["Bearer sk-upstream-secret"]
    assert req.header("x-team") == "search"
    assert "client-secret" not in values
    assert "cookie" not in names and "client-cookie" not in values
    assert "x-drop-me" not in names and "named-in-connection" not in values
    for hop in ("keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert hop not in names, hop
    assert "Y2xpZW50OnNlY3JldA==" not in values
    assert "gzip" not in (req.header("accept-encoding") or "")
    assert "x-drop-me" not in (req.header("connection") or "").lower()
    # Host names the upstream, and the length is that of the rewritten body.
    assert [v for k, v in req.headers if k == "host"] == [f"127.0.0.1:{upstream.port}"]
    lengths = [v for k, v in req.headers if k == "content-length"]
    assert len(lengths) <= 1
    if lengths:
        assert int(lengths[0]) == len(req.body)
    # Everything else passes.
    assert req.header("user-agent") == "my-sdk/1.2.3"
    assert req.header("x-custom") == "abc"


async def test_provider_without_api_key_sends_no_authorization(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(
        routes(
            {"p": {"base_url": upstream.url}},
            {"m": {"providers": [{"provider": "p", "model": "upstream-model"}]}},
        )
    )
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "messages": MESSAGES},
        headers={"Authorization": "Bearer client-secret"},
    )
    assert r.status_code == 200, r.text
    assert upstream.requests[0].header("authorization") is None


# --- response body --------------------------------------------------------------------


async def test_response_body_byte_for_byte_except_model(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    template = (
        '{\n  "id" : "chatcmpl-9",  "model"   :\t%s ,"choices":[{"index":0,"message":'
        '{"role":"assistant","content":"a\u2028b \\u2028 \\u00e9 \u00e9","model":"inner"},'
        '"finish_reason":"stop"}],"x":{"model":"nested"},"usage":{"prompt_tokens":1,'
        '"completion_tokens":1,"total_tokens":2}, "n": 1.50e+00 }\n'
    )
    upstream.script(Json((template % '"upstream-model"').encode()))
    gw = await gateway(single(upstream))
    r = await client.post(
        f"{gw.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES}
    )
    assert r.status_code == 200, r.text
    assert r.content == (template % '"m"').encode()


async def test_response_without_model_left_as_is(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    raw = b'{"id":"x", "choices":[{"message":{"content":"ok","model":"inner"}}]}'
    upstream.script(Json(raw))
    gw = await gateway(single(upstream))
    r = await client.post(
        f"{gw.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES}
    )
    assert r.status_code == 200, r.text
    assert r.content == raw


async def test_gzip_upstream_body_reaches_client_plain(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    raw = json.dumps(chat_completion()).encode()
    upstream.script(Json(gzip.compress(raw), headers=[("content-encoding", "gzip")]))
    gw = await gateway(single(upstream))
    r = await client.post(
        f"{gw.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES}
    )
    assert r.status_code == 200, r.text
    assert "content-encoding" not in r.headers
    assert r.content == raw.replace(b'"upstream-model"', b'"m"')


# --- response headers -----------------------------------------------------------------


async def test_response_headers_filtered(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(
        Json(
            chat_completion(),
            headers=[
                ("Keep-Alive", "timeout=5, max=100"),
                ("Proxy-Authenticate", "Basic"),
                ("Trailer", "x-checksum"),
                ("Set-Cookie", "upstream=secret; Path=/"),
                ("Content-Encoding", "identity"),
                ("X-Request-Id", "upstream-req-42"),
                ("X-Ratelimit-Remaining-Requests", "99"),
                ("OpenAI-Processing-Ms", "12"),
            ],
        )
    )
    gw = await gateway(single(upstream))
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "messages": MESSAGES},
        headers={"x-request-id": "client-req-1"},
    )
    assert r.status_code == 200, r.text
    h = r.headers
    for dropped in (
        "keep-alive",
        "proxy-authenticate",
        "trailer",
        "set-cookie",
        "content-encoding",
    ):
        assert dropped not in h, dropped
    assert r.cookies.get("upstream") is None
    assert h.get_list("x-request-id") == ["client-req-1"]
    assert h["x-upstream-request-id"] == "upstream-req-42"
    assert "x-ratelimit-remaining-requests" not in h  # the provider's capacity (SPEC §13)
    assert h["openai-processing-ms"] == "12"
    assert h["x-gateway-provider"] == "p"
    assert h["x-upstream-model"] == "upstream-model"
    assert h.get_list("content-length") == [str(len(r.content))]
    assert h["content-type"].startswith("application/json")


# --- x-request-id ---------------------------------------------------------------------


async def test_every_response_has_request_id(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Json(), Json({"error": {"message": "bad"}}, status=400))
    gw = await gateway(single(upstream))
    responses = {
        "success": await client.post(
            f"{gw.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES}
        ),
        "upstream 400": await client.post(
            f"{gw.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES}
        ),
        "unknown path": await client.get(f"{gw.url}/v1/no-such-endpoint"),
        "unknown path POST": await client.post(f"{gw.url}/nope", json={}),
        "not json": await post_raw(client, gw, b"{nope"),
        "validation": await client.post(f"{gw.base_url}/chat/completions", json={"model": "m"}),
        "unknown model": await client.post(
            f"{gw.base_url}/chat/completions", json={"model": "zzz", "messages": MESSAGES}
        ),
        "models": await client.get(f"{gw.base_url}/models"),
    }
    statuses = {name: r.status_code for name, r in responses.items()}
    assert statuses == {
        "success": 200,
        "upstream 400": 400,
        "unknown path": 404,
        "unknown path POST": 404,
        "not json": 400,
        "validation": 422,
        "unknown model": 400,
        "models": 200,
    }
    for name, r in responses.items():
        ids = r.headers.get_list("x-request-id")
        assert len(ids) == 1, name
        assert REQUEST_ID.fullmatch(ids[0]), (name, ids)
    minted = {r.headers["x-request-id"] for r in responses.values()}
    assert len(minted) == len(responses)  # one fresh id per request


@pytest.mark.parametrize(
    "rid",
    ["abc", "A.b_c-9", "x" * 128, "a-b_c.D9" * 16],
)
async def test_valid_client_request_id_echoed(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, rid: str
) -> None:
    assert REQUEST_ID.fullmatch(rid)
    gw = await gateway(single(upstream))
    ok = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "messages": MESSAGES},
        headers={"x-request-id": rid},
    )
    assert ok.status_code == 200
    assert ok.headers.get_list("x-request-id") == [rid]
    missing = await client.get(f"{gw.url}/v1/nowhere", headers={"x-request-id": rid})
    assert missing.status_code == 404
    assert missing.headers.get_list("x-request-id") == [rid]
    bad = await client.post(
        f"{gw.base_url}/chat/completions", json={"model": "m"}, headers={"x-request-id": rid}
    )
    assert bad.status_code == 422
    assert bad.headers.get_list("x-request-id") == [rid]


@pytest.mark.parametrize(
    "rid", ["x" * 129, "has space", "slash/y", "semi;colon", "quote'", "üñí", "a+b", "%41"]
)
async def test_invalid_client_request_id_replaced(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, rid: str
) -> None:
    gw = await gateway(single(upstream))
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "messages": MESSAGES},
        headers={"x-request-id": rid.encode()},
    )
    assert r.status_code == 200
    ids = r.headers.get_list("x-request-id")
    assert len(ids) == 1
    assert ids[0] != rid
    assert REQUEST_ID.fullmatch(ids[0])
    missing = await client.get(f"{gw.url}/v1/nowhere", headers={"x-request-id": rid.encode()})
    assert missing.status_code == 404
    assert missing.headers["x-request-id"] != rid
    assert REQUEST_ID.fullmatch(missing.headers["x-request-id"])


# --- session_id -----------------------------------------------------------------------


async def test_session_id_body_and_header(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(single(upstream))
    url = f"{gw.base_url}/chat/completions"
    r = await client.post(url, json={"model": "m", "messages": MESSAGES, "session_id": "s" * 128})
    assert r.status_code == 200, r.text
    assert "session_id" not in upstream.requests[-1].json()
    r = await client.post(
        url, json={"model": "m", "messages": MESSAGES}, headers={"x-session-id": "h" * 128}
    )
    assert r.status_code == 200, r.text
    # The body wins over the header: a valid body value with an overlong header is fine.
    r = await client.post(
        url,
        json={"model": "m", "messages": MESSAGES, "session_id": "body"},
        headers={"x-session-id": "h" * 129},
    )
    assert r.status_code == 200, r.text
    assert len(upstream.requests) == 3


async def test_session_id_too_long_is_422(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(single(upstream))
    url = f"{gw.base_url}/chat/completions"
    r = await client.post(url, json={"model": "m", "messages": MESSAGES, "session_id": "s" * 129})
    err = assert_envelope(r, 422, "validation_error")
    assert names_field(err["details"], "session_id"), err
    r = await client.post(
        url, json={"model": "m", "messages": MESSAGES}, headers={"x-session-id": "h" * 129}
    )
    err = assert_envelope(r, 422, "validation_error")
    assert names_field(err["details"], "session_id"), err
    assert upstream.requests == []


# --- endpoints ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/chat/completions", "/api/v1/chat/completions"]
)
async def test_chat_paths(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, path: str
) -> None:
    gw = await gateway(single(upstream))
    r = await post_raw(
        client, gw, b'{"model": "m", "messages": [{"role":"user","content":"x"}]}', path
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "m"
    assert r.headers["x-gateway-provider"] == "p"
    req = upstream.requests[0]
    assert req.path == "/v1/chat/completions"
    assert req.body == b'{"model": "upstream-model", "messages": [{"role":"user","content":"x"}]}'


EMBEDDING = (
    b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.1,-2.5e-3]}],'
    b' "model" : "upstream-model","usage":{"prompt_tokens":2,"total_tokens":2}}'
)
COMPLETION = (
    b'{"id":"cmpl-1","object":"text_completion","created":1,"model":"upstream-model",'
    b'"choices":[{"text":" there","index":0,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


@pytest.mark.parametrize(
    ("path", "sent", "reply"),
    [
        ("/v1/embeddings", '{"input": ["a", "b"],  "model":"m","dimensions":8}', EMBEDDING),
        ("/v1/completions", '{"model":"m" , "prompt":"hello", "max_tokens":5}', COMPLETION),
    ],
)
async def test_embeddings_and_completions_route_and_rewrite(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    path: str,
    sent: str,
    reply: bytes,
) -> None:
    upstream.script(Json(reply))
    gw = await gateway(single(upstream))
    r = await post_raw(client, gw, sent.encode(), path)
    assert r.status_code == 200, r.text
    assert r.content == reply.replace(b'"upstream-model"', b'"m"')
    assert r.headers["x-gateway-provider"] == "p"
    assert r.headers["x-upstream-model"] == "upstream-model"
    req = upstream.requests[0]
    assert req.path == path
    assert req.body == sent.replace('"m"', '"upstream-model"').encode()
    assert req.header("authorization") == "Bearer sk-upstream-secret"


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/embeddings", {"model": "m"}, "input"),
        ("/v1/embeddings", {"model": "m", "prompt": "wrong field"}, "input"),
        ("/v1/completions", {"model": "m"}, "prompt"),
        ("/v1/completions", {"model": "m", "input": "wrong field"}, "prompt"),
    ],
)
async def test_embeddings_and_completions_require_their_field(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    field: str,
) -> None:
    gw = await gateway(single(upstream))
    r = await client.post(gw.url + path, json=body)
    err = assert_envelope(r, 422, "validation_error")
    assert names_field(err["details"], field), err
    assert r.headers.get("x-request-id")
    assert upstream.requests == []
