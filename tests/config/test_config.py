"""routes.yaml and keys.yaml: parsing, validation with line numbers, expansion, resolution.

Pure tests: strings and tmp files only, no network.
"""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Config, ConfigError, load_config
from gateway.config.keys import Keys, digest_of, parse_keys
from gateway.config.routes import Routes, parse_routes
from gateway.config.source import Problem, Source
from gateway.config.yamlsrc import parse_yaml

PROBLEM_LINE = re.compile(r"^(?P<path>.+?):(?P<line>[1-9][0-9]*): (?P<message>\S.*)$")

ECHO_ROUTES = """\
providers:
  echo:
    base_url: builtin:echo
models:
  echo:
    providers:
      - provider: echo
"""


# --------------------------------------------------------------------------- helpers


def routes_of(text: str, path: str = "routes.yaml") -> tuple[Routes, list[Problem]]:
    src = Source(path)
    routes = parse_routes(parse_yaml(text, src), src)
    return routes, src.problems


def good_routes(text: str) -> Routes:
    routes, problems = routes_of(text)
    assert problems == [], [str(p) for p in problems]
    return routes


def keys_of(text: str, path: str = "keys.yaml") -> tuple[Keys, list[Problem]]:
    src = Source(path)
    keys = parse_keys(parse_yaml(text, src), src)
    return keys, src.problems


def good_keys(text: str) -> Keys:
    keys, problems = keys_of(text)
    assert problems == [], [str(p) for p in problems]
    return keys


def assert_problems(problems: list[Problem], expected: list[tuple[int, str]]) -> None:
    """Exactly these problems, in any order: each (line, text that the message must contain)."""
    got = sorted((p.line, p.message) for p in problems)
    remaining = list(got)
    for line, needle in expected:
        match = next((g for g in remaining if g[0] == line and needle in g[1]), None)
        assert match is not None, f"no problem at line {line} mentioning {needle!r}; got {got}"
        remaining.remove(match)
    assert remaining == [], f"unexpected extra problems: {remaining}"


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(tmp_path: Path, routes: str, keys: str | None = None, **kw: Any) -> Config:
    keys_path = tmp_path / "keys.yaml"
    if keys is not None:
        keys_path.write_text(keys)
    return load_config(write(tmp_path, "routes.yaml", routes), str(keys_path), **kw)


def load_problems(tmp_path: Path, routes: str, keys: str | None = None) -> list[Problem]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, routes, keys)
    return info.value.problems


# --------------------------------------------------------------------------- problem reporting


def test_every_routes_problem_is_reported_at_once_with_its_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GW_TEST_MISSING_A", raising=False)
    monkeypatch.delenv("GW_TEST_MISSING_B", raising=False)
    text = """\
providers:
  openai:
    base_url: https://api.openai.com/v1
    api_key: ${GW_TEST_MISSING_A}
    bsae_url: typo
    timeout: {connect: 5, raed: 300}
  unused:
    base_url: http://127.0.0.1:9/v1
    api_key: ${GW_TEST_MISSING_B}
models:
  m1:
    strategy: fastest
    providers:
      - provider: openai
        wieght: 2
      - provider: nope
  m2:
    providers: [{provider: openai}]
    retries: 3
    cooldown: {failures: 3, secs: 30}
extra: true
"""
    _, problems = routes_of(text)
    assert_problems(
        problems,
        [
            (4, "GW_TEST_MISSING_A"),
            (5, "bsae_url"),
            (6, "raed"),
            (12, "fastest"),
            (15, "wieght"),
            (16, "nope"),
            (19, "retries"),
            (20, "secs"),
            (21, "extra"),
        ],
    )
    assert all(p.path == "routes.yaml" for p in problems)
    assert not any("GW_TEST_MISSING_B" in p.message for p in problems)


def test_problem_renders_as_path_line_message() -> None:
    _, problems = routes_of("modles: {}\n", path="conf/my routes.yaml")
    assert len(problems) == 1
    text = str(problems[0])
    assert text.startswith("conf/my routes.yaml:1: ")
    assert "modles" in text
    assert PROBLEM_LINE.match(text)


