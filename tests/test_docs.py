"""Keep the docs honest: the recipes validate, the deploy files say what they must, the
SDK examples run against a real gateway serving the built-in `echo` model, and every list
the docs keep (flags and variables, fields, access-log fields, metrics, headers, install
commands, links) matches what the code does."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.config.settings import OPTIONS
from tests.conftest import GatewayFactory, RunningGateway

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CHANGELOG = ROOT / "CHANGELOG.md"
RECIPES = DOCS / "recipes.md"
CONFIGURATION = DOCS / "configuration.md"
OPERATIONS = DOCS / "operations.md"
SECURITY = DOCS / "security.md"
HTTP_API = DOCS / "http-api.md"
PAGES = [README, CHANGELOG, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 420
SDK_EXAMPLES = DOCS / "sdk-examples.md"
UNIT = DOCS / "deploy" / "gateway.service"
K8S = DOCS / "deploy" / "k8s-sidecar.yaml"

DOC_ORIGIN = "http://127.0.0.1:8080"  # what the docs say; tests swap in a real gateway's
DOC_BASE_URL = DOC_ORIGIN + "/v1"
SKIP_MARKER = "# docs-test: skip"
DRAIN_SECONDS = 30.0  # the gateway's default --drain-seconds

FENCE = re.compile(r"^```[ \t]*([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:-[^}]*)?\}")
SECRET_REF = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-)?\}")
SECRET_HEADERS = {"authorization", "api-key", "x-api-key"}

# Every provider the recipes promise, by the base_url it must use.
PROVIDER_URLS = {
    "OpenAI": "https://api.openai.com/v1",
    "Azure OpenAI v1": ".openai.azure.com/openai/v1",
    "Groq": "https://api.groq.com/openai/v1",
    "Mistral": "https://api.mistral.ai/v1",
    "OpenRouter": "https://openrouter.ai/api/v1",
    "vLLM": "http://127.0.0.1:8000/v1",
    "Ollama": "http://127.0.0.1:11434/v1",
}


@dataclass(frozen=True)
class Block:
    path: Path
    lang: str
    code: str
    line: int

    @property
    def id(self) -> str:
        return f"{self.path.name}:{self.line}"


def fenced(path: Path) -> list[Block]:
    text = path.read_text()
    return [
        Block(path, m.group(1).lower(), m.group(2), text.count("\n", 0, m.start()) + 1)
        for m in FENCE.finditer(text)
    ]


def top_level(code: str, key: str) -> bool:
    return re.search(rf"^{key}:", code, re.M) is not None


RECIPE_BLOCKS = [b for b in fenced(RECIPES) + fenced(CONFIGURATION) if b.lang == "yaml"]
ROUTE_BLOCKS = [b for b in RECIPE_BLOCKS if top_level(b.code, "providers")]
KEY_BLOCKS = [b for b in RECIPE_BLOCKS if top_level(b.code, "keys")]
SDK_BLOCKS = fenced(SDK_EXAMPLES)
# The README's quick start shows the Python SDK and curl too: they run the same way.
README_BLOCKS = fenced(ROOT / "README.md")
PYTHON_BLOCKS = [b for b in SDK_BLOCKS + README_BLOCKS if b.lang == "python"]


def curl_commands(blocks: list[Block]) -> list[tuple[str, str]]:
    """(id, command) for every `curl` command in the sh blocks, continuations joined."""
    out = []
    for block in blocks:
        if block.lang not in ("sh", "bash", "shell"):
            continue
        for n, line in enumerate(block.code.replace("\\\n", " ").splitlines()):
            if line.strip().startswith("curl "):
                out.append((f"{block.id}#{n}", line.strip()))
    return out


CURL_COMMANDS = curl_commands(SDK_BLOCKS + README_BLOCKS)


def check_env(*texts: str) -> dict[str, str]:
    """The environment for `gateway check`: dummies for every ${VAR} without a default;
    variables with a default are left unset so the default is what gets checked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    found = [match for text in texts for match in VAR.findall(text)]
    for name, _ in found:
        env.pop(name, None)
    for name, default in found:
        if not default:
            env[name] = "dummy-" + name.lower().replace("_", "-")
    return env


