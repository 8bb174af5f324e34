"""SPEC §12's console in a real headless browser (Debian's chromium and chromium-driver,
driven by selenium), and its data endpoint over HTTP."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.console import AdminRequired, ConsoleEndpoint
from tests.conftest import GatewayFactory
from tests.helpers import assert_envelope
from tests.scripted_upstream import Json, Upstream, chat_completion

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEYS = yaml.safe_dump({"keys": [
    {"name": "team", "key": "sk-team", "rpm": 100, "budget": {"usd": 5, "period": "month"}},
    {"name": "ops", "key": "sk-ops", "admin": True},
]})  # fmt: skip
ADMIN = {"authorization": "Bearer sk-ops"}
# A provider's prompt cache at work: 800 of 1,000 prompt tokens read from it.
CACHED = {"prompt_tokens": 1000, "completion_tokens": 5, "total_tokens": 1005,
          "prompt_tokens_details": {"cached_tokens": 800}}  # fmt: skip
# A session id is the client's own string: the page shows it as text, cut short.
HOSTILE_SESSION = '<img src=x onerror="document.title=1">' + "-" * 40 + "tail"


def routes(upstream: Upstream) -> str:
    return (
        "providers:\n  echo: {base_url: 'builtin:echo'}\n"
        f"  other: {{base_url: {upstream.url}}}\n"
        "models:\n"
        "  echo:\n    name: The echo\n    providers:\n"
        "      - {provider: echo, price: {input: 1000, output: 1000}}\n"
        "  plain:\n    strategy: round_robin\n    providers:\n      - {provider: other, model: up}\n"
    )


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        raise RuntimeError("chromium and chromium-driver are not installed: make test-tools")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--window-size=1280,860", "--no-first-run"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()  # stops chromedriver and the browser it started


def text(driver: Any, element_id: str) -> str:
    return str(driver.find_element("id", element_id).get_attribute("textContent"))


def wait_for(check: Any, within: float = 10.0) -> Any:
    """Bounded polling, for the browser's side (a thread of its own)."""
    deadline = time.monotonic() + within
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


async def test_the_console_in_a_browser(
    gateway: GatewayFactory, upstream: Upstream, browser: Any, tmp_path: Path
) -> None:
    gw = await gateway(routes(upstream), KEYS)
    upstream.script(*[Json({**chat_completion(), "usage": CACHED})] * 3)
    # Selenium blocks: the browser is driven from a thread while this loop serves it.
    await asyncio.to_thread(drive, browser, gw.url, tmp_path)