def test_config_error_lists_problems_of_both_files_one_per_line(tmp_path: Path) -> None:
    routes = "providers:\n  p:\n    base_url: http://127.0.0.1:9\n    colour: red\n"
    keys = "keys:\n  - name: a\n    key: one\n    rmp: 5\n"
    with pytest.raises(ConfigError) as info:
        load(tmp_path, routes, keys)
    routes_path, keys_path = str(tmp_path / "routes.yaml"), str(tmp_path / "keys.yaml")
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{routes_path}:4: ") and "colour" in lines[0]
    assert lines[1].startswith(f"{keys_path}:4: ") and "rmp" in lines[1]
    assert [str(p) for p in info.value.problems] == lines


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("providers: {}\nmodels: {}\nversion: 2\n", 3, "version"),
        ("providers:\n  p:\n    base_url: http://h\n    api-key: x\n", 4, "api-key"),
        ("providers:\n  p:\n    base_url: http://h\n    timeout:\n      conect: 1\n", 5, "conect"),
        (ECHO_ROUTES + "    display: Echo\n", 8, "display"),
        (ECHO_ROUTES + "        modle: x\n", 8, "modle"),
        (ECHO_ROUTES + "    cooldown:\n      failurs: 2\n", 9, "failurs"),
    ],
    ids=["top", "provider", "timeout", "model", "provider-entry", "cooldown"],
)
def test_unknown_key_at_any_level_is_a_problem(text: str, line: int, needle: str) -> None:
    _, problems = routes_of(text)
    assert_problems(problems, [(line, needle)])


def test_wrong_types_are_problems_at_their_lines() -> None:
    text = """\
providers:
  p:
    base_url: http://127.0.0.1:9/v1
    headers: [a, b]
    query: 5
    timeout: 30
    stream_usage: sometimes
  q:
    base_url: ftp://example.com
  r:
    base_url: http://127.0.0.1:9/v1
    timeout: {connect: soon}
models:
  a:
    providers:
      - provider: p
        weight: heavy
    max_attempts: 0
    commit_after: later
    hedge_after_ms: -1
    cooldown: {failures: 0, seconds: x}
  b:
    providers: []
  c: just-a-string
  d:
    providers:
      - provider: r
    name: 42
"""
    _, problems = routes_of(text)
    assert_problems(
        problems,
        [
            (4, "headers"),
            (5, "query"),
            (6, "timeout"),
            (7, "stream_usage"),
            (9, "ftp://"),
            (12, "connect"),
            (17, "weight"),
            (18, "max_attempts"),
            (19, "commit_after"),
            (20, "hedge_after_ms"),
            (21, "failures"),
            (21, "seconds"),
            (23, "providers"),
            (24, "'c'"),
            (28, "name"),
        ],
    )


def test_unknown_provider_reference_names_it() -> None:
    text = ECHO_ROUTES + "  other:\n    providers: [{provider: opnai}]\n"
    _, problems = routes_of(text)
    assert_problems(problems, [(9, "'opnai'")])


def test_unknown_provider_given_as_a_bare_string_is_a_problem() -> None:
    text = ECHO_ROUTES + "  other:\n    providers:\n      - opnai\n"
    _, problems = routes_of(text)
    assert_problems(problems, [(10, "opnai")])


def test_unknown_strategy_is_a_problem() -> None:
    text = ECHO_ROUTES + "    strategy: random\n"
    _, problems = routes_of(text)
    assert_problems(problems, [(8, "random")])


@pytest.mark.parametrize(
    "strategy", ["fallback", "round_robin", "weighted", "least_busy", "latency"]
)
def test_every_documented_strategy_is_accepted(strategy: str) -> None:
    routes = good_routes(ECHO_ROUTES + f"    strategy: {strategy}\n")
    assert routes.models["echo"].strategy == strategy


def test_strategy_defaults_to_fallback() -> None:
    assert good_routes(ECHO_ROUTES).models["echo"].strategy == "fallback"


def test_duplicate_keys_are_problems_at_the_second_occurrence() -> None:
    text = """\
providers:
  echo:
    base_url: builtin:echo
  echo:
    base_url: builtin:echo
models:
  m:
    providers: [echo]
    name: one
    name: two
"""
    _, problems = routes_of(text)
    assert_problems(problems, [(4, "echo"), (10, "name")])


