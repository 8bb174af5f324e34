"""The HTTP API over real loopback sockets: auth, catalog, the error envelope, secrets."""

from __future__ import annotations

import hashlib
import json
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory, RunningGateway
from tests.helpers import assert_envelope as error_of
from tests.scripted_upstream import Upstream

UPSTREAM_SECRET = "sk-upstream-TOPSECRET-5f2c"
PLAIN = "sk-gw-plain-9c1e"
LOWER = "sk-gw-lower-77aa"
UPPER = "sk-gw-upper-31bd"
LIMITED = "sk-gw-limited-04fe"
DISABLED = "sk-gw-disabled-a0a0"
EXPIRED = "sk-gw-expired-b1b1"
EXPIRED_TS = "sk-gw-expired-ts-c2c2"
FUTURE = "sk-gw-future-d3d3"
CLIENT_SECRETS = (PLAIN, LOWER, UPPER, LIMITED, DISABLED, EXPIRED, EXPIRED_TS, FUTURE)

KEYS = f"""
keys:
  - name: plain
    key: {PLAIN}
  - name: lower
    sha256: {hashlib.sha256(LOWER.encode()).hexdigest()}
  - name: upper
    sha256: "{hashlib.sha256(UPPER.encode()).hexdigest().upper()}"
  - name: limited
    key: {LIMITED}
    models: ["e", "openai/*"]
  - name: disabled
    key: {DISABLED}
    disabled: true
  - name: expired
    key: {EXPIRED}
    expires: 2020-01-01
  - name: expired-ts
    key: {EXPIRED_TS}
    expires: "2021-03-04T05:06:07Z"
  - name: future
    key: {FUTURE}
    expires: 2999-12-31
"""

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def routes(upstream: Upstream) -> str:
    return f"""
providers:
  p:
    base_url: {upstream.url}
    api_key: {UPSTREAM_SECRET}
  echo:
    base_url: builtin:echo
models:
  m:
    id: model-m-id
    name: Model M
    providers:
      - provider: p
        model: upstream-model
  e:
    providers: [{{provider: echo}}]
  team/special:
    name: Team special
    providers: [{{provider: echo, model: special-up}}]
  "openai/*":
    providers: [{{provider: p}}]
"""


@dataclass
class Api:
    gw: RunningGateway
    client: httpx.AsyncClient
    upstream: Upstream

    def url(self, path: str) -> str:
        return self.gw.url + path

    async def chat(
        self, key: str | None, body: dict[str, Any], path: str = "/v1/chat/completions"
    ) -> httpx.Response:
        return await self.client.post(self.url(path), json=body, headers=auth(key))

    async def get(self, path: str, key: str | None = PLAIN) -> httpx.Response:
        return await self.client.get(self.url(path), headers=auth(key))


def nodelay(factory: GatewayFactory) -> GatewayFactory:
    async def make(*args: Any, **kwargs: Any) -> RunningGateway:
        gw = await factory(*args, **kwargs)
        for server in gw.server.servers:
            for sock in server.sockets:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return gw

    return make