def drive(browser: Any, url: str, tmp_path: Path) -> None:
    # Without the admin key, the browser gets the 401 (a Basic challenge, which headless
    # Chromium cannot answer), not the page.
    browser.get(f"{url}/console")
    assert "models-list" not in browser.page_source
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": ADMIN})
    browser.get(f"{url}/console")
    assert wait_for(lambda: browser.find_elements("css selector", "#models-list li")), (
        browser.page_source[:600],
        browser.get_log("browser"),
    )
    slugs = [li.text for li in browser.find_elements("css selector", "#models-list li")]
    assert slugs == ["echo", "plain"]

    # The first model: every snippet names it and this gateway; it serves messages, so
    # the Anthropic SDK's snippet is there too.
    assert f'OpenAI(base_url="{url}/v1"' in text(browser, "snippet-openai")
    assert 'model="echo"' in text(browser, "snippet-openai")
    assert f"{url}/v1/chat/completions" in text(browser, "snippet-curl")
    assert '"model": "echo"' in text(browser, "snippet-requests")
    assert f'anthropic.Anthropic(base_url="{url}"' in text(browser, "snippet-anthropic")
    assert "strategy fallback" in text(browser, "model-meta")
    # Picking the other model changes them; it does not serve messages: no Anthropic.
    browser.find_element("css selector", '#models-list li[data-slug="plain"]').click()
    assert 'model="plain"' in text(browser, "snippet-openai")
    assert '"model": "plain"' in text(browser, "snippet-curl")
    assert text(browser, "snippet-anthropic") == ""
    assert "strategy round_robin" in text(browser, "model-meta")
    langs = [b.text for b in browser.find_elements("css selector", "#snippet-tabs button")]
    assert langs == ["Python (OpenAI SDK)", "Python (requests)", "cURL"]
    browser.find_element("css selector", '#snippet-tabs button[data-lang="curl"]').click()
    assert text(browser, "snippet").startswith(f"curl {url}/v1/chat/completions")

    # Traffic: the numbers move after requests (the page reloads its data every 3 s).
    browser.find_element("css selector", '#nav button[data-tab="traffic"]').click()
    before = int(text(browser, "traffic-total").replace(",", ""))
    body = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}
    with httpx.Client(timeout=10) as client:
        for _ in range(4):
            r = client.post(f"{url}/v1/chat/completions", json=body,
                            headers={"authorization": "Bearer sk-team"})  # fmt: skip
            assert r.status_code == 200
    moved = wait_for(lambda: int(text(browser, "traffic-total").replace(",", "")) >= before + 4)
    assert moved, text(browser, "traffic-total")
    assert "team" in text(browser, "tokens-table") and "team" in text(browser, "cost-table")
    assert text(browser, "traffic-p50") != "-"

    # The prompt cache: the scripted upstream reads 800 of each 1,000 prompt tokens
    # from its cache, for two sessions of the team key.
    cached = {"model": "plain", "messages": [{"role": "user", "content": "again"}]}
    with httpx.Client(timeout=10) as client:
        for session in ("agent-1", "agent-1", HOSTILE_SESSION):
            r = client.post(f"{url}/v1/chat/completions", json=cached,
                            headers={"authorization": "Bearer sk-team",
                                     "x-claude-code-session-id": session})  # fmt: skip
            assert r.status_code == 200
    assert wait_for(lambda: "agent-1" in text(browser, "cache-sessions-table")), text(
        browser, "cache-panel"
    )
    cells = [
        [td.text for td in tr.find_elements("css selector", "td")]
        for tr in browser.find_elements("css selector", "#cache-sessions-table tr")[1:]
    ]
    assert cells[0][:4] == ["team", "agent-1", "2,000", "1,600"] and cells[0][4].startswith("80%")
    shown = HOSTILE_SESSION[:40] + "…"
    assert cells[1][:4] == ["team", shown, "1,000", "800"] and cells[1][4].startswith("80%")
    row = browser.find_elements("css selector", "#cache-sessions-table tr")[2]
    assert row.find_element("css selector", "span.mono").get_attribute("title") == HOSTILE_SESSION
    assert not browser.find_elements("css selector", "#cache-panel img")  # text, not markup
    assert browser.title == "gateway console"
    keys = [[td.text for td in tr.find_elements("css selector", "td")]
            for tr in browser.find_elements("css selector", "#cache-keys-table tr")[1:]]  # fmt: skip
    # The echo requests above count their prompts too (no cache): the team's ratio
    # is over all its prompt tokens.
    team = next(k for k in keys if k[0] == "team")
    prompt = int(team[1].replace(",", ""))
    assert prompt > 3000 and team[2] == "2,400"
    for shown_ratio in (team[3], text(browser, "cache-ratio")):
        assert abs(float(shown_ratio.partition("%")[0]) - 100 * 2400 / prompt) < 0.1, shown_ratio

    browser.find_element("css selector", '#nav button[data-tab="keys"]').click()
    keys = text(browser, "keys-table")
    assert "100 rpm" in keys and "$5/month" in keys and "7 requests" in keys  # 4 echo, 3 cached
    browser.find_element("css selector", '#nav button[data-tab="providers"]').click()
    assert "closed" in text(browser, "providers-table")

    browser.find_element("css selector", '#nav button[data-tab="models"]').click()
    browser.find_element("css selector", '#models-list li[data-slug="echo"]').click()
    browser.save_screenshot(str(tmp_path / "console.png"))
    if os.environ.get("GATEWAY_SCREENSHOT"):  # `make screenshot`: the README's picture
        browser.save_screenshot(os.environ["GATEWAY_SCREENSHOT"])
    assert "tracing off" in text(browser, "status")
    assert not browser.find_element("id", "error").is_displayed(), text(browser, "error")
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    # The one expected: the 401 of the first visit, before the key was given.
    assert all("401" in e["message"] for e in errors), errors
    assert len(errors) <= 1


async def test_console_data_needs_an_admin_key(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), KEYS)
    for path in ("/console", "/console/data"):
        r = await client.get(gw.url + path)
        assert_envelope(r, 401, "unauthorized")
        assert r.headers["www-authenticate"].startswith('Basic realm="gateway console"')
        r = await client.get(gw.url + path, headers={"authorization": "Bearer sk-team"})
        assert_envelope(r, 403, "admin_required")
        r = await client.post(gw.url + path, headers=ADMIN)
        assert_envelope(r, 405, "method_not_allowed")
    r = await client.get(f"{gw.url}/console", auth=("anyone", "sk-ops"))  # Basic
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert b"http://" not in r.content.replace(b"http://www.w3.org/2000/svg", b"")  # no CDN
    data = (await client.get(f"{gw.url}/console/data", headers=ADMIN)).json()
    assert [m["slug"] for m in data["models"]] == ["echo", "plain"]
    assert data["models"][0]["providers"][0]["price"]["input"] == 1000
    assert {k["name"] for k in data["keys"]} == {"team", "ops"}
    assert data["traffic"]["step_seconds"] == 10 and data["traffic"]["points"]
    assert "sk-team" not in str(data) and "sk-ops" not in str(data)