def test_duplicate_keys_in_keys_file_are_problems() -> None:
    text = "keys:\n  - name: a\n    key: one\n    rpm: 1\n    rpm: 2\n"
    _, problems = keys_of(text)
    assert_problems(problems, [(5, "rpm")])


def test_yaml_syntax_error_is_a_problem_with_a_line() -> None:
    _, problems = routes_of("providers:\n  p: {base_url: http://h\nmodels: {}\n")
    assert len(problems) == 1
    assert problems[0].line in (2, 3)
    assert problems[0].path == "routes.yaml"


def test_routes_file_that_is_not_a_mapping_is_a_problem() -> None:
    _, problems = routes_of("- a\n- b\n")
    assert len(problems) == 1 and problems[0].line == 1


# --------------------------------------------------------------------------- ${VAR}


def test_missing_variable_in_used_provider_is_an_error_naming_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GW_TEST_NOT_SET", raising=False)
    text = """\
providers:
  openai:
    base_url: https://api.openai.com/v1
    api_key: ${GW_TEST_NOT_SET}
models:
  gpt:
    providers: [{provider: openai}]
"""
    _, problems = routes_of(text)
    assert_problems(problems, [(4, "GW_TEST_NOT_SET")])


def test_missing_variable_used_only_by_a_wildcard_model_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GW_TEST_NOT_SET", raising=False)
    text = (
        "providers:\n  o:\n    base_url: https://api.openai.com/v1\n"
        "    headers: {Authorization: 'Bearer ${GW_TEST_NOT_SET}'}\n"
        'models:\n  "o/*":\n    providers: [{provider: o}]\n'
    )
    _, problems = routes_of(text)
    assert_problems(problems, [(4, "GW_TEST_NOT_SET")])


@pytest.mark.parametrize(
    ("provider", "line"),
    [
        ("    base_url: http://${GW_TEST_NOT_SET}/v1\n", 3),
        ("    base_url: http://127.0.0.1:9/v1\n    headers:\n      X-Key: ${GW_TEST_NOT_SET}\n", 5),
        ("    base_url: http://127.0.0.1:9/v1\n    query:\n      v: x${GW_TEST_NOT_SET}\n", 5),
    ],
    ids=["base_url", "headers", "query"],
)
def test_missing_variable_anywhere_in_used_provider_is_an_error(
    monkeypatch: pytest.MonkeyPatch, provider: str, line: int
) -> None:
    monkeypatch.delenv("GW_TEST_NOT_SET", raising=False)
    text = "providers:\n  p:\n" + provider + "models:\n  m:\n    providers: [p]\n"
    _, problems = routes_of(text)
    assert_problems(problems, [(line, "GW_TEST_NOT_SET")])


def test_missing_variable_in_unused_provider_is_not_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("GW_TEST_NOT_SET", raising=False)
    text = """\
providers:
  echo:
    base_url: builtin:echo
  openai:
    base_url: ${GW_TEST_NOT_SET}
    api_key: ${GW_TEST_NOT_SET}
    headers: {X-Key: "${GW_TEST_NOT_SET}"}
models:
  echo:
    providers: [echo]
"""
    routes = good_routes(text)
    assert set(routes.providers) >= {"echo"}