def auth(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


@pytest.fixture
def gateway(gateway: GatewayFactory) -> GatewayFactory:
    """conftest's factory, with TCP_NODELAY on the listening socket (accepted sockets inherit
    it on Linux). conftest binds a proto-0 socket, so asyncio never sets TCP_NODELAY and
    every response waits 40 ms for a delayed ACK; that would make this file 20 s slower."""
    return nodelay(gateway)


@pytest.fixture
async def api(gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient) -> Api:
    gw = await gateway(routes(upstream), KEYS)
    return Api(gw, client, upstream)


def assert_no_secrets(r: httpx.Response) -> None:
    blob = r.content + b"\n".join(k.encode() + b": " + v.encode() for k, v in r.headers.items())
    for secret in (UPSTREAM_SECRET, *CLIENT_SECRETS):
        assert secret.encode() not in blob, secret


def names_field(err: dict[str, Any], field: str) -> bool:
    return field in [str(v) for v in err["details"].values()]


# --------------------------------------------------------------------------- auth


async def test_no_key_is_401(api: Api) -> None:
    r = await api.chat(None, {"model": "e", **CHAT})
    error_of(r, 401, "unauthorized")
    assert api.upstream.requests == []


async def test_wrong_key_is_401(api: Api) -> None:
    for header in (
        "Bearer sk-gw-wrong",
        f"Bearer {PLAIN}x",
        f"Bearer {PLAIN.upper()}",
        f"Basic {PLAIN}",
        f"{PLAIN}",
        "Bearer",
        f"Bearer {hashlib.sha256(LOWER.encode()).hexdigest()}",
        f"Bearer {hashlib.sha256(UPPER.encode()).hexdigest().upper()}",
    ):
        r = await api.client.post(
            api.url("/v1/chat/completions"),
            json={"model": "e", **CHAT},
            headers={"Authorization": header},
        )
        error_of(r, 401, "unauthorized")
    assert api.upstream.requests == []


async def test_valid_keys_work(api: Api) -> None:
    # plain `key:`, sha256 in lower- and upper-case hex, an expiry far ahead
    for key in (PLAIN, LOWER, UPPER, FUTURE):
        r = await api.chat(key, {"model": "e", **CHAT})
        assert r.status_code == 200, (key, r.text)
        assert r.json()["model"] == "e"
        assert r.json()["choices"][0]["message"]["content"] == "echo: hello"
        assert_no_secrets(r)
        r = await api.get("/v1/models", key)
        assert r.status_code == 200, (key, r.text)
    r = await api.client.post(
        api.url("/v1/chat/completions"),
        json={"model": "e", **CHAT},
        headers={"Authorization": f"bearer {PLAIN}"},
    )
    assert r.status_code == 200, r.text


async def test_disabled_and_expired_keys_are_401(api: Api) -> None:
    for key in (DISABLED, EXPIRED, EXPIRED_TS):
        r = await api.chat(key, {"model": "e", **CHAT})
        error_of(r, 401, "unauthorized")
        r = await api.get("/v1/models", key)
        error_of(r, 401, "unauthorized")


async def test_allow_list(api: Api) -> None:
    r = await api.chat(LIMITED, {"model": "e", **CHAT})
    assert r.status_code == 200, r.text
    err = error_of(await api.chat(LIMITED, {"model": "m", **CHAT}), 403, "model_not_allowed")
    assert "m" in json.dumps(err["details"])
    error_of(await api.chat(LIMITED, {"model": "team/special", **CHAT}), 403, "model_not_allowed")
    assert api.upstream.requests == []
    # A glob covers the wildcard's slugs.
    r = await api.chat(LIMITED, {"model": "openai/gpt-x", **CHAT})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "openai/gpt-x"
    assert api.upstream.requests[-1].json()["model"] == "gpt-x"


async def test_allow_list_checks_every_slug_in_models(api: Api) -> None:
    for body in (
        {"models": ["e", "m"], **CHAT},
        {"models": ["m", "e"], **CHAT},
        {"model": "e", "models": ["m"], **CHAT},
        {"model": "m", "models": ["e"], **CHAT},
        {"model": "e", "models": ["openai/x", "team/special"], **CHAT},
    ):
        error_of(await api.chat(LIMITED, body), 403, "model_not_allowed")
        # The unrestricted key may use the same list.
        r = await api.chat(PLAIN, body)
        assert r.status_code == 200, (body, r.text)
    r = await api.client.post(
        api.url("/v1/embeddings"), json={"model": "m", "input": "x"}, headers=auth(LIMITED)
    )
    error_of(r, 403, "model_not_allowed")
    r = await api.client.post(
        api.url("/v1/completions"), json={"model": "m", "prompt": "x"}, headers=auth(LIMITED)
    )
    error_of(r, 403, "model_not_allowed")


@pytest.mark.parametrize("keys", [None, "", "keys:\n", "keys: []\n"])
async def test_no_keys_means_open(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, keys: str | None
) -> None:
    gw = await gateway(routes(upstream), keys)
    r = await client.post(f"{gw.base_url}/chat/completions", json={"model": "e", **CHAT})
    assert r.status_code == 200, r.text
    r = await client.get(f"{gw.base_url}/models")
    assert r.status_code == 200
    assert {m["id"] for m in r.json()["data"]} == {"m", "e", "team/special"}
    # Any bearer is ignored, not refused.
    r = await client.get(f"{gw.base_url}/models", headers=auth("whatever"))
    assert r.status_code == 200


PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/e"),
    ("GET", "/v1/models/team/special"),
    ("GET", "/v1/models/does-not-exist"),
    ("GET", "/v1/router/models"),
    ("GET", "/v1/router/models/model-m-id/providers"),
    ("GET", "/v1/router/models/nope/providers"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
]
UNKNOWN_V1 = [
    ("POST", "/v1/no-such-endpoint"),
    ("GET", "/v1/no/such/endpoint"),
    ("GET", "/v1"),
    ("GET", "/v1/"),
]


async def test_every_v1_endpoint_needs_a_key(api: Api) -> None:
    for method, path in PROTECTED:
        for key in (None, "sk-gw-wrong"):
            r = await api.client.request(
                method, api.url(path), json={"model": "e", **CHAT}, headers=auth(key)
            )
            error_of(r, 401, "unauthorized")
    assert api.upstream.requests == []


async def test_unknown_v1_paths_need_a_key(api: Api) -> None:
    # "every /v1/... path" needs a key: an unknown one must not answer 404 to strangers.
    for method, path in UNKNOWN_V1:
        r = await api.client.request(method, api.url(path), json={"model": "e", **CHAT})
        error_of(r, 401, "unauthorized")


async def test_chat_aliases_need_a_key(api: Api) -> None:
    for path in ("/chat/completions", "/api/v1/chat/completions"):
        error_of(await api.chat(None, {"model": "e", **CHAT}, path), 401, "unauthorized")
        r = await api.chat(PLAIN, {"model": "e", **CHAT}, path)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "e"


async def test_healthz_needs_no_key(api: Api) -> None:
    for key in (None, "sk-gw-wrong", PLAIN):
        r = await api.get("/healthz", key)
        assert r.status_code == 200
        body = r.json()
        assert set(body) == {"status", "config_version"}
        assert body["status"] == "ok"
        assert isinstance(body["config_version"], str) and body["config_version"]
        assert r.headers.get("x-request-id")


async def test_healthz_config_version_follows_the_files(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    a = await gateway(routes(upstream), KEYS)
    b = await gateway(routes(upstream), KEYS + "\n")
    a2 = await gateway(routes(upstream), KEYS)
    va = (await client.get(a.url + "/healthz")).json()["config_version"]
    vb = (await client.get(b.url + "/healthz")).json()["config_version"]
    va2 = (await client.get(a2.url + "/healthz")).json()["config_version"]
    assert va == va2
    assert va != vb


async def test_unknown_paths(api: Api) -> None:
    # Outside /v1 no key is needed to learn a path does not exist.
    for key in (None, PLAIN):
        for path in ("/nope", "/v2/chat/completions", "/healthz/x", "/"):
            r = await api.get(path, key)
            assert r.status_code == 404, (path, r.text)
            assert error_of(r, 404, r.json()["error"]["code"])["code"] != "unauthorized"
    # With a valid key an unknown /v1 path is a plain 404 envelope.
    for method, path in UNKNOWN_V1:
        r = await api.client.request(method, api.url(path), headers=auth(PLAIN))
        assert r.status_code == 404, (path, r.text)
        error_of(r, 404, r.json()["error"]["code"])


# --------------------------------------------------------------------------- catalog


async def test_models_list_shape_and_exact_slugs(api: Api) -> None:
    r = await api.get("/v1/models")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"object", "data"}
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert sorted(ids) == sorted(["m", "e", "team/special"])  # no wildcard pattern
    for m in body["data"]:
        assert set(m) == {"id", "object", "created", "owned_by"}
        assert m["object"] == "model"
        assert isinstance(m["created"], int) and not isinstance(m["created"], bool)
        assert isinstance(m["owned_by"], str)
    assert_no_secrets(r)


async def test_models_list_only_allowed_slugs(api: Api) -> None:
    r = await api.get("/v1/models", LIMITED)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["e"]


@pytest.mark.parametrize("prefix", ["", "/api/v1", "/openai/v1"])
async def test_models_under_every_prefix(api: Api, prefix: str) -> None:
    """SPEC §14: an SDK whose base URL is the host root, /api/v1 or /openai/v1 lists and
    retrieves models there, with the same key rules as /v1."""
    listed = await api.get(f"{prefix}/models")
    assert listed.status_code == 200, listed.text
    assert listed.json() == (await api.get("/v1/models")).json()
    limited = await api.get(f"{prefix}/models", LIMITED)
    assert [m["id"] for m in limited.json()["data"]] == ["e"]
    one = await api.get(f"{prefix}/models/team/special")
    assert one.status_code == 200 and one.json()["id"] == "team/special"
    assert (await api.get(f"{prefix}/models/nope")).status_code == 404
    assert (await api.get(f"{prefix}/models", None)).status_code == 401


async def test_model_retrieve(api: Api) -> None:
    for slug in ("e", "m", "team/special"):
        r = await api.get(f"/v1/models/{slug}")
        assert r.status_code == 200, (slug, r.text)
        m = r.json()
        assert set(m) == {"id", "object", "created", "owned_by"}
        assert m["id"] == slug
        assert m["object"] == "model"
    # A percent-encoded slash is never decoded into a separator (SPEC §13): no route.
    r = await api.client.get(httpx.URL(api.url("/v1/models/team%2Fspecial")), headers=auth(PLAIN))
    assert r.status_code == 404
    assert r.headers["connection"] == "close"


async def test_model_retrieve_wildcard_slug(api: Api) -> None:
    r = await api.get("/v1/models/openai/gpt-4o")
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "openai/gpt-4o"


async def test_model_retrieve_unknown_or_not_allowed_is_404(api: Api) -> None:
    for path, key in (
        ("/v1/models/nope", PLAIN),
        ("/v1/models/team/nope", PLAIN),
        ("/v1/models/team", PLAIN),
        ("/v1/models/openai", PLAIN),
        ("/v1/models/m", LIMITED),
        ("/v1/models/team/special", LIMITED),
        ("/v1/models/model-m-id", PLAIN),
    ):
        error_of(await api.get(path, key), 404, "model_not_found")
    # The limited key may still retrieve what it may use.
    assert (await api.get("/v1/models/e", LIMITED)).status_code == 200
    assert (await api.get("/v1/models/openai/gpt-4o", LIMITED)).status_code == 200


async def test_router_models(api: Api) -> None:
    r = await api.get("/v1/router/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    for entry in body["data"]:
        assert set(entry) == {"id", "slug", "name"}
    by_slug = {entry["slug"]: entry for entry in body["data"]}
    assert by_slug == {
        "m": {"id": "model-m-id", "slug": "m", "name": "Model M"},
        "e": {"id": "e", "slug": "e", "name": "e"},
        "team/special": {"id": "team/special", "slug": "team/special", "name": "Team special"},
        "openai/*": {"id": "openai/*", "slug": "openai/*", "name": "openai/*"},
    }
    assert_no_secrets(r)
    assert api.upstream.url.encode() not in r.content


async def test_router_providers(api: Api) -> None:
    r = await api.get("/v1/router/models/model-m-id/providers")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"object": "list", "data": [{"provider": "p", "model": "upstream-model"}]}
    r = await api.get("/v1/router/models/team/special/providers")
    assert r.status_code == 200, r.text
    assert r.json()["data"] == [{"provider": "echo", "model": "special-up"}]
    r = await api.get("/v1/router/models/openai/*/providers")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["provider"] for d in data] == ["p"]
    assert all(set(d) == {"provider", "model"} for d in data)


