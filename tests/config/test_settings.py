"""Every operator input is checked before serving (SPEC §13): one line naming the flag,
the variable or `file:line` and what is allowed, exit 1, never a traceback. The table's
checks are tested from values; a few of each kind again through `gateway` itself."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import load_config
from gateway.config.keys import append_key
from gateway.config.settings import OPTIONS, Settings, SettingsError, from_env
from gateway.config.source import Source
from gateway.config.yamlsrc import parse_yaml
from gateway.reload import Reloader
from tests.conftest import GatewayFactory
from tests.helpers import free_port, until
from tests.test_cli import ECHO_ROUTES, clean_env, new_key, stderr_lines
from tests.test_cli import gateway as run_gateway

# (flag overrides, environment) -> the one line said about it
BAD = [
    ({"port": "70000"}, {}, "--port must be a whole number from 0 to 65535, got '70000'"),
    ({"port": "-1"}, {}, "--port must be a whole number from 0 to 65535, got '-1'"),
    ({}, {"GATEWAY_PORT": "abc"}, "GATEWAY_PORT must be a whole number from 0 to 65535, got 'abc'"),
    ({}, {"GATEWAY_LOG_LEVEL": "loud"},
     "GATEWAY_LOG_LEVEL must be one of debug, info, warning, error, got 'loud'"),
    ({}, {"GATEWAY_LOG_FORMAT": "xml"}, "GATEWAY_LOG_FORMAT must be one of json, text, got 'xml'"),
    ({"workers": "0"}, {}, "--workers must be a whole number from 1 to 1024, got '0'"),
    ({"state": "memory"}, {},
     "--state must be a file path, none (memory only) or redis://HOST:PORT/DB, got 'memory'; "
     "did you mean none? (for a file of that name: ./memory)"),
    ({}, {"GATEWAY_STATE": "redis://cache:99999/0"},
     "GATEWAY_STATE must be a file path, none (memory only) or redis://HOST:PORT/DB, "
     "got 'redis://cache:99999/0'"),
    ({"header_timeout": "0"}, {},
     "--header-timeout must be a number of seconds above 0 and at most 86400, got '0'"),
    ({"body_timeout": "nan"}, {},
     "--body-timeout must be a number of seconds above 0 and at most 86400, got 'nan'"),
    ({"drain_seconds": "-1"}, {},
     "--drain-seconds must be a number of seconds above 0 and at most 86400, got '-1'"),
    ({"max_body_bytes": "-1"}, {}, "--max-body-bytes must be a whole number of at least 1, got '-1'"),
    ({"max_connections": "-5"}, {},
     "--max-connections must be a whole number of at least 0, got '-5'"),
    ({"response_ids_per_key": "0"}, {},
     "--response-ids-per-key must be a whole number of at least 1, got '0'"),
    ({}, {"GATEWAY_METRICS_ADMIN": "maybe"},
     "GATEWAY_METRICS_ADMIN must be true or false (1, yes, on / 0, no, off), got 'maybe'"),
    ({"allow_hosts": ["gw.internal", "https://gw.internal"]}, {},
     "--allow-host must be a host name or IP address, optionally with :PORT (no scheme or "
     "path), got 'https://gw.internal'"),
    ({}, {"GATEWAY_ALLOW_HOSTS": "gw.internal/v1"},
     "GATEWAY_ALLOW_HOSTS must be a host name or IP address, optionally with :PORT (no scheme "
     "or path), got 'gw.internal/v1'"),
    ({"cors_origins": ["localhost:3000"]}, {},
     "--cors-origin must be an origin scheme://host[:port] (http or https, no path), e.g. "
     "http://localhost:3000, got 'localhost:3000'"),
    ({}, {"GATEWAY_CORS_ORIGINS": "http://a.test,http://b.test/app"},
     "GATEWAY_CORS_ORIGINS must be an origin scheme://host[:port] (http or https, no path), "
     "e.g. http://localhost:3000, got 'http://b.test/app'"),
    ({"cors_origins": ["null"]}, {},
     "--cors-origin must be an origin scheme://host[:port] (http or https, no path), e.g. "
     "http://localhost:3000, got 'null'"),
    ({"host": "http://0.0.0.0"}, {},
     "--host must be an IP address or a host name to bind (no scheme, port or path), "
     "got 'http://0.0.0.0'"),
]  # fmt: skip


@pytest.mark.parametrize(("flags", "env", "line"), BAD, ids=[b[2].split()[0] for b in BAD])
def test_a_bad_value_is_one_line_naming_where_it_came_from(
    flags: dict[str, object], env: dict[str, str], line: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        from_env(env, **flags)
    assert caught.value.problems == [line]


def test_every_bad_value_is_reported_not_only_the_first() -> None:
    with pytest.raises(SettingsError) as caught:
        from_env({"GATEWAY_PORT": "abc", "GATEWAY_LOG_FORMAT": "xml"}, workers="0")
    assert [p.split()[0] for p in caught.value.problems] == [
        "GATEWAY_PORT", "--workers", "GATEWAY_LOG_FORMAT"]  # fmt: skip


def test_a_flag_wins_over_its_variable_and_is_the_one_named() -> None:
    assert from_env({"GATEWAY_PORT": "abc"}, port="9000").port == 9000
    with pytest.raises(SettingsError, match=r"^--port "):
        from_env({"GATEWAY_PORT": "9000"}, port="x")


def test_good_values_are_taken_and_normalised() -> None:
    s = from_env(
        {"GATEWAY_CORS_ORIGINS": "HTTP://LocalHost:3000, https://app.example:443,http://x.test/",
         "GATEWAY_METRICS_ADMIN": "yes", "GATEWAY_LOG_LEVEL": "WARNING"},
        allow_hosts=["GW.Internal:8080", "::1", "[::1]:8080", "10.0.0.5"],
        state="NONE", drain_seconds="2.5", max_connections="0",
    )  # fmt: skip
    # As browsers send Origin: lower case, no default port, no path.
    assert s.cors_origins == ("http://localhost:3000", "https://app.example", "http://x.test")
    assert s.allow_hosts == ("gw.internal:8080", "[::1]", "[::1]:8080", "10.0.0.5")
    assert (s.metrics_admin, s.log_level, s.state, s.drain_seconds) == (
        True,
        "warning",
        "none",
        2.5,
    )
    assert s.max_connections == 0  # 0 keeps its meaning: from the open-file limit
    assert from_env({"GATEWAY_STATE": "redis://cache:6379/2"}).redis
    assert from_env({}, state="./memory").state == "./memory"  # a file by that name


def test_defaults_are_the_settings_defaults_but_for_the_cli_state_file() -> None:
    s = from_env({})
    assert s == Settings(state="gateway.state")


def test_the_table_names_every_flag_and_variable_once() -> None:
    flags = [o.flag for o in OPTIONS]
    names = [o.var for o in OPTIONS]
    assert len(set(flags)) == len(flags) and len(set(names)) == len(names)
    assert all(o.var == "GATEWAY_" + o.flag[2:].upper().replace("-", "_") for o in OPTIONS
               if o.flag not in ("--allow-host", "--cors-origin"))  # fmt: skip


# --------------------------------------------------------------- through the command line

CLI_BAD = [
    (["serve", "--port", "70000"], {}, "gateway: --port must be a whole number from 0 to 65535"),
    (["serve"], {"GATEWAY_PORT": "abc"}, "gateway: GATEWAY_PORT must be a whole number"),
    (["serve"], {"GATEWAY_LOG_LEVEL": "loud"}, "gateway: GATEWAY_LOG_LEVEL must be one of"),
    (["serve", "--state", "memory"], {}, "gateway: --state must be a file path"),
    (["serve", "--workers", "0"], {}, "gateway: --workers must be a whole number from 1"),
    (["serve", "--cors-origin", "localhost:3000"], {}, "gateway: --cors-origin must be an origin"),
    (["serve", "--port", "abc"], {}, "gateway: --port must be a whole number"),
    (["serve", "--bogus"], {}, "gateway: unrecognized arguments: --bogus"),
    (["keys", "new"], {}, "gateway: the following arguments are required: name"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "env", "start"), CLI_BAD, ids=[" ".join(c[0]) for c in CLI_BAD])
def test_gateway_refuses_bad_input_in_one_line(
    tmp_path: Path, args: list[str], env: dict[str, str], start: str
) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    result = run_gateway(tmp_path, *args, env=clean_env(**env))
    assert result.returncode == 1  # a usage error too: one exit code for bad input
    lines = stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith(start), lines
    assert "Traceback" not in result.stderr and result.stdout == ""


EXPIRES_KEYS = "keys:\n  - name: a\n    key: sk-a\n    expires: 2027-13-01\n"


def test_check_names_an_impossible_date_by_its_line(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    (tmp_path / "keys.yaml").write_text(EXPIRES_KEYS)
    result = run_gateway(tmp_path, "check")
    assert result.returncode == 1
    assert stderr_lines(result) == [
        "keys.yaml:4: expires must be a date (2027-01-01) or ISO timestamp, got '2027-13-01'"
    ]


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("a: !!int abc\n", "f.yaml:1: invalid YAML: 'abc' is not a valid int"),
        ("a: 1\nb: !!float x\n", "f.yaml:2: invalid YAML: 'x' is not a valid float"),
        ("a: !!bool maybe\n", "f.yaml:1: invalid YAML: 'maybe' is not a valid bool"),
    ],
)
@pytest.mark.parametrize("stepwise", [False, True])
def test_a_scalar_yaml_cannot_build_is_a_problem_with_its_line(
    text: str, line: str, stepwise: bool
) -> None:
    src = Source("f.yaml")
    assert parse_yaml(text, src, stepwise) is None
    assert [str(p) for p in src.problems] == [line]


def test_a_date_that_is_no_date_stays_the_text_written() -> None:
    src = Source("f.yaml")
    assert parse_yaml("a: 2027-02-30\nb: 2027-01-01\n", src) == {
        "a": "2027-02-30", "b": __import__("datetime").date(2027, 1, 1)}  # fmt: skip
    assert not src.problems


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("expires: 9999-12-31", "expires must be 9999-12-30 or earlier"),
        ("expires: 2027-01-01T25:00:00", "expires must be a date (2027-01-01) or ISO timestamp, got '2027-01-01T25:00:00'"),
        ("budget: {usd: .nan}", "budget.usd must be a positive number of dollars"),
        ("budget: {usd: .inf}", "budget.usd must be a positive number of dollars"),
    ],
)  # fmt: skip
def test_keys_values_that_would_not_hold_are_problems(
    tmp_path: Path, entry: str, message: str
) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    (tmp_path / "keys.yaml").write_text(f"keys:\n  - name: a\n    key: sk-a\n    {entry}\n")
    result = run_gateway(tmp_path, "check")
    assert result.returncode == 1
    assert stderr_lines(result) == [f"keys.yaml:4: {message}"]


def test_routes_numbers_must_be_finite(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(
        ECHO_ROUTES.replace("    providers:", "    commit_after: .nan\n    providers:")
    )
    result = run_gateway(tmp_path, "check")
    assert result.returncode == 1
    assert stderr_lines(result) == ["routes.yaml:7: commit_after must be a number, got nan"]


async def test_a_reload_over_an_impossible_date_keeps_the_old_config(
    tmp_path: Path, gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher's reload task logs the problem and keeps serving the old keys; no
    unretrieved task exception (warnings are errors in this suite)."""
    caplog.set_level(logging.INFO, logger="gateway")
    gw = await gateway(ECHO_ROUTES, "keys:\n  - name: a\n    key: sk-a\n", reload_interval=0.05)
    before = gw.runtime.config.version
    keys = tmp_path / "keys.yaml"
    keys.write_text(EXPIRES_KEYS)
    await until(lambda: any("expires must be" in r.getMessage() for r in caplog.records))
    problems = [r.getMessage() for r in caplog.records if r.getMessage().startswith("reload")]
    assert problems[0] == (
        f"reload refused: {keys}:4: expires must be a date (2027-01-01) or ISO timestamp, "
        "got '2027-13-01'"
    )
    assert gw.runtime.config.version == before
    async with httpx.AsyncClient(timeout=10) as client:
        r = await client.get(f"{gw.url}/v1/models", headers={"authorization": "Bearer sk-a"})
        assert r.status_code == 200


