"""The command line, run as real subprocesses: check, keys new, serve and its refusals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from gateway.config import load_config
from gateway.config.keys import digest_of
from tests.helpers import free_port

PYTHON = sys.executable
CONSOLE_SCRIPT = Path(sys.executable).parent / "gateway"
PROBLEM_LINE = re.compile(r"^(?P<path>.+?):(?P<line>[1-9][0-9]*): (?P<message>\S.*)$")

ECHO_ROUTES = """\
providers:
  echo:
    base_url: builtin:echo
models:
  echo:
    name: Echo
    providers:
      - provider: echo
"""

BROKEN_ROUTES = """\
providers:
  echo:
    base_url: builtin:echo
models:
  echo:
    providers:
      - provider: ehco
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(extra)
    return env


def gateway(
    cwd: Path, *args: str, env: dict[str, str] | None = None, script: bool = False
) -> subprocess.CompletedProcess[str]:
    cmd = [str(CONSOLE_SCRIPT)] if script else [PYTHON, "-m", "gateway"]
    return subprocess.run(
        [*cmd, *args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def new_key(cwd: Path, name: str, *extra: str) -> str:
    result = gateway(cwd, "keys", "new", name, *extra)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return lines[0]


# --------------------------------------------------------------------------- check


def test_check_valid_config_exits_0_with_a_short_summary(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    result = gateway(tmp_path, "check")
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()
    assert 1 <= len(summary) <= 10
    assert not any(PROBLEM_LINE.match(line) for line in stderr_lines(result))


def test_check_reports_every_problem_as_path_line_message(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "routes.yaml").write_text(
        """\
providers:
  echo:
    base_url: builtin:echo
    api_kye: x
models:
  echo:
    strategy: fastest
    providers:
      - provider: ehco
"""
    )
    keys_path = tmp_path / "my keys.yaml"
    keys_path.write_text(
        "keys:\n  - name: a\n    key: s\n    sha256: 00\n  - name: b\n    rmp: 1\n"
    )
    result = gateway(tmp_path, "check", "--routes", "conf/routes.yaml", "--keys", str(keys_path))
    assert result.returncode == 1
    assert "OK" not in result.stdout
    lines = stderr_lines(result)
    parsed = [PROBLEM_LINE.match(line) for line in lines]
    assert all(parsed), lines
    got = sorted((m["path"], int(m["line"])) for m in parsed if m)
    keys = str(keys_path)
    assert got == sorted(
        [
            ("conf/routes.yaml", 4),
            ("conf/routes.yaml", 7),
            ("conf/routes.yaml", 9),
            (keys, 2),
            (keys, 6),
            (keys, 5),
        ]
    ), lines
    by_line = {(m["path"], int(m["line"])): m["message"] for m in parsed if m}
    assert "api_kye" in by_line[("conf/routes.yaml", 4)]
    assert "fastest" in by_line[("conf/routes.yaml", 7)]
    assert "ehco" in by_line[("conf/routes.yaml", 9)]
    assert "rmp" in by_line[(keys, 6)]


def test_check_missing_variable_names_it(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(
        "providers:\n  o:\n    base_url: https://api.openai.com/v1\n"
        "    api_key: ${GW_CLI_TEST_UNSET}\nmodels:\n  m:\n    providers: [o]\n"
    )
    result = gateway(tmp_path, "check")
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1
    assert lines[0].startswith("routes.yaml:4: ")
    assert "GW_CLI_TEST_UNSET" in lines[0]
    ok = gateway(tmp_path, "check", env=clean_env(GW_CLI_TEST_UNSET="sk-x"))
    assert ok.returncode == 0, ok.stderr
    assert "sk-x" not in ok.stdout + ok.stderr


def test_check_named_keys_file_must_exist_but_default_may_be_absent(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    assert gateway(tmp_path, "check").returncode == 0
    for result in (
        gateway(tmp_path, "check", "--keys", "nope.yaml"),
        gateway(tmp_path, "check", env=clean_env(GATEWAY_KEYS="nope.yaml")),
    ):
        assert result.returncode == 1
        lines = stderr_lines(result)
        assert len(lines) == 1
        assert re.match(r"^nope\.yaml:[1-9][0-9]*: \S", lines[0]), lines


def test_check_honours_gateway_routes(tmp_path: Path) -> None:
    (tmp_path / "alt.yaml").write_text(ECHO_ROUTES)
    # Without the variable the default ./routes.yaml is missing: an error.
    assert gateway(tmp_path, "check").returncode == 1
    result = gateway(tmp_path, "check", env=clean_env(GATEWAY_ROUTES="alt.yaml"))
    assert result.returncode == 0, result.stderr
    (tmp_path / "alt.yaml").write_text(BROKEN_ROUTES)
    broken = gateway(tmp_path, "check", env=clean_env(GATEWAY_ROUTES="alt.yaml"))
    assert broken.returncode == 1
    assert [line.split(":")[0] for line in stderr_lines(broken)] == ["alt.yaml"]


def test_python_m_and_console_script_behave_the_same(tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.exists()
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    via_module = gateway(tmp_path, "check")
    via_script = gateway(tmp_path, "check", script=True)
    assert via_module.returncode == via_script.returncode == 0
    assert via_module.stdout == via_script.stdout
    (tmp_path / "routes.yaml").write_text(BROKEN_ROUTES)
    bad_module = gateway(tmp_path, "check")
    bad_script = gateway(tmp_path, "check", script=True)
    assert bad_module.returncode == bad_script.returncode == 1
    assert bad_module.stderr == bad_script.stderr
    assert stderr_lines(bad_module)[0].startswith("routes.yaml:7: ")


# --------------------------------------------------------------------------- keys new


def test_keys_new_creates_the_file_and_prints_only_the_secret(tmp_path: Path) -> None:
    result = gateway(tmp_path, "keys", "new", "checkout-service")
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n")
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    secret = lines[0]
    assert secret and secret == secret.strip() and " " not in secret
    text = (tmp_path / "keys.yaml").read_text()
    assert secret not in text
    assert digest_of(secret).hex() in text.lower()
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    config = load_config(str(tmp_path / "routes.yaml"), str(tmp_path / "keys.yaml"), True)
    assert config.keys.by_digest[digest_of(secret)].name == "checkout-service"
    assert [k.name for k in config.keys.entries] == ["checkout-service"]


def test_keys_new_appends_keeping_existing_bytes(tmp_path: Path) -> None:
    old_secret = "sk-gw-existing"
    original = (
        "# Access keys -- hand written, keep this comment\n"
        "keys:\n"
        "  # the first service\n"
        "  - name: first   # trailing comment\n"
        f"    sha256: {digest_of(old_secret).hex()}\n"
        "    rpm: 60\n"
        "  # end of list\n"
    )
    path = tmp_path / "keys.yaml"
    path.write_bytes(original.encode())
    secret = new_key(tmp_path, "second")
    assert secret != old_secret
    after = path.read_bytes()
    assert after.startswith(original.encode())
    assert secret not in after.decode()
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    config = load_config(str(tmp_path / "routes.yaml"), str(path), True)
    assert [k.name for k in config.keys.entries] == ["first", "second"]
    assert config.keys.by_digest[digest_of(old_secret)].rpm == 60
    assert config.keys.by_digest[digest_of(secret)].name == "second"
    third = new_key(tmp_path, "third")
    assert third != secret
    assert path.read_bytes().startswith(after)
    config = load_config(str(tmp_path / "routes.yaml"), str(path), True)
    assert config.keys.by_digest[digest_of(third)].name == "third"
    assert len(config.keys.entries) == 3


def test_keys_new_on_the_shipped_empty_keys_file_keeps_its_comments(tmp_path: Path) -> None:
    original = "# Access keys for the gateway.\n# Add one with: gateway keys new NAME\nkeys: []\n"
    path = tmp_path / "keys.yaml"
    path.write_text(original)
    secret = new_key(tmp_path, "svc")
    after = path.read_text()
    assert after.startswith(
        "# Access keys for the gateway.\n# Add one with: gateway keys new NAME\n"
    )
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    config = load_config(str(tmp_path / "routes.yaml"), str(path), True)
    assert config.keys.by_digest[digest_of(secret)].name == "svc"


def test_keys_new_honours_the_keys_option(tmp_path: Path) -> None:
    secret = new_key(tmp_path, "svc", "--keys", "custom.yaml")
    assert not (tmp_path / "keys.yaml").exists()
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    config = load_config(str(tmp_path / "routes.yaml"), str(tmp_path / "custom.yaml"), True)
    assert config.keys.by_digest[digest_of(secret)].name == "svc"


def test_keys_new_refuses_a_duplicate_name(tmp_path: Path) -> None:
    new_key(tmp_path, "svc")
    path = tmp_path / "keys.yaml"
    before = path.read_bytes()
    result = gateway(tmp_path, "keys", "new", "svc")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "svc" in result.stderr
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- serve refusals


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_refuses_non_loopback_host_without_keys(tmp_path: Path, how: str) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    port = str(free_port())
    if how == "flag":
        result = gateway(tmp_path, "serve", "--host", "0.0.0.0", "--port", port)
    else:
        env = clean_env(GATEWAY_HOST="0.0.0.0", GATEWAY_PORT=port)
        result = gateway(tmp_path, "serve", env=env)
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert "0.0.0.0" in lines[0]
    assert "key" in lines[0].lower()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_refuses_a_port_in_use(tmp_path: Path, how: str) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    new_key(tmp_path, "svc")  # keys configured: no "open gateway" warning on stderr
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        if how == "flag":
            result = gateway(tmp_path, "serve", "--port", port)
        else:
            result = gateway(tmp_path, "serve", env=clean_env(GATEWAY_PORT=port))
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert port in lines[0]


def test_serve_refuses_a_broken_config(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(BROKEN_ROUTES)
    result = gateway(tmp_path, "serve", "--port", str(free_port()))
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("routes.yaml:7: ")
    assert "ehco" in lines[0]


def test_serve_refuses_a_named_keys_file_that_does_not_exist(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    result = gateway(tmp_path, "serve", "--port", str(free_port()), "--keys", "missing.yaml")
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("missing.yaml:")


# --------------------------------------------------------------------------- serve


@contextmanager
def serving(
    tmp_path: Path, args: list[str], env: dict[str, str], port: int
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start `gateway serve`, wait until /healthz answers, yield it and its URL; always stop it."""
    log_path = tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [PYTHON, "-m", "gateway", "serve", *args],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 10
            ready = False
            with httpx.Client(timeout=1) as client:
                while time.monotonic() < deadline and proc.poll() is None:
                    try:
                        ready = client.get(f"{url}/healthz").status_code == 200
                    except httpx.TransportError:
                        ready = False
                    if ready:
                        break
                    time.sleep(0.05)
            assert ready, f"gateway did not become healthy: {log_path.read_text()}"
            yield proc, url
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)


def chat(
    client: httpx.Client, url: str, secret: str | None = None, **extra: object
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    body = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], **extra}
    return client.post(f"{url}/v1/chat/completions", json=body, headers=headers)


def test_serve_answers_healthz_and_chat(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    secret = new_key(tmp_path, "svc", "--keys", "k.yaml")
    version = load_config(str(tmp_path / "routes.yaml"), str(tmp_path / "k.yaml"), True).version
    port = free_port()
    args = ["--routes", "routes.yaml", "--keys", "k.yaml", "--port", str(port)]
    with (
        serving(tmp_path, args, clean_env(), port) as (_, url),
        httpx.Client(timeout=10) as client,
    ):
        health = client.get(f"{url}/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "config_version": version}
        assert chat(client, url).status_code == 401
        assert chat(client, url, "sk-gw-wrong").status_code == 401
        r = chat(client, url, secret)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "echo"
        assert "hello there" in r.json()["choices"][0]["message"]["content"]
        assert r.headers.get("x-request-id")
        stream = chat(client, url, secret, stream=True)
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.text.rstrip().endswith("data: [DONE]")


def test_serve_honours_gateway_routes_and_gateway_port(tmp_path: Path) -> None:
    (tmp_path / "alt-routes.yaml").write_text(ECHO_ROUTES)
    port = free_port()
    env = clean_env(GATEWAY_ROUTES="alt-routes.yaml", GATEWAY_PORT=str(port))
    with serving(tmp_path, [], env, port) as (_, url), httpx.Client(timeout=10) as client:
        health = client.get(f"{url}/healthz")
        assert health.json()["status"] == "ok"
        r = chat(client, url)  # no keys configured: loopback is open
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "echo"
        listed = client.get(f"{url}/v1/models")
        assert [m["id"] for m in listed.json()["data"]] == ["echo"]


def test_serve_exits_0_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    port = free_port()
    with serving(tmp_path, ["--port", str(port)], clean_env(), port) as (proc, url):
        with httpx.Client(timeout=10) as client:
            assert chat(client, url).status_code == 200
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        log = (tmp_path / "serve.log").read_text()
        assert code == 0, f"exit {code} after SIGTERM:\n{log}"