async def test_router_providers_never_show_urls_or_keys(api: Api) -> None:
    for path in (
        "/v1/router/models/model-m-id/providers",
        "/v1/router/models/e/providers",
        "/v1/router/models/openai/*/providers",
        "/v1/router/models",
    ):
        r = await api.get(path)
        assert r.status_code == 200, (path, r.text)
        assert_no_secrets(r)
        for needle in (
            api.upstream.url,
            f"127.0.0.1:{api.upstream.port}",
            "builtin:echo",
            "http://",
        ):
            assert needle.encode() not in r.content, (path, needle)


async def test_router_providers_unknown_is_404(api: Api) -> None:
    error_of(await api.get("/v1/router/models/nope/providers"), 404, "model_not_found")


# --------------------------------------------------------------------------- errors


async def test_body_not_a_json_object_is_400(api: Api) -> None:
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/completions"):
        for content in (
            b"",
            b"not json",
            b"{",
            b"[1, 2]",
            b"[]",
            b'"string"',
            b"42",
            b"null",
            b"true",
            b"\xff\xfe",
            b'[{"model": "e", "messages": [1]}]',
        ):
            r = await api.client.post(
                api.url(path),
                content=content,
                headers={**auth(PLAIN), "content-type": "application/json"},
            )
            error_of(r, 400, "bad_request")
    assert api.upstream.requests == []