async def test_a_fault_inside_the_loader_keeps_the_old_config(
    tmp_path: Path,
    gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw = await gateway(ECHO_ROUTES, "keys:\n  - name: a\n    key: sk-a\n", reload_interval=0)
    before = gw.runtime.config.version

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a fault no input check foresaw")

    monkeypatch.setattr("gateway.reload.load_config", broken)
    assert await Reloader(gw.runtime, 0).reload() is False
    assert gw.runtime.config.version == before
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("reload failed reading") for m in messages)
    assert f"keeping config version {before}" in messages


# --------------------------------------------------------------- keys new, whatever the name

NAMES = ["123", "yes", "null", "a: b", "- x", "q\"'", "#x", "a #b", "ünï", "👩\u200d💻",
         "2027-01-01", "~", "*ref", "x\u2028y", " lead", "[a]", "{a}", "\\", ".inf"]  # fmt: skip


def test_keys_new_writes_names_that_read_back_exactly(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    for name in NAMES:
        new_key(tmp_path, name)
    result = run_gateway(tmp_path, "check")
    assert result.returncode == 0, result.stderr
    assert f"keys.yaml: {len(NAMES)} keys" in result.stdout
    config = load_config(str(tmp_path / "routes.yaml"), str(tmp_path / "keys.yaml"))
    assert [k.name for k in config.keys.entries] == NAMES


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "cr\rx", "del\x7f", "nel\x85"])
def test_keys_new_refuses_control_characters_and_leaves_the_file(tmp_path: Path, name: str) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n  - name: first\n    key: sk-first\n")
    before = keys.read_bytes()
    result = run_gateway(tmp_path, "keys", "new", name)
    assert result.returncode == 1 and result.stdout == ""
    (line,) = stderr_lines(result)
    assert line.startswith("gateway: a key name must not hold control characters")
    assert keys.read_bytes() == before