def gateway_check(tmp_path: Path, routes: str, keys: str = "") -> subprocess.CompletedProcess[str]:
    (tmp_path / "routes.yaml").write_text(routes)
    (tmp_path / "keys.yaml").write_text(keys)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "check",
            "--routes",
            "routes.yaml",
            "--keys",
            "keys.yaml",
        ],
        cwd=tmp_path,
        env=check_env(routes, keys),
        capture_output=True,
        text=True,
        timeout=30,
    )


def with_gateway(text: str, gw: RunningGateway) -> str:
    """The docs' URL swapped for the test gateway's; nothing may still point at :8080."""
    assert DOC_ORIGIN in text, "example does not use http://127.0.0.1:8080"
    swapped = text.replace(DOC_BASE_URL, gw.base_url).replace(DOC_ORIGIN, gw.url)
    stray = re.search(r"(127\.0\.0\.1|localhost|\[::1\]):8080(?!\d)", swapped)
    assert stray is None, f"example reaches port 8080 some other way:\n{swapped}"
    return swapped


async def serve_echo(gateway: GatewayFactory) -> RunningGateway:
    """A gateway on the routes.yaml that `make run` serves, with no keys."""
    return await gateway((ROOT / "routes.yaml").read_text())


# ---------------------------------------------------------------- recipes


@pytest.mark.parametrize("block", ROUTE_BLOCKS, ids=[b.id for b in ROUTE_BLOCKS])
def test_recipe_passes_gateway_check(block: Block, tmp_path: Path) -> None:
    result = gateway_check(tmp_path, block.code)
    assert result.returncode == 0, f"{block.id} fails `gateway check`:\n{result.stderr}"
    assert "OK" in result.stdout


@pytest.mark.parametrize("block", KEY_BLOCKS, ids=[b.id for b in KEY_BLOCKS])
def test_recipe_keys_pass_gateway_check(block: Block, tmp_path: Path) -> None:
    routes = (ROOT / "routes.yaml").read_text()
    # An abbreviated digest (`5e88...`) stands for a real one.
    keys = re.sub(r"sha256: [0-9a-f]*\.\.\.", "sha256: " + "ab" * 32, block.code)
    result = gateway_check(tmp_path, routes, keys)
    assert result.returncode == 0, f"{block.id} fails `gateway check`:\n{result.stderr}"


def test_recipes_cover_every_provider_and_the_combined_example() -> None:
    assert len(ROUTE_BLOCKS) >= 9
    orphans = [b.id for b in RECIPE_BLOCKS if b not in ROUTE_BLOCKS and b not in KEY_BLOCKS]
    assert not orphans, f"yaml blocks no test validates: {orphans}"
    assert [b for b in KEY_BLOCKS if b.path == CONFIGURATION], "configuration.md lost keys.yaml"
    parsed = [yaml.safe_load(b.code) for b in ROUTE_BLOCKS if b.path == RECIPES]
    urls = [p["base_url"] for doc in parsed for p in doc["providers"].values()]
    for provider, url in PROVIDER_URLS.items():
        assert any(url in u for u in urls), f"no {provider} recipe with base_url {url}"
    local = [u for u in urls if u.startswith("http://127.0.0.1:")]
    assert any(u not in PROVIDER_URLS.values() for u in local), "no llama.cpp recipe"
    assert not [u for u in urls if ":8080" in u], "an upstream on the gateway's own port"
    combined = [
        doc
        for doc in parsed
        if any("*" in slug for slug in doc["models"])
        and any(
            len({e["provider"] for e in m["providers"]}) >= 2
            and m.get("strategy", "fallback") == "fallback"
            for m in doc["models"].values()
        )
    ]
    assert combined, "no example with a fallback across two providers and a wildcard"


@pytest.mark.parametrize("block", ROUTE_BLOCKS, ids=[b.id for b in ROUTE_BLOCKS])
def test_recipe_secrets_come_from_the_environment(block: Block) -> None:
    for name, provider in yaml.safe_load(block.code)["providers"].items():
        secrets = [provider["api_key"]] if "api_key" in provider else []
        headers = provider.get("headers") or {}
        secrets += [v for k, v in headers.items() if k.lower() in SECRET_HEADERS]
        for value in secrets:
            assert SECRET_REF.fullmatch(str(value)), f"{block.id}: {name} has a literal secret"


