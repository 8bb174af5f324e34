"""Provider credentials (SPEC §10): a key in a header of the provider's choosing, OAuth2
client-credentials tokens from a loopback token endpoint, a Google service account made
here (its JWT assertion's signature checked by the loopback endpoint). Token lifetimes
run on an injected clock."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import yaml

from gateway.upstream.credentials import CredentialsFailed, TokenSource, TokenState
from tests.config.test_config import assert_problems, routes_of
from tests.conftest import GatewayFactory, RunningGateway
from tests.scripted_upstream import DONE, Json, Sse, Upstream, chunk

MESSAGES = [{"role": "user", "content": "hi"}]
SECRET = "cs-very-secret-client-value"


# --------------------------------------------------------------------------- TokenSource


class Fetches:
    """A scripted fetch: each call takes the next outcome (a token or an exception)."""

    def __init__(self, *outcomes: str | Exception, life: float = 100.0) -> None:
        self.outcomes = list(outcomes)
        self.life = life
        self.calls = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> tuple[str, float]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome, self.life


async def test_one_fetch_serves_every_waiting_request() -> None:
    fetch = Fetches("t1")
    fetch.gate = asyncio.Event()
    source = TokenSource("p", fetch, clock=lambda: 0.0)
    waiting = [asyncio.ensure_future(source.token()) for _ in range(50)]
    await asyncio.sleep(0)
    fetch.gate.set()
    assert await asyncio.gather(*waiting) == ["t1"] * 50
    assert fetch.calls == 1


async def test_refresh_runs_in_the_background_past_80_percent() -> None:
    now = [0.0]
    fetch = Fetches("t1", "t2")
    source = TokenSource("p", fetch, clock=lambda: now[0])
    assert await source.token() == "t1"
    now[0] = 79.0
    assert await source.token() == "t1" and fetch.calls == 1  # fresh: no refresh
    now[0] = 81.0
    fetch.gate = asyncio.Event()
    assert source.state() is TokenState.AGING
    # Aging: the old token now, one refresh behind it however many ask.
    assert [await source.token() for _ in range(10)] == ["t1"] * 10
    await asyncio.sleep(0)  # the refresh task starts
    assert fetch.calls == 2
    fetch.gate.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert await source.token() == "t2"


async def test_failed_refresh_keeps_the_token_until_it_expires() -> None:
    now = [0.0]
    fetch = Fetches("t1", CredentialsFailed("token endpoint answered 500"), CredentialsFailed("x"))
    source = TokenSource("p", fetch, clock=lambda: now[0])
    assert await source.token() == "t1"
    now[0] = 90.0
    assert await source.token() == "t1"  # starts the refresh, which fails
    await asyncio.sleep(0)
    assert source.last_error == "token endpoint answered 500"
    now[0] = 90.5
    assert await source.token() == "t1" and fetch.calls == 2  # no retry within 1 s
    now[0] = 100.0  # expired; the retry fails too
    with pytest.raises(CredentialsFailed, match="no valid token"):
        await source.token()
    assert fetch.calls == 3
    assert source.state() is TokenState.EXPIRED


async def test_a_token_that_could_forge_headers_is_refused() -> None:
    source = TokenSource("p", Fetches("tok\r\nx-admin: 1"), clock=lambda: 0.0)
    with pytest.raises(CredentialsFailed):
        await source.token()
    assert source.last_error == "the token has characters a header cannot carry"


# --------------------------------------------------------------------------- config


def test_auth_problems_name_their_lines() -> None:
    text = """\
providers:
  a: {base_url: "http://x/v1", auth: {header: "bad header"}, api_key: k}
  b: {base_url: "http://x/v1", auth: {header: x-api-key, oauth2: {}}}
  c: {base_url: "http://x/v1", auth: {oauth2: {token_url: "http://t", client_id: i}}}
  d: {base_url: "http://x/v1", auth: {aws: {service: bedrock}}}
  e: {base_url: "http://x/v1", auth: {header: x-api-key}}
  f: {base_url: "http://x/v1", auth: {kerberos: {}}}