VALIDATION = [
    ("/v1/chat/completions", {**CHAT}, "model"),
    ("/v1/chat/completions", {"model": None, **CHAT}, "model"),
    ("/v1/chat/completions", {"model": 5, **CHAT}, "model"),
    ("/v1/chat/completions", {"model": "e"}, "messages"),
    ("/v1/chat/completions", {"model": "e", "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": "e", "messages": "hello"}, "messages"),
    ("/v1/chat/completions", {"model": "e", "messages": {"role": "user"}}, "messages"),
    ("/v1/chat/completions", {"model": "e", "messages": None}, "messages"),
    ("/v1/chat/completions", {"model": "e", "stream": "true", **CHAT}, "stream"),
    ("/v1/chat/completions", {"model": "e", "stream": "false", **CHAT}, "stream"),
    ("/v1/chat/completions", {"model": "e", "stream": 1, **CHAT}, "stream"),
    ("/v1/chat/completions", {"model": "e", "stream": 0, **CHAT}, "stream"),
    ("/v1/chat/completions", {"model": "e", "stream": [], **CHAT}, "stream"),
    ("/v1/chat/completions", {"model": "e", "route": "x", **CHAT}, "route"),
    ("/v1/chat/completions", {"model": "e", "session_id": "s" * 129, **CHAT}, "session_id"),
    ("/v1/embeddings", {"model": "e"}, "input"),
    ("/v1/completions", {"model": "e"}, "prompt"),
    ("/v1/completions", {"model": "e", "prompt": "x", "stream": "yes"}, "stream"),
]