def test_variables_expand_in_every_provider_string(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_TEST_HOST", "127.0.0.1:4000")
    monkeypatch.setenv("GW_TEST_KEY", "sk-from-env")
    monkeypatch.setenv("GW_TEST_TEAM", "search")
    monkeypatch.setenv("GW_TEST_VER", "2024-06-01")
    text = """\
providers:
  p:
    base_url: http://${GW_TEST_HOST}/v1
    api_key: ${GW_TEST_KEY}
    headers: {X-Team: "${GW_TEST_TEAM}-${GW_TEST_TEAM}", X-Plain: plain}
    query: {api-version: "${GW_TEST_VER}"}
models:
  m:
    providers: [p]
"""
    p = good_routes(text).providers["p"]
    assert p.base_url == "http://127.0.0.1:4000/v1"
    assert p.api_key is not None and p.api_key.reveal() == "sk-from-env"
    assert dict(p.headers) == {"X-Team": "search-search", "X-Plain": "plain"}
    assert dict(p.query) == {"api-version": "2024-06-01"}


def test_variable_default_is_used_only_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GW_TEST_UNSET", raising=False)
    monkeypatch.setenv("GW_TEST_SET", "from-env")
    text = """\
providers:
  p:
    base_url: ${GW_TEST_UNSET:-http://127.0.0.1:11434/v1}
    api_key: ${GW_TEST_SET:-fallback}
    headers: {X-Empty: "${GW_TEST_UNSET:-}", X-Def: "${GW_TEST_UNSET:-dflt}"}
models:
  m:
    providers: [p]
"""
    p = good_routes(text).providers["p"]
    assert p.base_url == "http://127.0.0.1:11434/v1"
    assert p.api_key is not None and p.api_key.reveal() == "from-env"
    assert dict(p.headers) == {"X-Empty": "", "X-Def": "dflt"}


# --------------------------------------------------------------------------- secrets


def test_secrets_never_appear_in_repr_or_str(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GW_TEST_API_KEY", "sk-env-secret-789")
    routes = """\
providers:
  a:
    base_url: http://127.0.0.1:9/v1
    api_key: sk-literal-secret-123
    headers: {api-key: hdr-secret-456}
  b:
    base_url: http://127.0.0.1:9/v1
    api_key: ${GW_TEST_API_KEY}
models:
  m:
    providers: [a, b]
"""
    keys = "keys:\n  - name: dev\n    key: sk-gw-plain-secret-000\n"
    config = load(tmp_path, routes, keys)
    provider = config.routes.providers["a"]
    assert provider.api_key is not None
    assert provider.api_key.reveal() == "sk-literal-secret-123"
    texts = [
        repr(provider),
        str(provider),
        repr(config.routes.providers["b"]),
        repr(provider.api_key),
        str(provider.api_key),
        f"{provider.api_key}",
        repr(config.routes.models["m"]),
        str(config.routes),
        repr(config),
        str(config),
        repr(config.keys),
        str(config.keys.entries[0]),
    ]
    for text in texts:
        for secret in (
            "sk-literal-secret-123",
            "hdr-secret-456",
            "sk-env-secret-789",
            "sk-gw-plain-secret-000",
        ):
            assert secret not in text


# --------------------------------------------------------------------------- catalog and wildcards

WILDCARDS = """\
providers:
  openai:
    base_url: https://api.openai.com/v1
  other:
    base_url: http://127.0.0.1:9/v1
models:
  "openai/*":
    providers: [{provider: openai}]
  "openai/gpt-*":
    providers: [{provider: other}]
  "openai/gpt-4o":
    providers: [{provider: openai, model: gpt-4o-2024-08-06}]
  "*-fast":
    providers: [{provider: other}]
  "pinned/*":
    providers: [{provider: openai, model: fixed-model}]
"""


def test_exact_slug_beats_wildcard() -> None:
    routes = good_routes(WILDCARDS)
    model = routes.resolve("openai/gpt-4o")
    assert model is not None and model.slug == "openai/gpt-4o"
    assert model.upstream_model(model.targets[0], "openai/gpt-4o") == "gpt-4o-2024-08-06"


def test_longest_wildcard_wins_regardless_of_file_order() -> None:
    routes = good_routes(WILDCARDS)
    model = routes.resolve("openai/gpt-4o-mini")
    assert model is not None and model.slug == "openai/gpt-*"
    assert model.targets[0].provider.name == "other"
    short = routes.resolve("openai/o1")
    assert short is not None and short.slug == "openai/*"


def test_wildcard_upstream_model_is_what_the_star_matched() -> None:
    routes = good_routes(WILDCARDS)
    for slug, pattern, upstream in [
        ("openai/o1-preview", "openai/*", "o1-preview"),
        ("openai/gpt-4o-mini", "openai/gpt-*", "4o-mini"),
        ("openai/org/model", "openai/*", "org/model"),
        ("llama-fast", "*-fast", "llama"),
    ]:
        model = routes.resolve(slug)
        assert model is not None and model.slug == pattern, slug
        assert model.upstream_model(model.targets[0], slug) == upstream


def test_explicit_model_wins_over_wildcard_match() -> None:
    routes = good_routes(WILDCARDS)
    model = routes.resolve("pinned/anything")
    assert model is not None and model.slug == "pinned/*"
    assert model.upstream_model(model.targets[0], "pinned/anything") == "fixed-model"


def test_unknown_slug_resolves_to_nothing() -> None:
    routes = good_routes(WILDCARDS)
    assert routes.resolve("anthropic/claude") is None
    assert routes.resolve("gpt-4o") is None


def test_exact_slug_upstream_model_defaults_to_the_slug() -> None:
    routes = good_routes(ECHO_ROUTES)
    model = routes.resolve("echo")
    assert model is not None
    assert model.upstream_model(model.targets[0], "echo") == "echo"


def test_wildcards_are_in_the_catalog_but_not_exact_models() -> None:
    routes = good_routes(WILDCARDS)
    assert list(routes.models) == ["openai/gpt-4o"]
    assert {m.slug for m in routes.catalog()} == {
        "openai/*",
        "openai/gpt-*",
        "openai/gpt-4o",
        "*-fast",
        "pinned/*",
    }


def test_weight_defaults_to_1_and_zero_is_allowed() -> None:
    text = """\
providers:
  a: {base_url: "http://127.0.0.1:9/v1"}
  b: {base_url: "http://127.0.0.1:8/v1"}
  c: {base_url: "http://127.0.0.1:7/v1"}
models:
  m:
    strategy: weighted
    providers:
      - provider: a
      - provider: b
        weight: 0
      - provider: c
        weight: 2.5
"""
    targets = good_routes(text).models["m"].targets
    assert [t.weight for t in targets] == [1, 0, 2.5]
    assert [t.provider.name for t in targets] == ["a", "b", "c"]


def test_negative_weight_is_a_problem() -> None:
    text = ECHO_ROUTES + "        weight: -1\n"
    _, problems = routes_of(text)
    assert_problems(problems, [(8, "weight")])


def test_id_and_name_default_to_the_slug() -> None:
    text = ECHO_ROUTES + (
        "  fancy:\n    id: fancy-id\n    name: Fancy Model\n    providers: [echo]\n"
        '  "echo/*":\n    providers: [echo]\n'
    )
    routes = good_routes(text)
    echo = routes.models["echo"]
    assert (echo.id, echo.name) == ("echo", "echo")
    fancy = routes.models["fancy"]
    assert (fancy.id, fancy.name) == ("fancy-id", "Fancy Model")
    wild = routes.resolve("echo/x")
    assert wild is not None and (wild.id, wild.name) == ("echo/*", "echo/*")
    assert routes.by_id("fancy-id") is fancy


def test_provider_options_are_read() -> None:
    text = """\
providers:
  p:
    base_url: http://127.0.0.1:9/v1/
    timeout: {connect: 5, read: 300}
    stream_usage: false
models:
  m:
    providers:
      - provider: p
        model: llama3.1:8b
    max_attempts: 2
    cooldown: {failures: 5, seconds: 10}
    commit_after: 1.5
    hedge_after_ms: 800
"""
    routes = good_routes(text)
    p = routes.providers["p"]
    assert p.timeout.connect == 5 and p.timeout.read == 300
    assert p.stream_usage is False
    m = routes.models["m"]
    assert m.targets[0].model == "llama3.1:8b"
    assert (m.max_attempts, m.cooldown.failures, m.cooldown.seconds) == (2, 5, 10)
    assert (m.commit_after, m.hedge_after_ms) == (1.5, 800)


def test_cooldown_defaults_to_3_failures_30_seconds() -> None:
    m = good_routes(ECHO_ROUTES).models["echo"]
    assert (m.cooldown.failures, m.cooldown.seconds) == (3, 30)


# --------------------------------------------------------------------------- keys.yaml

SECRET = "sk-gw-test-secret"
SECRET_HEX = hashlib.sha256(SECRET.encode()).hexdigest()


@pytest.mark.parametrize("hexed", [SECRET_HEX, SECRET_HEX.upper(), f'"{SECRET_HEX.upper()}"'])
def test_sha256_key_is_case_insensitive(hexed: str) -> None:
    keys = good_keys(f"keys:\n  - name: svc\n    sha256: {hexed}\n")
    assert not keys.open
    assert keys.by_digest[digest_of(SECRET)].name == "svc"
    assert digest_of("sk-gw-other") not in keys.by_digest


def test_plain_key_authenticates() -> None:
    keys = good_keys(f"keys:\n  - name: dev\n    key: {SECRET}\n")
    assert keys.by_digest[digest_of(SECRET)].name == "dev"


def test_sha256_and_key_together_is_a_problem() -> None:
    text = f"keys:\n  - name: both\n    sha256: {SECRET_HEX}\n    key: {SECRET}\n"
    _, problems = keys_of(text)
    assert len(problems) == 1
    assert problems[0].line in (2, 3, 4)
    assert "sha256" in problems[0].message and "key" in problems[0].message


@pytest.mark.parametrize(
    ("entry", "line", "needle"),
    [
        ("  - name: x\n    sha256: abc123\n", 3, "sha256"),
        ("  - name: x\n", 2, "sha256"),
        (f"  - sha256: {SECRET_HEX}\n", 2, "name"),
        (f"  - name: x\n    key: {SECRET}\n    models: gpt-4o\n", 4, "models"),
        (f"  - name: x\n    key: {SECRET}\n    disabled: sometimes\n", 4, "disabled"),
        (f"  - name: x\n    key: {SECRET}\n    expires: next year\n", 4, "expires"),
        (f"  - name: x\n    key: {SECRET}\n    rpn: 5\n", 4, "rpn"),
        ("  - just-a-string\n", 2, ""),
    ],
    ids=["bad-hex", "no-secret", "no-name", "models-str", "disabled", "expires", "typo", "str"],
)
def test_bad_key_entries_are_problems(entry: str, line: int, needle: str) -> None:
    _, problems = keys_of("keys:\n" + entry)
    assert_problems(problems, [(line, needle)])


def test_unknown_top_level_key_in_keys_file_is_a_problem() -> None:
    _, problems = keys_of("kyes:\n  - name: a\n    key: b\n")
    assert_problems(problems, [(1, "kyes")])


def test_keys_must_be_a_list() -> None:
    _, problems = keys_of("keys: {name: a}\n")
    assert_problems(problems, [(1, "keys")])


def test_duplicate_key_names_and_secrets_are_problems() -> None:
    text = f"""\
keys:
  - name: a
    key: {SECRET}
  - name: a
    key: other
  - name: b
    sha256: {SECRET_HEX}
"""
    _, problems = keys_of(text)
    assert_problems(problems, [(4, "'a'"), (6, "'b'")])


@pytest.mark.parametrize("field", ["rpm", "tpm", "token_quota"])
@pytest.mark.parametrize("value", ["0", "-5", "1.5", "lots", "true", "[1]"])
def test_limits_must_be_positive_whole_numbers(field: str, value: str) -> None:
    _, problems = keys_of(f"keys:\n  - name: a\n    key: {SECRET}\n    {field}: {value}\n")
    assert_problems(problems, [(4, field)])


def test_limits_models_and_disabled_are_read() -> None:
    text = f"""\
keys:
  - name: checkout
    key: {SECRET}
    models: ["gpt-4o-mini", "openai/*"]
    rpm: 600
    tpm: 200000
    token_quota: 5000000
    disabled: true
  - name: open
    key: other
"""
    keys = good_keys(text)
    checkout, other = keys.entries
    assert (checkout.rpm, checkout.tpm, checkout.token_quota) == (600, 200000, 5000000)
    assert checkout.disabled is True
    assert (other.rpm, other.tpm, other.token_quota, other.disabled) == (None, None, None, False)
    assert other.models is None


def test_models_allow_list_globs() -> None:
    keys = good_keys(
        f'keys:\n  - name: a\n    key: {SECRET}\n    models: ["gpt-4o-mini", "openai/*"]\n'
    )
    key = keys.entries[0]
    assert key.allows("gpt-4o-mini")
    assert key.allows("openai/gpt-4o")
    assert key.allows("openai/org/model")
    assert not key.allows("gpt-4o")
    assert not key.allows("gpt-4o-mini-2")
    assert not key.allows("anthropic/claude")
    unrestricted = good_keys("keys:\n  - name: b\n    key: x\n").entries[0]
    assert unrestricted.allows("anything/at-all")
    empty = good_keys("keys:\n  - name: c\n    key: y\n    models: []\n").entries[0]
    assert not empty.allows("gpt-4o-mini")


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.parametrize("value", ["2027-01-01", '"2027-01-01"'])
def test_expires_date_is_valid_through_that_day_utc(value: str) -> None:
    key = good_keys(f"keys:\n  - name: a\n    key: {SECRET}\n    expires: {value}\n").entries[0]
    assert not key.expired(_at("2026-12-31T12:00:00+00:00"))
    assert not key.expired(_at("2027-01-01T23:59:59.999+00:00"))
    assert key.expired(_at("2027-01-02T00:00:00+00:00"))
    # 23:30 in New York on Jan 1st is already Jan 2nd in UTC.
    assert key.expired(_at("2027-01-01T23:30:00-05:00"))


@pytest.mark.parametrize(
    ("value", "last_valid"),
    [
        ("2027-01-01T12:00:00Z", "2027-01-01T11:59:59+00:00"),
        ('"2027-01-01T12:00:00Z"', "2027-01-01T11:59:59+00:00"),
        ('"2027-01-01T12:00:00+02:00"', "2027-01-01T09:59:59+00:00"),
        ("2027-01-01 12:00:00", "2027-01-01T11:59:59+00:00"),
    ],
)
def test_expires_accepts_iso_timestamps(value: str, last_valid: str) -> None:
    key = good_keys(f"keys:\n  - name: a\n    key: {SECRET}\n    expires: {value}\n").entries[0]
    valid = _at(last_valid)
    assert not key.expired(valid)
    assert key.expired(valid + timedelta(seconds=1))


def test_no_expiry_never_expires() -> None:
    key = good_keys(f"keys:\n  - name: a\n    key: {SECRET}\n").entries[0]
    assert not key.expired(datetime(9999, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    "text", ["", "\n", "# only a comment\n", "keys:\n", "keys: []\n", "# c\nkeys: [] # none\n"]
)
def test_empty_keys_file_means_no_auth(tmp_path: Path, text: str) -> None:
    config = load(tmp_path, ECHO_ROUTES, text)
    assert config.keys.open
    assert config.keys.entries == ()
    # Also when the file is named explicitly: it exists, it is just empty.
    assert load(tmp_path, ECHO_ROUTES, text, keys_required=True).keys.open


def test_absent_default_keys_file_means_no_auth(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "routes.yaml", ECHO_ROUTES), str(tmp_path / "keys.yaml"))
    assert config.keys.open


def test_explicit_keys_file_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "routes.yaml", ECHO_ROUTES), missing, keys_required=True)
    assert len(info.value.problems) == 1
    problem = info.value.problems[0]
    assert problem.path == missing
    assert str(problem).startswith(f"{missing}:")