models:
  m: {providers: [{provider: a}, {provider: b}, {provider: c}, {provider: d}, {provider: e}, {provider: f}]}
"""
    _, problems = routes_of(text)
    assert_problems(
        problems,
        [
            (2, "auth.header must be a header name"),
            (3, "must be one of"),
            (4, "needs client_secret"),
            (5, "needs region"),
            (6, "has none"),
            (7, "must be one of"),
        ],
    )


def test_auth_kinds_parse() -> None:
    text = """\
providers:
  azure: {base_url: "http://x/v1", api_key: k, auth: {header: api-key}}
  entra:
    base_url: http://x/v1
    auth: {oauth2: {token_url: "http://t/token", client_id: i, client_secret: Zq9-s3cr3t, scope: sc}}
  vertex: {base_url: "http://x/v1", auth: {gcp: {}}}
  bedrock: {base_url: "http://x/v1", auth: {aws: {region: us-east-1}}}
models:
  m: {providers: [{provider: azure}, {provider: entra}, {provider: vertex}, {provider: bedrock}]}
"""
    routes, problems = routes_of(text)
    assert problems == []
    by = {p.name: p for p in routes.providers.values()}
    assert by["azure"].auth is not None and by["azure"].auth.header == "api-key"
    oauth2 = by["entra"].auth.oauth2 if by["entra"].auth else None
    assert oauth2 is not None and oauth2.client_secret.reveal() == "Zq9-s3cr3t"
    assert oauth2.scope == "sc"
    assert "Zq9-s3cr3t" not in repr(by["entra"])  # the secret never prints
    assert by["vertex"].auth is not None and by["vertex"].auth.gcp is not None
    aws = by["bedrock"].auth.aws if by["bedrock"].auth else None
    assert aws is not None and (aws.region, aws.service) == ("us-east-1", "bedrock")


# --------------------------------------------------------------------------- end to end


def routes(upstream: Upstream, auth: dict[str, Any], api_key: str | None = None,
           fallback: Upstream | None = None) -> str:  # fmt: skip
    provider: dict[str, Any] = {"base_url": upstream.url, "auth": auth}
    if api_key is not None:
        provider["api_key"] = api_key
    providers: dict[str, Any] = {"p": provider}
    entries = [{"provider": "p", "model": "upstream-model"}]
    if fallback is not None:
        providers["plain"] = {"base_url": fallback.url, "api_key": "sk-plain"}
        entries.append({"provider": "plain", "model": "upstream-model"})
    return yaml.safe_dump({"providers": providers, "models": {"m": {"providers": entries}}})


def token_reply(token: str, life: int = 100) -> Json:
    return Json({"access_token": token, "token_type": "Bearer", "expires_in": life})


def fake_clock(gw: RunningGateway) -> list[float]:
    now = [1000.0]
    gw.runtime.upstream.credentials.clock = lambda: now[0]
    return now


async def chat(client: httpx.AsyncClient, gw: RunningGateway) -> httpx.Response:
    return await client.post(f"{gw.base_url}/chat/completions",
                             json={"model": "m", "messages": MESSAGES})  # fmt: skip


async def test_api_key_in_the_providers_own_header(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream, {"header": "x-api-key"}, api_key="sk-anthropic"))
    r = await chat(client, gw)
    assert r.status_code == 200
    got = upstream.requests[-1]
    assert got.header("x-api-key") == "sk-anthropic"
    assert got.header("authorization") is None


async def test_oauth2_one_fetch_refresh_before_expiry_and_failover_after(
    gateway: GatewayFactory,
    make_upstream: Any,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream, tokens, plain = await make_upstream(), await make_upstream(), await make_upstream()
    auth = {"oauth2": {"token_url": f"http://127.0.0.1:{tokens.port}/oauth2/token",
                       "client_id": "gw", "client_secret": SECRET, "scope": "api://x/.default"}}  # fmt: skip
    gw = await gateway(routes(upstream, auth, fallback=plain))
    now = fake_clock(gw)
    tokens.script(token_reply("tok-1"), token_reply("tok-2"))
    caplog.set_level(logging.INFO)

    # Twenty at once before any token: one fetch, all served with it.
    answers = await asyncio.gather(*(chat(client, gw) for _ in range(20)))
    assert [r.status_code for r in answers] == [200] * 20
    assert len(tokens.requests) == 1
    form = parse_qs(tokens.requests[0].body.decode())
    assert form == {"grant_type": ["client_credentials"], "client_id": ["gw"],
                    "client_secret": [SECRET], "scope": ["api://x/.default"]}  # fmt: skip
    assert tokens.requests[0].path == "/oauth2/token"
    assert {r.header("authorization") for r in upstream.requests} == {"Bearer tok-1"}

    # Past 80% of its life: requests go on with tok-1 while one refresh fetches tok-2.
    now[0] += 85
    answers = await asyncio.gather(*(chat(client, gw) for _ in range(10)))
    assert [r.status_code for r in answers] == [200] * 10
    source = next(iter(gw.runtime.upstream.credentials._sources.values()))
    await asyncio.wait_for(asyncio.shield(source._task), 5)  # type: ignore[arg-type]
    assert len(tokens.requests) == 2
    r = await chat(client, gw)
    assert upstream.requests[-1].header("authorization") == "Bearer tok-2"

    # The endpoint fails from now on: tok-2 serves until it expires, then the
    # provider's attempts fail and the plain provider answers.
    tokens.default = Json({"error": "invalid_client", "secret": SECRET}, status=401)
    now[0] += 85
    r = await chat(client, gw)
    assert r.status_code == 200 and r.headers["x-gateway-provider"] == "p"
    now[0] += 20
    r = await chat(client, gw)
    assert r.status_code == 200 and r.headers["x-gateway-provider"] == "plain"
    assert plain.requests[-1].header("authorization") == "Bearer sk-plain"

    # No secret and no token anywhere a person reads.
    shown = [rec.getMessage() for rec in caplog.records]
    shown.append((await client.get(f"{gw.url}/metrics")).text)
    shown.append((await client.get(f"{gw.base_url}/router/models")).text)
    shown.append(r.text)
    for text in shown:
        assert SECRET not in text and "tok-1" not in text and "tok-2" not in text
    assert any("invalid_client" in m for m in shown)  # the OAuth2 code is said


@pytest.mark.parametrize("how", ["file", "application default"])
async def test_gcp_service_account_made_here(
    gateway: GatewayFactory,
    make_upstream: Any,
    client: httpx.AsyncClient,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """google-auth signs a JWT-bearer assertion with the account's key; the loopback
    token endpoint checks that signature with the public key before it answers. The
    account comes from `credentials:` or, with `gcp: {}`, from Google's default chain
    (GOOGLE_APPLICATION_CREDENTIALS here)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    upstream, tokens = await make_upstream(), await make_upstream()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()  # fmt: skip
    account = {
        "type": "service_account", "project_id": "p", "private_key_id": "k1",
        "private_key": pem, "client_email": "gw@p.iam.gserviceaccount.com", "client_id": "1",
        "token_uri": f"http://127.0.0.1:{tokens.port}/token",
    }  # fmt: skip
    path = tmp_path / "sa.json"
    path.write_text(json.dumps(account))
    checked: list[dict[str, Any]] = []

    def verify(body: bytes) -> None:
        form = parse_qs(body.decode())
        assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
        head, claims, signature = form["assertion"][0].split(".")

        def b64(part: str) -> bytes:
            return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

        key.public_key().verify(b64(signature), f"{head}.{claims}".encode(),
                                padding.PKCS1v15(), hashes.SHA256())  # fmt: skip
        checked.append(json.loads(b64(claims)))

    tokens.script(Json({"access_token": "ya29.made-here", "expires_in": 3600,
                        "token_type": "Bearer"}))  # fmt: skip
    if how == "file":
        gw = await gateway(routes(upstream, {"gcp": {"credentials": str(path)}}))
    else:
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
        gw = await gateway(routes(upstream, {"gcp": {}}))
    r = await chat(client, gw)
    assert r.status_code == 200, r.text
    assert upstream.requests[-1].header("authorization") == "Bearer ya29.made-here"
    verify(tokens.requests[0].body)
    assert checked[0]["iss"] == "gw@p.iam.gserviceaccount.com"
    assert "cloud-platform" in checked[0]["scope"]