async def test_validation_errors_are_422(api: Api) -> None:
    for path, body, field in VALIDATION:
        r = await api.client.post(api.url(path), json=body, headers=auth(PLAIN))
        err = error_of(r, 422, "validation_error")
        assert names_field(err, field), (path, body, err)
    assert api.upstream.requests == []


async def test_stream_null_is_absent(api: Api) -> None:
    r = await api.chat(PLAIN, {"model": "e", "stream": None, **CHAT})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["choices"][0]["message"]["content"] == "echo: hello"


async def test_route_fallback_is_accepted(api: Api) -> None:
    r = await api.chat(PLAIN, {"models": ["e"], "route": "fallback", **CHAT})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "e"


async def test_unknown_slug_is_400_model_not_found(api: Api) -> None:
    for body in (
        {"model": "nope", **CHAT},
        {"model": "openai", **CHAT},
        {"model": "openai/", **CHAT},
        {"model": "E", **CHAT},
        {"models": ["e", "nope"], **CHAT},
        {"model": "nope", "models": ["e"], **CHAT},
    ):
        err = error_of(await api.chat(PLAIN, body), 400, "model_not_found")
        assert "nope" in json.dumps(err) or "openai" in json.dumps(err) or '"E"' in json.dumps(err)
    r = await api.client.post(
        api.url("/v1/embeddings"), json={"model": "nope", "input": "x"}, headers=auth(PLAIN)
    )
    error_of(r, 400, "model_not_found")
    assert api.upstream.requests == []