def test_keys_file_with_keys_is_not_open(tmp_path: Path) -> None:
    config = load(tmp_path, ECHO_ROUTES, f"keys:\n  - name: a\n    sha256: {SECRET_HEX}\n")
    assert not config.keys.open
    assert [k.name for k in config.keys.entries] == ["a"]


# --------------------------------------------------------------------------- load_config


def test_load_config_reads_both_files(tmp_path: Path) -> None:
    config = load(tmp_path, ECHO_ROUTES, f"keys:\n  - name: a\n    key: {SECRET}\n")
    assert list(config.routes.models) == ["echo"]
    assert config.routes.providers["echo"].builtin == "echo"
    assert digest_of(SECRET) in config.keys.by_digest


def test_config_version_changes_when_either_file_changes(tmp_path: Path) -> None:
    keys = f"keys:\n  - name: a\n    key: {SECRET}\n"
    first = load(tmp_path, ECHO_ROUTES, keys).version
    assert first
    assert load(tmp_path, ECHO_ROUTES, keys).version == first
    routes_changed = load(tmp_path, ECHO_ROUTES + "# edited\n", keys).version
    keys_changed = load(tmp_path, ECHO_ROUTES, keys + "# edited\n").version
    assert len({first, routes_changed, keys_changed}) == 3
    assert load(tmp_path, ECHO_ROUTES, keys).version == first