# ---------------------------------------------------------------- deploy files


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "ms": 0.001}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_systemd_unit() -> None:
    s = unit_settings()
    assert any(re.search(r"kill -HUP \$MAINPID", v) for v in s["Service.ExecReload"])
    assert s["Service.KillSignal"] == ["SIGTERM"]
    drain = DRAIN_SECONDS
    for env in s.get("Service.Environment", []):
        if env.startswith("GATEWAY_DRAIN_SECONDS="):
            drain = float(env.partition("=")[2])
        if env.startswith("GATEWAY_HOST="):
            assert env.partition("=")[2] in ("127.0.0.1", "localhost", "::1")
    assert seconds(s["Service.TimeoutStopSec"][-1]) > max(drain, DRAIN_SECONDS)
    assert any(" serve" in v for v in s["Service.ExecStart"])
    assert s["Service.WorkingDirectory"] and s["Service.EnvironmentFile"]
    assert s.get("Service.DynamicUser") == ["yes"] or "Service.User" in s
    assert s.get("Service.NoNewPrivileges") == ["yes"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "gateway.service"
    unit.write_text(UNIT.read_text())
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30
    )
    problems = [ln for ln in (result.stdout + result.stderr).splitlines() if unit.name in ln]
    assert not problems, "\n".join(problems)


def k8s_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(K8S.read_text()) if d is not None]


def k8s_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def k8s_gateway(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod.get("initContainers", []) + pod["containers"]
    (gateway,) = [c for c in containers if "serve" in c.get("command", []) + c.get("args", [])]
    return gateway


def probe_commands(container: dict[str, Any]) -> list[list[str]]:
    return [
        container[p]["exec"]["command"]
        for p in ("startupProbe", "readinessProbe", "livenessProbe")
        if p in container
    ]


def test_k8s_manifest() -> None:
    docs = k8s_docs()
    pod = k8s_pod(docs)
    gateway = k8s_gateway(pod)
    env = {e["name"]: e.get("value") for e in gateway.get("env", [])}
    assert env.get("GATEWAY_HOST", "127.0.0.1") in ("127.0.0.1", "localhost", "::1")
    assert env.get("GATEWAY_PORT", "8080") == "8080"
    drain = float(env.get("GATEWAY_DRAIN_SECONDS") or DRAIN_SECONDS)
    assert pod["terminationGracePeriodSeconds"] > max(drain, DRAIN_SECONDS)
    assert "readinessProbe" in gateway and "livenessProbe" in gateway
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        if name in gateway:
            probe = gateway[name]
            target = probe.get("httpGet", {}).get("path") or " ".join(probe["exec"]["command"])
            assert "/healthz" in target, f"{name} does not check /healthz"
    requests = gateway["resources"]["requests"]
    assert (requests["cpu"], requests["memory"]) == ("50m", "64Mi")
    for mount in gateway["volumeMounts"]:
        assert "subPath" not in mount, "subPath mounts never see ConfigMap updates"
    app_env = [e.get("value") for c in pod["containers"] for e in c.get("env", [])]
    assert DOC_BASE_URL in app_env, "the app is not pointed at the sidecar"


def test_k8s_config_passes_gateway_check(tmp_path: Path) -> None:
    docs = k8s_docs()
    (routes,) = [d["data"]["routes.yaml"] for d in docs if d["kind"] == "ConfigMap"]
    (keys,) = [
        d["stringData"]["keys.yaml"]
        for d in docs
        if d["kind"] == "Secret" and "keys.yaml" in d.get("stringData", {})
    ]
    result = gateway_check(tmp_path, routes, keys)
    assert result.returncode == 0, result.stderr
    provider_env = {
        name
        for d in docs
        if d["kind"] == "Secret"
        for name in d.get("stringData", {})
        if name.isupper()
    }
    assert {name for name, _ in VAR.findall(routes)} <= provider_env


async def test_k8s_probes_pass_against_a_gateway(gateway: GatewayFactory) -> None:
    gw = await serve_echo(gateway)
    commands = probe_commands(k8s_gateway(k8s_pod(k8s_docs())))
    assert commands
    for command in commands:
        assert command[0].startswith("python")
        argv = [
            sys.executable,
            *(with_gateway(a, gw) if DOC_ORIGIN in a else a for a in command[1:]),
        ]
        result = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=10
        )
        assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- SDK examples