def check_sigv4(got: Any, port: int, region: str = "us-east-1", service: str = "bedrock") -> None:
    """Recompute the request's SigV4 signature with botocore over the bytes received."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials as AwsKeys

    authorization = got.header("authorization")
    assert authorization.startswith("AWS4-HMAC-SHA256 Credential=AKIDGATEWAYTEST/")
    fields = dict(part.strip().split("=", 1) for part in authorization[17:].split(","))
    signed = fields["SignedHeaders"].split(";")
    assert "host" in signed and "x-amz-date" in signed
    url = f"http://127.0.0.1:{port}{got.path}" + (f"?{got.query}" if got.query else "")
    request = AWSRequest(method=got.method, url=url, data=got.body,
                         headers={name: got.header(name) for name in signed})  # fmt: skip
    request.context["timestamp"] = got.header("x-amz-date")
    signer = SigV4Auth(AwsKeys("AKIDGATEWAYTEST", "aws-secret-for-tests"), service, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    assert fields["Signature"] == expected


async def test_aws_sigv4_signs_the_spliced_bytes(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDGATEWAYTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-for-tests")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    text = routes(upstream, {"aws": {"region": "us-east-1", "service": "bedrock"}})
    text = text.replace("    auth:", "    query: {api-version: '1'}\n    auth:", 1)
    gw = await gateway(text)
    caplog.set_level(logging.INFO)
    r = await chat(client, gw)
    assert r.status_code == 200, r.text
    got = upstream.requests[-1]
    assert got.json()["model"] == "upstream-model"  # signed after the splice
    assert got.query == "api-version=1"
    check_sigv4(got, upstream.port)

    upstream.script(Sse([chunk("Hi"), DONE]))
    r = await client.post(f"{gw.base_url}/chat/completions",
                          json={"model": "m", "messages": MESSAGES, "stream": True})  # fmt: skip
    assert r.status_code == 200
    check_sigv4(upstream.requests[-1], upstream.port)
    signature = upstream.requests[-1].header("authorization").rsplit("=", 1)[1]
    for rec in caplog.records:
        assert "aws-secret-for-tests" not in rec.getMessage()
        assert signature not in rec.getMessage()


async def test_aws_without_keys_fails_over(
    gateway: GatewayFactory,
    make_upstream: Any,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    upstream, plain = await make_upstream(), await make_upstream()
    gw = await gateway(routes(upstream, {"aws": {"region": "us-east-1"}}, fallback=plain))
    r = await chat(client, gw)
    assert r.status_code == 200 and r.headers["x-gateway-provider"] == "plain"
    assert upstream.requests == []


@pytest.mark.parametrize(("kind", "module", "extra"), [("gcp", "google", "gcp"),
                                                       ("aws", "botocore", "aws")])  # fmt: skip
def test_check_names_a_missing_extra(tmp_path: Path, kind: str, module: str, extra: str) -> None:
    import subprocess
    import sys

    auth = {"gcp": "{gcp: {}}", "aws": "{aws: {region: us-east-1}}"}[kind]
    (tmp_path / "routes.yaml").write_text(
        f"providers:\n  c:\n    base_url: http://x/v1\n    auth: {auth}\n"
        "models:\n  m: {providers: [{provider: c}]}\n"
    )
    (tmp_path / "keys.yaml").write_text("")
    # The extra's package made unimportable, as on a machine without it.
    code = (f"import sys; sys.modules[{module!r}] = None; from gateway.cli import main; "
            "sys.exit(main())")  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", code, "check", "--routes", str(tmp_path / "routes.yaml"),
         "--keys", str(tmp_path / "keys.yaml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert f"pip install -e '.[{extra}]'" in done.stderr
    assert "routes.yaml:4" in done.stderr