async def test_the_prompt_cache_per_key_and_session_in_the_console_data(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(
        f"providers:\n  p: {{base_url: {upstream.url}, apis: [chat, responses, messages]}}\n"
        "models:\n  m:\n    providers:\n      - {provider: p, model: up}\n",
        KEYS,
    )
    # 1,000 prompt tokens each, in each family's words, from the scripted upstream.
    upstream.script(
        Json({**chat_completion(), "usage": CACHED}),
        Json({"id": "resp_1", "object": "response", "model": "up", "output": [],
              "usage": {"input_tokens": 1000, "output_tokens": 5,
                        "input_tokens_details": {"cached_tokens": 600}}}),
        Json({"id": "msg_1", "type": "message", "role": "assistant", "model": "up",
              "content": [], "usage": {"input_tokens": 50, "output_tokens": 5,
                                       "cache_read_input_tokens": 900,
                                       "cache_creation_input_tokens": 50}}),
        Json({**chat_completion(), "usage": CACHED}),
    )  # fmt: skip
    team = {"authorization": "Bearer sk-team"}
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    sent = [
        ("/v1/chat/completions", {**chat, "session_id": "body-session"}, {}),
        ("/v1/responses", {"model": "m", "input": "hi"}, {"session-id": "codex-thread"}),
        ("/v1/messages", {**chat, "max_tokens": 10}, {"x-claude-code-session-id": "claude"}),
        ("/v1/chat/completions", chat, {}),  # no session: the key's ratio only
    ]
    for path, body, headers in sent:
        r = await client.post(gw.url + path, json=body, headers={**team, **headers})
        assert r.status_code == 200, r.text
    data = (await client.get(f"{gw.url}/console/data", headers=ADMIN)).json()
    cache = data["traffic"]["prompt_cache"]
    assert cache["keys"] == [
        {"key": "team", "prompt": 4000, "cache_read": 3100, "hit_ratio": 0.775}
    ]
    assert cache["sessions"] == [
        {"key": "team", "session": "body-session", "prompt": 1000, "cache_read": 800,
         "hit_ratio": 0.8},
        {"key": "team", "session": "claude", "prompt": 1000, "cache_read": 900,
         "hit_ratio": 0.9},
        {"key": "team", "session": "codex-thread", "prompt": 1000, "cache_read": 600,
         "hit_ratio": 0.6},
    ]  # fmt: skip
    assert data["traffic"]["points"][-1]["prompt_cache"] == {
        "team": {"prompt": 4000, "cache_read": 3100}
    }


async def test_the_last_error_and_the_breaker_reach_the_console(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    from tests.scripted_upstream import Json

    gw = await gateway(routes(upstream))  # no keys: loopback may look
    upstream.script(*[Json({"error": {"message": "down"}}, status=503)] * 3)
    body = {"model": "plain", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):
        await client.post(f"{gw.base_url}/chat/completions", json=body)
    data = (await client.get(f"{gw.url}/console/data")).json()
    entry = next(p for p in data["providers"] if p["provider"] == "other")
    assert entry["state"] == "open" and entry["retry_in_s"] > 0
    assert entry["last_error"] == "HTTP 503 from the upstream" and entry["error_rate"] > 0.4
    assert data["traffic"]["points"][-1]["errors"] == 3


def test_with_no_keys_only_loopback_may_look() -> None:
    from types import SimpleNamespace

    from gateway.config.keys import Keys

    runtime = SimpleNamespace(config=SimpleNamespace(keys=Keys()))

    endpoint = ConsoleEndpoint(runtime)  # type: ignore[arg-type]
    endpoint._admit({"client": ("127.0.0.1", 5000), "headers": []})
    with pytest.raises(AdminRequired):
        endpoint._admit({"client": ("10.1.2.3", 5000), "headers": []})
    # A proxy on this machine is a loopback peer too: what it forwards is not (SPEC §13).
    for name in (b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"):
        with pytest.raises(AdminRequired):
            endpoint._admit({"client": ("127.0.0.1", 5000), "headers": [(name, b"for=1.2.3.4")]})
    endpoint._admit({"client": ("::1", 5000), "headers": [(b"x-forwarder", b"not a proxy's")]})