def missing_imports(code: str) -> list[str]:
    modules = re.findall(r"^(?:from|import)\s+([A-Za-z_][\w]*)", code, re.M)
    return [m for m in modules if importlib.util.find_spec(m) is None]


def test_python_examples_are_there() -> None:
    runnable = [b for b in PYTHON_BLOCKS if SKIP_MARKER not in b.code]
    assert len(runnable) >= 2, "fewer than 2 Python examples run"
    for block in PYTHON_BLOCKS:
        if SKIP_MARKER in block.code:
            assert missing_imports(block.code), f"{block.id} is skipped but could run"
    langchain = [b for b in PYTHON_BLOCKS if "langchain_openai" in b.code]
    assert langchain and all(
        "ChatOpenAI(" in b.code and f'base_url="{DOC_BASE_URL}"' in b.code for b in langchain
    )
    assert any("stream=True" in b.code for b in runnable)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
async def test_python_example_runs(
    block: Block,
    gateway: GatewayFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if SKIP_MARKER in block.code and missing_imports(block.code):
        pytest.skip(f"needs {', '.join(missing_imports(block.code))}")
    monkeypatch.delenv("GATEWAY_KEY", raising=False)
    gw = await serve_echo(gateway)
    code = with_gateway(block.code, gw)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    await asyncio.wait_for(asyncio.to_thread(exec, code, namespace), 20)
    # Like the user code they show, the snippets leave their SDK clients open. Collect
    # those here, their sockets' ResourceWarnings ignored, rather than in a later test
    # whenever the garbage collector happens to run.
    namespace.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    out = capsys.readouterr().out
    assert "echo: hello" in out, f"{block.id} printed:\n{out}"


@pytest.mark.parametrize("command", CURL_COMMANDS, ids=[c[0] for c in CURL_COMMANDS])
async def test_curl_example_runs(command: tuple[str, str], gateway: GatewayFactory) -> None:
    gw = await serve_echo(gateway)
    cmd = with_gateway(command[1], gw)
    # --fail-with-body: an HTTP error status is a failure, not just any output.
    cmd = "curl --fail-with-body --max-time 10 " + cmd.removeprefix("curl ")
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_KEY"}
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, f"{cmd}\n{err.decode()}{out.decode()}"
    assert out.strip(), f"{cmd} printed nothing"
    if '"model": "echo"' in cmd:
        assert b"echo" in out


def test_curl_examples_are_there() -> None:
    commands = [c for _, c in CURL_COMMANDS]
    assert any("/v1/chat/completions" in c and '"stream": true' in c for c in commands)
    assert any("/v1/chat/completions" in c and '"stream"' not in c for c in commands)


def test_node_example(tmp_path: Path) -> None:
    (block,) = [b for b in SDK_BLOCKS if b.lang in ("js", "javascript", "mjs")]
    for needed in (
        'import OpenAI from "openai"',
        f'baseURL: "{DOC_BASE_URL}"',
        "apiKey: process.env.GATEWAY_KEY",
        'model: "echo"',
        "stream: true",
        "for await",
    ):
        assert needed in block.code, f"the Node example lacks {needed!r}"
    node = shutil.which("node")
    if node is None:
        return
    script = tmp_path / "app.mjs"
    script.write_text(block.code)
    # Syntax only: the openai package is not installed here, and --check does not load it.
    result = subprocess.run([node, "--check", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


README_ROUTES = [b for b in README_BLOCKS if b.lang == "yaml" and top_level(b.code, "providers")]


def test_readme_routes_reference_passes_gateway_check(tmp_path: Path) -> None:
    assert README_ROUTES, "the README lost its routes.yaml reference"
    for block in README_ROUTES:
        result = gateway_check(tmp_path, block.code)
        assert result.returncode == 0, f"{block.id} fails `gateway check`:\n{result.stderr}"


def test_readme_keys_reference_parses_with_a_real_digest(tmp_path: Path) -> None:
    """The README's keys.yaml abbreviates the digest (`5e88...`); with a real one in its
    place every field it shows must be accepted."""
    blocks = [b for b in README_BLOCKS if b.lang == "yaml" and top_level(b.code, "keys")]
    assert blocks
    for block in blocks:
        keys = re.sub(r"sha256: \S+", "sha256: " + "ab" * 32, block.code)
        routes = "providers: {}\nmodels: {}\n"
        result = gateway_check(tmp_path, routes, keys)
        assert result.returncode == 0, f"{block.id} fails `gateway check`:\n{result.stderr}"


# ---------------------------------------------------------------- the docs' lists


def section(path: Path, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of its level or above."""
    text = path.read_text()
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    stop = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start + len(heading))
    return text[start : stop.start() if stop else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row in text, header and rule rows left out."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or re.fullmatch(r"[|\-: ]+", line):
            continue
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]])
    return [r for r in rows if r and r[0] not in ("flag", "field", "metric", "where", "status")]


def ticked(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def test_readme_stands_alone_and_is_short() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    for page in PAGES:
        assert not re.search(r"\bSPEC\b", page.read_text()), f"{page.name} cites a SPEC"
    # Any CPython the pyz was not built with refuses it: no "3.11+" promise.
    assert not re.search(r"\d\.\d+\+", text), "the README promises Python versions"
    for heading in ("## Two commands", "## Command line", "## HTTP API", "## Development"):
        assert heading + "\n" in text
    assert "make run " in text and "make test " in text


def github_anchor(heading: str) -> str:
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_every_link_resolves() -> None:
    link = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
    for page in PAGES:
        for target in link.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            assert path.exists(), f"{page.name} links to {target}, which does not exist"
            assert ROOT in path.parents, f"{page.name} links outside the repository: {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
                anchors = {github_anchor(h) for h in headings}
                assert anchor in anchors, f"{page.name}: no heading {anchor!r} in {path.name}"


def test_command_line_table_is_the_options_table() -> None:
    rows = table_rows(section(README, "## Command line"))
    documented = set()
    for row in rows:
        flags = re.findall(r"--[a-z-]+", row[0])
        variables = re.findall(r"GATEWAY_[A-Z_]+", row[1]) if len(row) > 1 else []
        if flags and variables:
            documented.add((flags[0], variables[0]))
    assert documented == {(o.flag, o.var) for o in OPTIONS}


def test_every_variable_named_is_read_and_every_one_read_is_named() -> None:
    sources = "\n".join(p.read_text() for p in (ROOT / "gateway").rglob("*.py"))
    read = set(re.findall(r"[\"'](GATEWAY_[A-Z_]+|OTEL_[A-Z_]+)[\"']", sources))
    read |= {o.var for o in OPTIONS}
    readme = README.read_text()
    assert not read - set(re.findall(r"\b[A-Z_]+\b", readme)), "variables the README omits"
    # GATEWAY_KEY is the example apps' own variable (the secret they send).
    named = {v for page in PAGES for v in re.findall(r"\bGATEWAY_[A-Z_]+\b", page.read_text())}
    assert not named - read - {"GATEWAY_KEY"}, "docs name variables the gateway never reads"


def rejected_fields(tmp_path: Path) -> dict[str, set[str]]:
    """What `gateway check` accepts at each level, from its own unknown-key messages."""
    routes = """providers:
  p:
    base_url: builtin:echo
    zz_bogus: 1
    timeout: {connect: 1, zz_bogus: 1}
  q:
    base_url: https://example.com/v1
    auth: {oauth2: {token_url: "https://example.com/t", client_id: a, client_secret: b, zz_bogus: 1}}
models:
  m:
    zz_bogus: 1
    cooldown: {failures: 1, zz_bogus: 1}
    providers:
      - {provider: p, zz_bogus: 1, price: {input: 1, output: 1, zz_bogus: 1}}
  n:
    providers: [{provider: q}]
"""
    keys = """keys:
  - name: a
    key: sk-abc
    zz_bogus: 1
    token_quota: {tokens: 5, period: day, zz_bogus: 1}
    budget: {usd: 5, period: day, zz_bogus: 1}
"""
    result = gateway_check(tmp_path, routes, keys)
    found = re.findall(r"unknown key 'zz_bogus' in (.+?) \(allowed: ([^)]*)\)", result.stderr)
    where = {
        "provider 'p'": "provider",
        "provider 'p' timeout": "timeout",
        "provider 'q' auth.oauth2": "oauth2",
        "model 'm'": "model",
        "model 'm' provider entry": "entry",
        "model 'm' price": "price",
        "model 'm' cooldown": "cooldown",
        "a key entry": "key",
        "token_quota": "token_quota",
        "budget": "budget",
    }
    fields = {where[w]: set(allowed.split(", ")) for w, allowed in found}
    assert set(fields) == set(where.values()), result.stderr
    return fields


def test_fields_table_is_what_gateway_check_accepts(tmp_path: Path) -> None:
    accepted = rejected_fields(tmp_path)
    rows = table_rows(section(CONFIGURATION, "## Fields"))
    documented: dict[str, set[str]] = {}
    meaning: dict[str, str] = {}
    for where, names, text in rows:
        documented.setdefault(where, set()).update(ticked(names))
        meaning[where] = meaning.get(where, "") + " " + names + " " + text
    for where in ("provider", "model", "entry", "key"):
        assert documented[where] == accepted[where], f"{where} fields differ"
    nested = {"timeout": "provider", "oauth2": "provider", "cooldown": "model",
              "price": "entry", "token_quota": "key", "budget": "key"}  # fmt: skip
    for inner, where in nested.items():
        for name in accepted[inner]:
            assert re.search(rf"\b{name}\b", meaning[where]), f"{inner}.{name} undocumented"
    # The annotated files show every field too.
    for block in [b for b in fenced(CONFIGURATION) if b.lang == "yaml"]:
        doc = yaml.safe_load(block.code)
        if "providers" in doc:
            shown = {k for p in doc["providers"].values() for k in p}
            assert shown == accepted["provider"], "the annotated routes.yaml lacks a field"
            assert {k for m in doc["models"].values() for k in m} == accepted["model"]
            entries = [e for m in doc["models"].values() for e in m["providers"]]
            assert {k for e in entries for k in e} == accepted["entry"]
        else:
            assert {k for key in doc["keys"] for k in key} | {"key"} == accepted["key"]


async def served_and_refused_lines(
    gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> tuple[dict[str, Any], dict[str, Any], RunningGateway]:
    caplog.set_level(logging.INFO, logger="gateway.access")
    gw = await serve_echo(gateway)
    async with httpx.AsyncClient(timeout=10) as client:
        ok = await client.post(
            gw.base_url + "/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "hello"}]},
        )
        refused = await client.post(
            gw.base_url + "/chat/completions",
            json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert ok.status_code == 200 and refused.status_code == 400
    lines = [yaml.safe_load(r.getMessage()) for r in caplog.records if r.name == "gateway.access"]
    (served,) = [line for line in lines if line.get("status") == 200]
    (refusal,) = [line for line in lines if line.get("status") == 400]
    return served, refusal, gw


async def test_access_log_fields_are_what_is_written(
    gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    served, refused, _ = await served_and_refused_lines(gateway, caplog)
    tables = section(OPERATIONS, "## Access log").split("A request refused")
    assert [r[0].strip("`") for r in table_rows(tables[0])] == list(served)
    assert [r[0].strip("`") for r in table_rows(tables[1])] == list(refused)
    readme = section(README, "## Observability").split("- **Metrics**")[0]
    assert set(served) | set(refused) <= set(ticked(readme)), "the README's list differs"


async def test_metrics_list_is_what_metrics_serves(gateway: GatewayFactory) -> None:
    gw = await serve_echo(gateway)
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(gw.url + "/metrics")).text
    served = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        served[name + "_total" if kind == "counter" else name] = kind
    rows = table_rows(section(OPERATIONS, "## Metrics"))
    assert {r[0].strip("`"): r[1] for r in rows} == served
    readme = section(README, "## Observability")
    assert {n for n in ticked(readme) if n.startswith("gateway_")} == set(served)


async def test_console_csp_is_what_the_console_sends(gateway: GatewayFactory) -> None:
    gw = await serve_echo(gateway)
    async with httpx.AsyncClient(timeout=10) as client:
        page = await client.get(gw.url + "/console")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert f"Content-Security-Policy: {csp}\n" in OPERATIONS.read_text()
    assert csp in " ".join(SECURITY.read_text().split())
    for page_text in (p.read_text() for p in PAGES):
        for said in re.findall(r"Content-Security-Policy:\s*([^`\n]+(?:\n[^`\n]+)?)`", page_text):
            assert " ".join(said.split()) == csp, f"a narrower CSP is described: {said!r}"


def test_every_gateway_error_is_in_the_http_api_page() -> None:
    import inspect

    import gateway.errors as errors

    rows = {(r[0], r[1].strip("`")) for r in table_rows(section(HTTP_API, "## Errors"))}
    for cls in vars(errors).values():
        if inspect.isclass(cls) and issubclass(cls, errors.GatewayError):
            assert (str(cls.status), cls.code) in rows, f"{cls.__name__} is undocumented"


def extras() -> dict[str, list[str]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        name: [re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0] for dep in deps]
        for name, deps in project["optional-dependencies"].items()
    }


def test_install_commands_name_what_installs() -> None:
    # No package named `gateway` is on any registry: say the plain packages, or the extra
    # from a checkout.
    messages = [ROOT / "gateway" / "cli.py", ROOT / "gateway" / "config" / "providers.py"]
    for path in PAGES + messages:
        text = path.read_text()
        assert "gateway[" not in text, f"{path.name} names the unpublished gateway[...]"
        for extra in re.findall(r"pip install -e '\.\[(\w+)\]'", text):
            assert extra in extras(), f"{path.name}: no extra {extra!r} in pyproject.toml"
    docs = "\n".join(p.read_text() for p in PAGES)
    for extra in ("redis", "otel", "gcp", "aws"):
        plain = "pip install " + " ".join(extras()[extra])
        assert plain in " ".join(docs.split()), f"the docs never say {plain!r}"
    cli = messages[0].read_text()
    assert "pip install " + " ".join(extras()["redis"]) in cli
    providers = messages[1].read_text()
    assert all(f'"{" ".join(extras()[e])}"' in providers for e in ("gcp", "aws"))


# ---------------------------------------------------------------- state and Python


def test_systemd_unit_keeps_state_in_a_writable_directory() -> None:
    s = unit_settings()
    (state_dir,) = s["Service.StateDirectory"]
    env = dict(e.partition("=")[::2] for e in s.get("Service.Environment", []))
    state = (
        env.get("GATEWAY_STATE")
        or re.search(r"--state[ =](\S+)", " ".join(s["Service.ExecStart"]))[1]
    )  # type: ignore[index]
    # ProtectSystem=strict leaves only the unit's own directories writable.
    assert state.startswith(f"/var/lib/{state_dir}/"), state


def test_k8s_sidecar_keeps_state_on_a_writable_volume_and_runs_the_pyz_python() -> None:
    pod = k8s_pod(k8s_docs())
    gateway = k8s_gateway(pod)
    env = {e["name"]: e.get("value") for e in gateway.get("env", [])}
    state = env["GATEWAY_STATE"]
    mounts = [
        m for m in gateway["volumeMounts"] if state.startswith(m["mountPath"].rstrip("/") + "/")
    ]
    assert mounts and not mounts[-1].get("readOnly"), "the state path is not on a volume"
    (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[-1]["name"]]
    assert "emptyDir" in volume or "persistentVolumeClaim" in volume
    # The pyz runs only on the CPython it was built with: the venv's, as `make pyz` builds.
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert re.fullmatch(rf"python:{re.escape(here)}(-[a-z]+)?", gateway["image"])
    assert gateway["securityContext"]["readOnlyRootFilesystem"] is True
