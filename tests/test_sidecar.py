"""SPEC §13, the loopback sidecar: with no keys configured the gateway answers only
requests addressed to it (Host), from no other web origin (Origin, Sec-Fetch-Site)
unless --cors-origin lists it, relayed POSTs only as JSON (or multipart for audio
uploads); the console trusts a loopback peer only when no proxy forwarded the request;
with keys, /metrics can ask for an admin key (--metrics-admin). Over real sockets, with
a real headless Chromium and a real nginx."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config.settings import Settings
from gateway.families import endpoints
from gateway.sidecar import Sidecar, _azure_media, _same_origin, host_name, media_type
from tests.conftest import GatewayFactory, RunningGateway, one_provider
from tests.console.test_console import CHROMEDRIVER, CHROMIUM, wait_for
from tests.helpers import assert_envelope, free_port, stop, until
from tests.scripted_upstream import Upstream

KEYS = yaml.safe_dump({"keys": [
    {"name": "team", "key": "sk-team"},
    {"name": "ops", "key": "sk-ops", "admin": True},
]})  # fmt: skip
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
NGINX = "/usr/sbin/nginx"


async def refusals(client: httpx.AsyncClient, gw: RunningGateway, status: int) -> int:
    """Requests the gateway refused before routing them anywhere, from its /metrics."""
    text = (await client.get(f"{gw.url}/metrics")).text
    found = re.search(rf'gateway_requests_total\{{[^}}]*status="{status}"[^}}]*\}} (\d+)', text)
    return int(found.group(1)) if found else 0


# -- pure parts


def test_hosts_answered_per_bound_port() -> None:
    settings = Settings(allow_hosts=("GW.internal", "gw.example:8443"))
    sidecar = Sidecar(None, None, {}, settings)  # type: ignore[arg-type]
    # Before any request: the names alone; a listener's port joins once it is seen.
    assert b"localhost" in sidecar.hosts and b"localhost:8080" not in sidecar.hosts
    assert sidecar._known(b"LOCALHOST:8080", {"server": ("127.0.0.1", 8080)})
    assert sidecar.hosts == {
        b"127.0.0.1", b"127.0.0.1:8080", b"localhost", b"localhost:8080",
        b"[::1]", b"[::1]:8080", b"gw.internal", b"gw.internal:8080", b"gw.example:8443",
    }  # fmt: skip
    assert not sidecar._known(b"localhost:8081", {"server": ("127.0.0.1", 8080)})
    assert not sidecar._known(b"gw.example:8080", {"server": ("127.0.0.1", 8080)})
    assert host_name("::1") == "[::1]" and host_name("127.0.0.2") == "127.0.0.2"
    bound_v6 = Sidecar(None, None, {}, Settings(host="::1"))  # type: ignore[arg-type]
    assert not bound_v6._known(b"[::1]:9", {})  # no server address: names without a port
    assert bound_v6.hosts == {b"127.0.0.1", b"localhost", b"[::1]"}


def test_origin_and_media_type_rules() -> None:
    host = b"127.0.0.1:8080"
    assert _same_origin(b"http://127.0.0.1:8080", host)
    assert _same_origin(b"https://127.0.0.1:8080", host)  # a TLS proxy's own name
    assert not _same_origin(b"http://127.0.0.1:3000", host)
    assert not _same_origin(b"null", host)
    assert not _same_origin(b"http://127.0.0.1:8080", None)  # HTTP/1.0 without Host
    assert not _same_origin(b"ftp://127.0.0.1:8080", host)
    assert media_type(b"Application/JSON ; charset=utf-8") == b"application/json"
    assert media_type(b"multipart/form-data; boundary=x") == b"multipart/form-data"
    sidecar = Sidecar(None, None, endpoints(), Settings())  # type: ignore[arg-type]
    assert sidecar.media["/v1/chat/completions"] == b"application/json"
    assert sidecar.media["/audio/transcriptions"] == b"multipart/form-data"
    assert "/v1/models" not in sidecar.media
    assert _azure_media("/openai/deployments/gpt/chat/completions") == b"application/json"
    assert _azure_media("/openai/deployments/gpt/unknown") is None


# -- Host (DNS rebinding)


async def test_a_foreign_host_is_misdirected_and_nothing_reaches_the_upstream(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(one_provider(upstream))
    for host in ("attacker.example", f"attacker.example:{gw.port}", "127.0.0.1:1", "127.0.0.2"):
        evil = {"host": host}
        assert_envelope(await client.get(f"{gw.url}/healthz", headers=evil), 421,
                        "misdirected_request")  # fmt: skip
        assert_envelope(await client.get(f"{gw.base_url}/models", headers=evil), 421,
                        "misdirected_request")  # fmt: skip
        r = await client.post(f"{gw.base_url}/chat/completions", json=CHAT, headers=evil)
        err = assert_envelope(r, 421, "misdirected_request")
        assert err["details"]["host"] == host
    # The Anthropic family's clients read their own envelope.
    r = await client.post(f"{gw.url}/v1/messages", json=CHAT, headers={"host": "evil.test"})
    assert r.status_code == 421 and r.json()["type"] == "error"
    assert upstream.requests == []
    assert await refusals(client, gw, 421) == 13  # logged and counted like any refusal
    # Its own names, with or without the bound port, in any case.
    for host in ("127.0.0.1", f"127.0.0.1:{gw.port}", "localhost", f"LocalHost:{gw.port}",
                 "[::1]", f"[::1]:{gw.port}"):  # fmt: skip
        r = await client.get(f"{gw.url}/healthz", headers={"host": host})
        assert r.status_code == 200, (host, r.text)
    r = await client.post(f"{gw.base_url}/chat/completions", json=CHAT)
    assert r.status_code == 200 and len(upstream.requests) == 1


async def test_allow_host_admits_one_name(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(one_provider(upstream), allow_hosts=("gw.internal", "proxy.test:8443"))
    for host in ("gw.internal", f"gw.internal:{gw.port}", "proxy.test:8443"):
        r = await client.post(f"{gw.base_url}/chat/completions", json=CHAT, headers={"host": host})
        assert r.status_code == 200, (host, r.text)
    for host in ("other.internal", "proxy.test", f"proxy.test:{gw.port}"):
        r = await client.get(f"{gw.url}/healthz", headers={"host": host})
        assert_envelope(r, 421, "misdirected_request")
    assert len(upstream.requests) == 3


async def test_http10_without_host_is_served(gateway: GatewayFactory, upstream: Upstream) -> None:
    """No browser sends a request without Host, and a client writing its own head could
    name any Host anyway: the rebinding defence has nothing to check, and serves it."""
    gw = await gateway(one_provider(upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b'"status":"ok"' in answer


# -- Origin and Sec-Fetch-Site


async def test_other_origins_are_forbidden(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(one_provider(upstream))
    chat = f"{gw.base_url}/chat/completions"
    for headers in (
        {"origin": "http://evil.example"},
        {"origin": f"http://127.0.0.1:{gw.port + 1}"},  # another loopback port: another origin
        {"origin": "null"},  # a sandboxed frame, a file: page, a redirect chain
        {"sec-fetch-site": "cross-site"},
        {"origin": f"http://127.0.0.1:{gw.port}", "sec-fetch-site": "cross-site"},
    ):
        r = await client.post(chat, json=CHAT, headers=headers)
        assert_envelope(r, 403, "forbidden_origin")
        assert "access-control-allow-origin" not in r.headers
        r = await client.get(f"{gw.url}/console/data", headers=headers)
        assert_envelope(r, 403, "forbidden_origin")
    # A preflight from an unlisted origin gets the same refusal: the browser stops there.
    preflight = {"origin": "http://evil.example", "access-control-request-method": "POST"}
    assert_envelope(await client.options(chat, headers=preflight), 403, "forbidden_origin")
    assert upstream.requests == []
    # The gateway's own origin (its console's page) and same-site fetches pass.
    for headers in (
        {"origin": f"http://127.0.0.1:{gw.port}", "sec-fetch-site": "same-origin"},
        {"origin": f"http://localhost:{gw.port}", "host": f"localhost:{gw.port}"},
        {"sec-fetch-site": "same-site"},
        {"sec-fetch-site": "none"},  # typed into the address bar
    ):
        r = await client.post(chat, json=CHAT, headers=headers)
        assert r.status_code == 200, (headers, r.text)
    assert len(upstream.requests) == 4


async def test_a_listed_origin_gets_cors(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    page = "http://127.0.0.1:3000"
    gw = await gateway(one_provider(upstream), cors_origins=(page + "/",))
    chat = f"{gw.base_url}/chat/completions"
    preflight = {
        "origin": page,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-os",
    }
    r = await client.options(chat, headers=preflight)
    assert r.status_code == 204 and r.content == b""
    assert r.headers["access-control-allow-origin"] == page
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == preflight["access-control-request-headers"]
    assert int(r.headers["access-control-max-age"]) > 0
    assert "Origin" in r.headers["vary"]
    r = await client.post(chat, json=CHAT, headers={"origin": page, "sec-fetch-site": "same-site"})
    assert r.status_code == 200 and r.json()["model"] == "m"
    assert r.headers["access-control-allow-origin"] == page and r.headers["vary"] == "Origin"
    exposed = r.headers["access-control-expose-headers"]
    assert "x-request-id" in exposed and "x-ratelimit-remaining-requests" in exposed
    # Errors carry them too, so the page can read why.
    r = await client.post(chat, json={"model": "nope", "messages": []}, headers={"origin": page})
    assert r.status_code >= 400 and r.headers["access-control-allow-origin"] == page
    # Only that origin: the list is not a pattern.
    r = await client.post(chat, json=CHAT, headers={"origin": "http://127.0.0.1:30001"})
    assert_envelope(r, 403, "forbidden_origin")
    assert len(upstream.requests) == 1


# -- Content-Type


async def test_relayed_posts_must_say_json(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(one_provider(upstream))
    body = json.dumps(CHAT).encode()
    for path in (
        "/v1/chat/completions",
        "/chat/completions",
        "/openai/deployments/m/chat/completions",
    ):
        for content_type in ("text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                             "multipart/form-data; boundary=x", None):  # fmt: skip
            headers = {} if content_type is None else {"content-type": content_type}
            r = await client.post(gw.url + path, content=body, headers=headers)
            err = assert_envelope(r, 415, "unsupported_media_type")
            assert err["details"]["content_type"] == content_type
    r = await client.post(f"{gw.url}/v1/messages", content=body)
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    # Audio uploads take multipart, and only multipart.
    r = await client.post(f"{gw.base_url}/audio/transcriptions", json={"model": "m"})
    assert_envelope(r, 415, "unsupported_media_type")
    assert upstream.requests == []
    for content_type in ("application/json", "Application/JSON; charset=utf-8"):
        r = await client.post(f"{gw.base_url}/chat/completions", content=body,
                              headers={"content-type": content_type})  # fmt: skip
        assert r.status_code == 200, r.text
    r = await client.post(f"{gw.base_url}/audio/transcriptions", data={"model": "m"},
                          files={"file": ("a.wav", b"RIFF")})  # fmt: skip
    assert r.status_code == 200, r.text
    assert [req.path for req in upstream.requests] == ["/v1/chat/completions"] * 2 + [
        "/v1/audio/transcriptions"
    ]
    # What is not a relayed POST is not asked for one.
    assert (await client.get(f"{gw.base_url}/models")).status_code == 200


# -- with keys, the key is the gate


async def test_with_keys_no_host_origin_or_media_type_checks(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(one_provider(upstream), KEYS)
    key = {"authorization": "Bearer sk-team"}
    headers = {**key, "host": "gw.example.com", "origin": "https://app.example.com",
               "sec-fetch-site": "cross-site", "content-type": "text/plain"}  # fmt: skip
    r = await client.post(f"{gw.base_url}/chat/completions", content=json.dumps(CHAT),
                          headers=headers)  # fmt: skip
    assert r.status_code == 200, r.text
    assert "access-control-allow-origin" not in r.headers
    r = await client.get(f"{gw.url}/healthz", headers={"host": "gw.example.com"})
    assert r.status_code == 200
    r = await client.post(f"{gw.base_url}/chat/completions", json=CHAT, headers={"host": "x.test"})
    assert_envelope(r, 401, "unauthorized")
    assert len(upstream.requests) == 1


async def test_the_rules_follow_a_reload_of_the_keys(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    gw = await gateway(one_provider(upstream), KEYS, reload_interval=0.05)
    foreign = {"host": "gw.example.com", "authorization": "Bearer sk-team"}
    assert (await client.get(f"{gw.base_url}/models", headers=foreign)).status_code == 200
    (tmp_path / "keys.yaml").write_text("keys: []\n")

    async def misdirected() -> bool:
        r = await client.get(f"{gw.base_url}/models", headers=foreign)
        return r.status_code == 421

    await until(misdirected)
    (tmp_path / "keys.yaml").write_text(KEYS)

    async def served() -> bool:
        r = await client.get(f"{gw.base_url}/models", headers=foreign)
        return r.status_code == 200

    await until(served)


# -- the console's loopback rule, /console/data and /metrics


async def test_a_forwarded_request_is_not_loopback_for_the_console(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(one_provider(upstream))
    assert (await client.get(f"{gw.url}/console/data")).status_code == 200
    for header in ("forwarded", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"):
        for path in ("/console", "/console/data"):
            r = await client.get(gw.url + path, headers={header: "127.0.0.1"})
            assert_envelope(r, 403, "admin_required")


def start_nginx(folder: Path, gateway_port: int) -> tuple[subprocess.Popen[bytes], int]:
    """A real nginx on 127.0.0.1 in front of the gateway, adding X-Forwarded-For as a
    reverse proxy does; returns once it listens (bounded: 10 s). Stop it with stop()."""
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed: `apt-get install nginx` (.ci/run does it)")
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    (folder / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{gateway_port};
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
""")
    proc = subprocess.Popen(
        [NGINX, "-p", str(folder), "-e", str(folder / "error.log"),
         "-c", str(folder / "nginx.conf"), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise AssertionError((folder / "error.log").read_text()) from None
            time.sleep(0.05)


@pytest.fixture
async def proxied(
    gateway: GatewayFactory, upstream: Upstream, tmp_path: Path
) -> AsyncIterator[tuple[RunningGateway, int]]:
    """A keyless gateway behind nginx; (gateway, nginx's port)."""
    gw = await gateway(one_provider(upstream))
    folder = tmp_path / "nginx"
    folder.mkdir()
    proc, port = await asyncio.to_thread(start_nginx, folder, gw.port)
    try:
        yield gw, port
    finally:
        await asyncio.to_thread(stop, proc)


async def test_the_console_behind_nginx_without_keys(
    proxied: tuple[RunningGateway, int], client: httpx.AsyncClient
) -> None:
    gw, port = proxied
    via = f"http://127.0.0.1:{port}"
    for path in ("/console", "/console/data"):
        assert (await client.get(gw.url + path)).status_code == 200  # straight to it
        assert_envelope(await client.get(via + path), 403, "admin_required")
    # The proxy itself works: the rest is served through it.
    assert (await client.get(via + "/healthz")).status_code == 200


async def test_metrics_admin(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    scrapers = await gateway(one_provider(upstream), KEYS)
    assert (await client.get(f"{scrapers.url}/metrics")).status_code == 200  # open by default
    gw = await gateway(one_provider(upstream), KEYS, metrics_admin=True)
    r = await client.get(f"{gw.url}/metrics")
    assert_envelope(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Basic ")
    r = await client.get(f"{gw.url}/metrics", headers={"authorization": "Bearer sk-team"})
    assert_envelope(r, 403, "admin_required")
    r = await client.get(f"{gw.url}/metrics", headers={"authorization": "Bearer sk-nope"})
    assert_envelope(r, 401, "unauthorized")
    for auth in ({"authorization": "Bearer sk-ops"}, {"x-api-key": "sk-ops"}):
        r = await client.get(f"{gw.url}/metrics", headers=auth)
        assert r.status_code == 200 and "# TYPE gateway_requests counter" in r.text
    r = await client.get(f"{gw.url}/metrics", auth=("prometheus", "sk-ops"))  # basic_auth
    assert r.status_code == 200
    # /console/data needs the admin key as well (SPEC §13), the same way.
    assert_envelope(await client.get(f"{gw.url}/console/data"), 401, "unauthorized")
    r = await client.get(f"{gw.url}/console/data", headers={"authorization": "Bearer sk-team"})
    assert_envelope(r, 403, "admin_required")
    # Without keys, --metrics-admin has no admin to ask for: loopback scrapers are served.
    keyless = await gateway(one_provider(upstream), "keys: []\n", metrics_admin=True)
    assert (await client.get(f"{keyless.url}/metrics")).status_code == 200


# -- a real browser: a page on another loopback port, and a rebound name

PAGE = b"""<!doctype html><meta charset="utf-8"><title>elsewhere</title><pre id="out"></pre>
<script>
const gw = "http://127.0.0.1:" + new URLSearchParams(location.search).get("gw");
const body = JSON.stringify({model: "m", messages: [{role: "user", content: "spend it"}]});
async function main() {
  const out = {};
  try {  // what a page can send without a preflight: text/plain, answer unreadable
    const r = await fetch(gw + "/v1/chat/completions", {method: "POST", mode: "no-cors", body});
    out.nocors = r.type;
  } catch (e) { out.nocors = "error"; }
  try {
    const r = await fetch(gw + "/v1/chat/completions",
      {method: "POST", headers: {"content-type": "application/json"}, body});
    out.cors = r.status;
    out.request_id = r.headers.get("x-request-id");
    out.answer = await r.json();
  } catch (e) { out.cors = "error"; }
  document.getElementById("out").textContent = JSON.stringify(out);
}
main();
</script>
"""


@pytest.fixture
async def page_server() -> AsyncIterator[int]:
    """Serves PAGE on another loopback port: another origin than any gateway's."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n"
        writer.write(head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(PAGE) + PAGE)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
def rebinding_browser() -> Iterator[Any]:
    """Headless Chromium that resolves rebound.test to 127.0.0.1, as a DNS-rebinding
    attacker's name does after its first answer."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        raise RuntimeError("chromium and chromium-driver are not installed: make test-tools")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--no-first-run", "--host-resolver-rules=MAP rebound.test 127.0.0.1"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()  # stops chromedriver and the browser it started


def run_page(browser: Any, page: int, gw: int) -> dict[str, Any]:
    browser.get(f"http://127.0.0.1:{page}/?gw={gw}")
    done = wait_for(lambda: browser.find_element("id", "out").get_attribute("textContent"))
    assert done, browser.page_source[:600]
    return dict(json.loads(done))


async def test_a_web_page_on_another_origin_cannot_spend_the_credit(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    page_server: int,
    rebinding_browser: Any,
) -> None:
    closed = await gateway(one_provider(upstream))
    # Selenium blocks: the browser is driven from a thread while this loop serves.
    got = await asyncio.to_thread(run_page, rebinding_browser, page_server, closed.port)
    # The no-cors POST went out and its (opaque) answer came back; the cors one stopped
    # at its refused preflight.
    assert got == {"nocors": "opaque", "cors": "error"}, got
    assert upstream.requests == []
    assert await refusals(client, closed, 403) == 2  # the no-cors POST and the preflight

    # Rebinding: the browser thinks it talks to rebound.test, the socket is loopback.
    def rebound() -> str:
        rebinding_browser.get(f"http://rebound.test:{closed.port}/console/data")
        return str(rebinding_browser.page_source)

    source = await asyncio.to_thread(rebound)
    assert "misdirected_request" in source and '"models"' not in source
    # Chromium tries a 421 again on a new connection, and asks for a favicon: all refused.
    assert await refusals(client, closed, 421) >= 1

    # With the page's origin listed: the cors fetch is answered and read; the no-cors
    # one still cannot say JSON (415), and never reaches the upstream.
    listed = await gateway(
        one_provider(upstream), cors_origins=(f"http://127.0.0.1:{page_server}",)
    )
    got = await asyncio.to_thread(run_page, rebinding_browser, page_server, listed.port)
    assert got["nocors"] == "opaque" and got["cors"] == 200, got
    assert got["answer"]["model"] == "m" and got["answer"]["choices"][0]["message"]["content"]
    assert got["request_id"]  # an exposed header the page may read
    assert await refusals(client, listed, 415) == 1
    assert len(upstream.requests) == 1
    assert upstream.requests[0].header("content-type") == "application/json"