def test_missing_routes_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "absent-routes.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(missing, str(tmp_path / "keys.yaml"))
    assert [p.path for p in info.value.problems] == [missing]


def test_problems_from_load_config_use_path_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "r.yaml").write_text(ECHO_ROUTES + "    strategy: nope\n")
    with pytest.raises(ConfigError) as info:
        load_config("conf/r.yaml", "keys.yaml")
    (problem,) = info.value.problems
    assert str(problem).startswith("conf/r.yaml:8: ")
    assert "nope" in str(problem)


def test_attempts_timeout_defaults_and_validation() -> None:
    base = "providers:\n  p: {base_url: http://127.0.0.1:1/v1}\nmodels:\n  m:\n"
    routes = good_routes(base + "    providers: [{provider: p}]\n")
    assert routes.models["m"].attempts_timeout == 300.0
    routes = good_routes(base + "    attempts_timeout: 2.5\n    providers: [{provider: p}]\n")
    assert routes.models["m"].attempts_timeout == 2.5
    _, problems = routes_of(base + "    attempts_timeout: -1\n    providers: [{provider: p}]\n")
    assert [(p.line, "attempts_timeout" in p.message) for p in problems] == [(5, True)]


def test_provider_header_with_a_line_break_is_refused() -> None:
    text = (
        "providers:\n  p:\n    base_url: http://127.0.0.1:1/v1\n"
        '    headers: {X-Bad: "a\\r\\nInjected: yes"}\n'
        "models:\n  m: {providers: [{provider: p}]}\n"
    )
    _, problems = routes_of(text)
    assert [(p.line, "line breaks" in p.message) for p in problems] == [(4, True)]


