"""Running the real agents and the gateway as subprocesses, for tests/agents and
bench/agents.py: where `make test-agents` installed them, the environment that keeps them
on this machine, `gateway serve` on port 0, and one agent run with its events.

Every process started here is stopped by its own id, on failure too."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
AGENTS_DIR = Path(os.environ.get("GATEWAY_AGENTS_DIR", REPO / "build" / "agents"))
BIN = AGENTS_DIR / "node_modules" / ".bin"
INSTALL_HINT = (
    "run `make test-agents` (it installs Node 22, Claude Code and Codex into build/agents)"
)

KEY = "sk-agents-test"  # the gateway's access key the agents send
UPSTREAM_KEY = "sk-scripted-upstream"
CLAUDE_MODEL = "claude-sonnet-4-5"
CODEX_MODEL = "gpt-test"
AGENT_TIMEOUT = 90.0  # one agent run, its retries included
GATEWAY_START = 30.0  # seconds for `gateway serve` to say where it listens
SERVING = re.compile(r"serving \d+ models on http://127\.0\.0\.1:(\d+)/v1")


def agent(name: str) -> Path:
    """An installed agent's executable; raises with what to do when it is missing."""
    path = BIN / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {INSTALL_HINT}")
    return path


def base_env(home: Path, proxy: str) -> dict[str, str]:
    """A clean environment (nothing of the caller's: no real keys, no user config), with
    every proxied connection sent to `proxy` (a ProxySink) and only loopback direct."""
    loopback = "127.0.0.1,localhost"
    return {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(home),
        "LANG": "C.UTF-8",
        "HTTPS_PROXY": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "http_proxy": proxy,
        "ALL_PROXY": proxy, "NO_PROXY": loopback, "no_proxy": loopback,
    }  # fmt: skip


def claude_env(home: Path, proxy: str, base_url: str, api_key: str) -> dict[str, str]:
    """Claude Code at `base_url`, with its update check, telemetry, error reports and
    other non-essential traffic off."""
    return base_env(home, proxy) | {
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": api_key,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }


def claude_argv(prompt: str) -> list[str]:
    """`claude -p`, its events as JSON lines; Bash allowed without a prompt (it refuses
    --dangerously-skip-permissions as root)."""
    return [str(agent("claude")), "-p", prompt, "--output-format", "stream-json", "--verbose",
            "--model", CLAUDE_MODEL, "--allowedTools", "Bash"]  # fmt: skip


CODEX_CONFIG = """\
model = "{model}"
model_provider = "scripted"
check_for_update_on_startup = false

[analytics]
enabled = false

# Plugin and app catalogs are fetched from github.com and chatgpt.com at start.
[features]
plugins = false
remote_plugin = false
apps = false

[model_providers.scripted]
name = "scripted"
base_url = "{base_url}"
wire_api = "responses"
env_key = "SCRIPTED_API_KEY"
# Codex opens a WebSocket to /v1/responses first where the provider says it can (its
# built-in OpenAI provider always does): the case issue 22 is about.
supports_websockets = {websockets}
"""


def codex_env(
    home: Path, proxy: str, base_url: str, api_key: str, websockets: bool = True
) -> dict[str, str]:
    """Codex with its own CODEX_HOME holding a config.toml: a custom provider at
    `base_url` with an API key from the environment (no login); no update check, no
    analytics, no plugin or app catalogs (each would reach past this machine)."""
    codex_home = home / "codex"
    codex_home.mkdir(parents=True, exist_ok=True)
    text = CODEX_CONFIG.format(model=CODEX_MODEL, base_url=base_url,
                               websockets=str(websockets).lower())  # fmt: skip
    (codex_home / "config.toml").write_text(text)
    return base_env(home, proxy) | {"CODEX_HOME": str(codex_home), "SCRIPTED_API_KEY": api_key}


def codex_argv(prompt: str) -> list[str]:
    """`codex exec` outside a git repo, commands in the workspace-write sandbox without
    asking, no session files kept, the config checked strictly (a misspelt setting
    fails instead of doing nothing), events as JSON lines."""
    return [str(agent("codex")), "exec", "--skip-git-repo-check", "--ephemeral",
            "--strict-config", "-s", "workspace-write", "--json", prompt]  # fmt: skip


@dataclass
class AgentRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    events: list[dict[str, Any]] = field(default_factory=list)

    def explain(self) -> str:
        return f"exit {self.returncode}\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


def run_agent(
    argv: list[str], env: dict[str, str], cwd: Path, timeout: float = AGENT_TIMEOUT
) -> AgentRun:
    """One non-interactive run. The agent gets a session (and so a process group) of its
    own: on a timeout that group, the commands it started included, is killed by its id."""
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        err += f"\n[killed after {timeout} s]"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    events = []
    for line in out.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return AgentRun(proc.returncode, out, err, time.monotonic() - started, events)


def gateway_files(folder: Path, upstream: str) -> tuple[Path, Path]:
    """routes.yaml and keys.yaml: one provider, the scripted upstream, serving both
    families; Claude Code's names passed whole (`claude-{*}`), Codex's model as is."""
    routes = folder / "routes.yaml"
    routes.write_text(f"""\
providers:
  scripted:
    base_url: {upstream}/v1
    api_key: {UPSTREAM_KEY}
    apis: [messages, responses]
models:
  "claude-*":
    providers: [{{provider: scripted, model: "claude-{{*}}"}}]
  {CODEX_MODEL}:
    providers: [{{provider: scripted}}]
""")
    keys = folder / "keys.yaml"
    keys.write_text(f"keys:\n  - {{name: agents, key: {KEY}}}\n")
    return routes, keys


@dataclass
class ServedGateway:
    proc: subprocess.Popen[bytes]
    port: int
    access_log: Path  # its stdout: one JSON line per request
    errors: Path  # its stderr

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def access(self) -> list[dict[str, Any]]:
        lines = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def wait_access(self, count: int, within: float = 10.0) -> list[dict[str, Any]]:
        """The access lines once at least `count` are written (they are flushed in
        batches), bounded by `within`."""
        deadline = time.monotonic() + within
        while len(lines := self.access()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return lines


@contextmanager
def served_gateway(folder: Path, upstream: str, src: Path | None = None) -> Iterator[ServedGateway]:
    """`gateway serve` on 127.0.0.1, port 0 (the port read from its start line), in
    `folder`; stopped by its pid (SIGTERM, then SIGKILL) however the block ends. `src`:
    a folder holding another revision's gateway/ package to run instead of this one."""
    routes, keys = gateway_files(folder, upstream)
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    access_log, errors = folder / "access.log", folder / "gateway.err"
    argv = [sys.executable, "-m", "gateway", "serve", "--routes", str(routes), "--keys",
            str(keys), "--port", "0", "--state", "none"]  # fmt: skip
    with access_log.open("wb") as out, errors.open("wb") as err:
        proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + GATEWAY_START
        while not (found := SERVING.search(errors.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gateway serve did not start:\n{errors.read_text()[-3000:]}")
            time.sleep(0.05)
        yield ServedGateway(proc, int(found.group(1)), access_log, errors)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """Stop a process started here, by its own pid: terminate, then kill."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