@pytest.fixture
async def small(gateway: GatewayFactory, upstream: Upstream) -> RunningGateway:
    return await gateway(routes(upstream), KEYS, max_body_bytes=1000)


def padded(size: int) -> bytes:
    body = json.dumps({"model": "e", **CHAT, "pad": ""}).encode()
    return body[:-2] + b"x" * (size - len(body)) + b'"}'


async def test_body_over_limit_with_content_length(
    small: RunningGateway, client: httpx.AsyncClient
) -> None:
    ok = padded(1000)
    assert len(ok) == 1000
    r = await client.post(f"{small.base_url}/chat/completions", content=ok, headers=auth(PLAIN))
    assert r.status_code == 200, r.text
    big = padded(1001)
    r = await client.post(f"{small.base_url}/chat/completions", content=big, headers=auth(PLAIN))
    error_of(r, 413, "payload_too_large")
    huge = padded(200_000)
    r = await client.post(f"{small.base_url}/chat/completions", content=huge, headers=auth(PLAIN))
    error_of(r, 413, "payload_too_large")


async def test_body_over_limit_chunked(small: RunningGateway, client: httpx.AsyncClient) -> None:
    async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
        for i in range(0, len(data), size):
            yield data[i : i + size]

    r = await client.post(
        f"{small.base_url}/chat/completions",
        content=chunks(padded(1000), 100),
        headers=auth(PLAIN),
    )
    assert r.status_code == 200, r.text
    r = await client.post(
        f"{small.base_url}/chat/completions",
        content=chunks(padded(1001), 100),
        headers=auth(PLAIN),
    )
    assert "content-length" not in r.request.headers
    error_of(r, 413, "payload_too_large")
    r = await client.post(
        f"{small.base_url}/embeddings",
        content=chunks(b'{"model":"e","input":"' + b"y" * 5000 + b'"}', 300),
        headers=auth(PLAIN),
    )
    error_of(r, 413, "payload_too_large")
    # Still serving.
    r = await client.post(
        f"{small.base_url}/chat/completions", json={"model": "e", **CHAT}, headers=auth(PLAIN)
    )
    assert r.status_code == 200


async def test_default_limit_allows_large_bodies(api: Api) -> None:
    body = {"model": "e", "messages": [{"role": "user", "content": "z" * 1_100_000}]}
    r = await api.chat(PLAIN, body)
    assert r.status_code == 200


WRONG_METHODS = [
    ("GET", "/v1/chat/completions"),
    ("PUT", "/v1/chat/completions"),
    ("DELETE", "/v1/embeddings"),
    ("PATCH", "/v1/completions"),
    ("GET", "/chat/completions"),
    ("POST", "/v1/models"),
    ("DELETE", "/v1/models/e"),
    ("POST", "/v1/router/models"),
    ("PUT", "/v1/router/models/e/providers"),
    ("POST", "/healthz"),
]


async def test_wrong_method_is_an_envelope_never_500(api: Api) -> None:
    for method, path in WRONG_METHODS:
        r = await api.client.request(
            method, api.url(path), json={"model": "e", **CHAT}, headers=auth(PLAIN)
        )
        assert r.status_code == 405, (method, path, r.status_code, r.text)
        error_of(r, 405, r.json()["error"]["code"])
    assert api.upstream.requests == []