def test_names_with_control_characters_are_refused() -> None:
    text = (
        'providers:\n  "p\\r\\nx": {base_url: "http://127.0.0.1:1/v1"}\n'
        "  q: {base_url: http://127.0.0.1:1/v1}\n"
        'models:\n  "m\\n": {providers: [{provider: q}]}\n'
    )
    _, problems = routes_of(text)
    assert [(p.line, "control characters" in p.message) for p in problems] == [(2, True), (5, True)]


def test_max_connections_is_read_and_checked() -> None:
    routes = good_routes(
        "providers:\n  p:\n    base_url: http://127.0.0.1:9/v1\n    max_connections: 8\n"
        "models:\n  m:\n    providers: [{provider: p}]\n"
    )
    assert routes.providers["p"].max_connections == 8
    assert routes.models["m"].targets[0].provider.max_connections == 8
    _, problems = routes_of(
        "providers:\n  p:\n    base_url: http://127.0.0.1:9/v1\n    max_connections: 0\n"
        "models:\n  m:\n    providers: [{provider: p}]\n"
    )
    found = [str(p) for p in problems]
    assert any("max_connections must be at least 1" in p for p in found), found


def test_a_model_template_needs_a_wildcard_slug(tmp_path: Path) -> None:
    routes = (
        "providers:\n  p: {base_url: 'http://127.0.0.1:9/v1'}\n"
        "models:\n"
        "  'claude-*':\n    providers: [{provider: p, model: 'claude-{*}'}]\n"
        "  exact:\n    providers: [{provider: p, model: 'x-{*}'}]\n"
    )
    problems = [str(p) for p in load_problems(tmp_path, routes)]
    assert len(problems) == 1 and "routes.yaml:7:" in problems[0], problems
    assert "needs a wildcard slug" in problems[0]
    templated = load(tmp_path, routes.rsplit("  exact:", 1)[0]).routes.wildcards
    assert [t.templated for m in templated for t in m.targets] == [True]