@pytest.mark.parametrize("name", ["nul\x00", "\x1b[31mred", "", "bad\udcff"])
def test_append_key_refuses_what_no_yaml_line_can_hold(tmp_path: Path, name: str) -> None:
    """NUL cannot reach argv; an undecodable byte arrives as a lone surrogate."""
    with pytest.raises(ValueError, match=r"^a key name must "):
        append_key(tmp_path / "keys.yaml", name, "sk-gw-x")
    assert not (tmp_path / "keys.yaml").exists()


NAME_TEXT = st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(first=NAME_TEXT, second=NAME_TEXT)
def test_any_name_appended_parses_back_as_itself(first: str, second: str) -> None:
    """Into a new file, then after an existing entry: every name reads back exactly."""
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder) / "keys.yaml"
        routes = Path(folder) / "routes.yaml"
        routes.write_text(ECHO_ROUTES)
        append_key(keys, first, "sk-gw-first")
        if second != first:
            append_key(keys, second, "sk-gw-second")
        config = load_config(str(routes), str(keys))
        expected = [first] if second == first else [first, second]
        assert [k.name for k in config.keys.entries] == expected


# --------------------------------------------------------------- serving after all that


def test_valid_list_flags_serve(tmp_path: Path) -> None:
    """The values the checks let through are the ones the sidecar serves by."""
    from tests.test_cli import serving

    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    port = free_port()
    args = ["--port", str(port), "--state", "none", "--allow-host", "GW.Test",
            "--cors-origin", "http://localhost:3000/"]  # fmt: skip
    with serving(tmp_path, args, clean_env(), port) as (_, url), httpx.Client(timeout=10) as c:
        assert c.get(f"{url}/healthz", headers={"host": "gw.test"}).status_code == 200
        r = c.get(f"{url}/v1/models", headers={"origin": "http://localhost:3000"})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