def _malformed_bodies() -> list[tuple[str, bytes]]:
    rng = random.Random(31337)
    out: list[tuple[str, bytes]] = []
    for _ in range(8):
        out.append(
            ("/v1/chat/completions", bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))))
        )
    out += [
        ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
        ("/v1/chat/completions", b'{"a":' * 5000 + b"1" + b"}" * 5000),
        ("/v1/chat/completions", b'{"model":"e","messages":' + b"[" * 3000 + b"]" * 3000 + b"}"),
        (
            "/v1/chat/completions",
            b'{"model":"e","messages":[{"role":"user","content":"x"}],"n":1e999999}',
        ),
        (
            "/v1/chat/completions",
            b'{"model":"e","messages":[{"role":"user","content":"x"}],"n":' + b"9" * 5000 + b"}",
        ),
        (
            "/v1/chat/completions",
            b'{"model":"e","messages":[{"role":"user","content":"x"}],"t":-1e-999999}',
        ),
        ("/v1/chat/completions", b'{"model":"e\xff","messages":[1]}'),
        (
            "/v1/chat/completions",
            b'{"model":"e","messages":[{"role":"user","content":"\xc3\x28"}]}',
        ),
        ("/v1/chat/completions", b'{"model":"e","messages":[{"role":"user","content":"\\ud800"}]}'),
        ("/v1/chat/completions", b'{"model":"\\u0000","messages":[1]}'),
        ("/v1/chat/completions", b'{"model":"e","messages":[1],}'),
        ("/v1/chat/completions", b"{\"model\":'e'}"),
        ("/v1/chat/completions", b"\x00" * 64),
        (
            "/v1/chat/completions",
            b'{"model":"e","messages":[{"role":"user","content":"x"}]}' + b"garbage",
        ),
        ("/v1/chat/completions", b"\xef\xbb\xbf" + b'{"model":"e","messages":[1]}'),
        ("/v1/embeddings", b'{"model":"e","input":' + b"[" * 2000 + b"]" * 2000 + b"}"),
        ("/v1/completions", b'{"model":"e","prompt":"\xed\xa0\x80"}'),
    ]
    wrong = [None, True, 0, -1, 1.5, 2**70, "x", "", [], [1], {}, {"a": 1}, [[[]]], [None]]
    fields = {
        "/v1/chat/completions": [
            "model",
            "messages",
            "stream",
            "models",
            "route",
            "provider",
            "session_id",
            "stream_options",
            "n",
            "tools",
        ],
        "/v1/embeddings": ["model", "input", "encoding_format"],
        "/v1/completions": ["model", "prompt", "stream", "max_tokens"],
    }
    base = {
        "/v1/chat/completions": {"model": "e", "messages": [{"role": "user", "content": "x"}]},
        "/v1/embeddings": {"model": "e", "input": "x"},
        "/v1/completions": {"model": "e", "prompt": "x"},
    }
    for path, names in fields.items():
        for name in names:
            for value in rng.sample(wrong, 4):
                body = {**base[path], name: value}
                out.append((path, json.dumps(body).encode()))
    out += [
        (
            "/v1/chat/completions",
            json.dumps({"model": "e", "messages": [{"role": 5, "content": {"x": [1]}}]}).encode(),
        ),
        ("/v1/chat/completions", json.dumps({"model": "e", "messages": [[], None, 3]}).encode()),
        (
            "/v1/chat/completions",
            json.dumps(
                {
                    "model": "e",
                    "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                }
            ).encode(),
        ),
        (
            "/v1/chat/completions",
            json.dumps({"model": "e", "provider": {"order": "p", "only": 1}, **CHAT}).encode(),
        ),
        (
            "/v1/chat/completions",
            json.dumps({"model": "e", "provider": {"allow_fallbacks": "no"}, **CHAT}).encode(),
        ),
        (
            "/v1/chat/completions",
            json.dumps({"model": "e", "provider": {"order": [None]}, **CHAT}).encode(),
        ),
    ]
    return out


async def test_fuzz_malformed_bodies_never_500(api: Api) -> None:
    bodies = _malformed_bodies()
    assert len(bodies) >= 50
    failures = []
    for path, content in bodies:
        r = await api.client.post(
            api.url(path),
            content=content,
            headers={**auth(PLAIN), "content-type": "application/json"},
        )
        text = r.text
        if r.status_code >= 500 or "Traceback" in text or 'File "' in text:
            failures.append((path, content[:120], r.status_code, text[:200]))
        if r.status_code >= 400 and r.headers.get("content-type", "").startswith(
            "application/json"
        ):
            assert "error" in r.json()
        assert_no_secrets(r)
    assert failures == []
    r = await api.chat(PLAIN, {"model": "e", **CHAT})
    assert r.status_code == 200
    assert (await api.get("/healthz", None)).status_code == 200


async def test_fuzz_headers_never_500(api: Api) -> None:
    for headers in (
        {"Authorization": "Bearer " + "a" * 10_000},
        {"Authorization": "Bearer \x7f\x01"},
        {"Authorization": f"Bearer {PLAIN}", "Content-Length": "abc"},
        {"Authorization": f"Bearer {PLAIN}", "x-request-id": "x" * 1000},
        {"Authorization": f"Bearer {PLAIN}", "x-session-id": "s" * 1000},
        {"Authorization": f"Bearer {PLAIN}", "x-request-id": "bad id ?"},
    ):
        try:
            r = await api.client.post(
                api.url("/v1/chat/completions"), json={"model": "e", **CHAT}, headers=headers
            )
        except httpx.HTTPError:
            continue  # refused at the protocol layer: acceptable
        assert r.status_code < 500, (headers.keys(), r.status_code, r.text)
        if r.status_code >= 400:
            error_of(r, r.status_code, r.json()["error"]["code"])
        assert r.headers.get("x-request-id")
        assert len(r.headers["x-request-id"]) <= 128
    r = await api.chat(PLAIN, {"model": "e", **CHAT})
    assert r.status_code == 200


# --------------------------------------------------------------------------- secrets


async def test_secrets_never_reach_the_client(api: Api) -> None:
    up = api.upstream
    from tests.scripted_upstream import DONE, Json, Sse, chunk

    up.script(
        Json(),
        Sse([chunk("a"), DONE]),
        Json({"error": {"message": "bad", "type": "x", "code": "y"}}, status=400),
        Json({"error": {"message": "down"}}, status=500),
    )
    responses = [
        await api.chat(PLAIN, {"model": "m", **CHAT}),
        await api.chat(LOWER, {"model": "m", "stream": True, **CHAT}),
        await api.chat(UPPER, {"model": "m", **CHAT}),
        await api.chat(PLAIN, {"model": "m", **CHAT}),
        await api.chat(PLAIN, {"model": "e", "stream": True, **CHAT}),
        await api.chat(None, {"model": "m", **CHAT}),
        await api.chat(DISABLED, {"model": "m", **CHAT}),
        await api.chat(EXPIRED, {"model": "m", **CHAT}),
        await api.chat(LIMITED, {"model": "m", **CHAT}),
        await api.chat(PLAIN, {"model": "nope", **CHAT}),
        await api.get("/v1/models"),
        await api.get("/v1/models/m"),
        await api.get("/v1/router/models"),
        await api.get("/v1/router/models/model-m-id/providers"),
        await api.get("/healthz"),
    ]
    statuses = [r.status_code for r in responses]
    assert statuses[:5] == [200, 200, 400, 500, 200]
    for r in responses:
        assert_no_secrets(r)
    # Upstream got its own credentials and never the client's.
    assert len(up.requests) == 4
    for req in up.requests:
        assert req.header("authorization") == f"Bearer {UPSTREAM_SECRET}"
        raw = repr(req.headers).encode() + req.body
        for secret in CLIENT_SECRETS:
            assert secret.encode() not in raw


async def test_secrets_absent_from_unreachable_upstream_error(
    gateway: GatewayFactory, client: httpx.AsyncClient
) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    text = f"""
providers:
  dead:
    base_url: http://127.0.0.1:{port}/v1
    api_key: {UPSTREAM_SECRET}
models:
  d:
    providers: [{{provider: dead}}]
"""
    gw = await gateway(text, KEYS)
    r = await client.post(
        f"{gw.base_url}/chat/completions", json={"model": "d", **CHAT}, headers=auth(PLAIN)
    )
    error_of(r, 502, "upstream_unavailable")
    assert f"127.0.0.1:{port}".encode() not in r.content
