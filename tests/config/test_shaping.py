"""The shaping keys of providers and entries (SPEC §14): drop_betas, allow_betas,
drop_fields, count_tokens and websocket; where each is taken from and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.routes import Target
from gateway.config.shaping import Shaping
from tests.config.test_config import assert_problems, good_routes, load_problems, routes_of


def targets(text: str, slug: str = "m") -> tuple[Target, ...]:
    return good_routes(text).models[slug].targets


def test_nothing_is_shaped_by_default() -> None:
    (target,) = targets(
        "providers:\n  p: {base_url: 'http://127.0.0.1:9'}\n"
        "models:\n  m: {providers: [{provider: p}]}\n"
    )
    assert target.shaping is None  # the plain path checks one attribute
    assert target.count_estimate is False and target.websocket is False
    assert target.provider.websocket is False


ROUTES = """\
providers:
  bedrock:
    base_url: http://127.0.0.1:9
    drop_betas: [context-management-2025-06-27, advanced-tool-use-2025-11-20]
    drop_fields: [context_management]
    count_tokens: estimate
    websocket: true
  vertex:
    base_url: http://127.0.0.1:8
models:
  m:
    providers:
      - provider: bedrock
      - provider: bedrock
        allow_betas: [interleaved-thinking-2025-05-14]
        drop_fields: []
        count_tokens: relay
        websocket: false
      - provider: vertex
        drop_betas: [advanced-tool-use-2025-11-20]
"""


def test_an_entry_takes_its_providers_keys_and_its_own_win_key_by_key() -> None:
    inherited, own, other = targets(ROUTES)
    assert inherited.shaping == Shaping(
        frozenset({"context-management-2025-06-27", "advanced-tool-use-2025-11-20"}),
        None,
        ("context_management",),
    )
    assert inherited.count_estimate is True and inherited.websocket is True
    # The entry's beta rule replaces the provider's whole (allow over drop), and its
    # empty drop_fields removes none.
    assert own.shaping == Shaping(frozenset(), frozenset({"interleaved-thinking-2025-05-14"}), ())
    assert own.count_estimate is False and own.websocket is False
    assert own.provider.websocket is True  # the provider's own value stays readable
    assert other.shaping == Shaping(frozenset({"advanced-tool-use-2025-11-20"}), None, ())


def test_allow_betas_empty_keeps_no_beta() -> None:
    (target,) = targets(
        "providers:\n  p: {base_url: 'http://127.0.0.1:9', allow_betas: []}\n"
        "models:\n  m: {providers: [p]}\n"
    )
    assert target.shaping == Shaping(frozenset(), frozenset(), ())


def test_fields_keep_their_written_order_once() -> None:
    (target,) = targets(
        "providers:\n  p: {base_url: 'http://127.0.0.1:9'}\n"
        "models:\n  m: {providers: [{provider: p, drop_fields: [b, a, b]}]}\n"
    )
    assert target.shaping is not None and target.shaping.drop_fields == ("b", "a")


BAD = """\
providers:
  p:
    base_url: http://127.0.0.1:9
    drop_betas: [a]
    allow_betas: [b]
    websocket: "yes"
    count_tokens: guess
models:
  m:
    providers:
      - provider: p
        drop_betas: [a]
        allow_betas: [b]
      - provider: p
        drop_betas: "context-management-2025-06-27"
        drop_fields: [model, context_management]
        websocket: 1
      - provider: p
        allow_betas: ["two tokens", "a,b"]
        drop_fields: [1]
        count_tokens: true
"""


def test_each_bad_value_is_a_problem_at_its_line() -> None:
    _, problems = routes_of(BAD)
    assert_problems(
        problems,
        [
            (5, "drop_betas and allow_betas cannot both be set"),
            (6, "websocket must be true or false"),
            (7, "count_tokens must be relay or estimate"),
            (13, "drop_betas and allow_betas cannot both be set"),
            (15, "drop_betas must be a list"),
            (16, "drop_fields cannot remove 'model'"),
            (17, "websocket must be true or false"),
            (19, "'two tokens' is not one of beta names"),
            (20, "drop_fields must be a list"),
            (21, "count_tokens must be relay or estimate"),
        ],
    )


def test_the_load_names_file_and_line(tmp_path: Path) -> None:
    problems = load_problems(
        tmp_path,
        "providers:\n  p:\n    base_url: http://127.0.0.1:9\n"
        "    drop_betas: [a]\n    allow_betas: [b]\n"
        "models:\n  m: {providers: [p]}\n",
    )
    (problem,) = problems
    assert str(problem).startswith(str(tmp_path / "routes.yaml") + ":5: ")
    assert "drop_betas and allow_betas" in str(problem)


@pytest.mark.parametrize("key", ["drop_betas", "allow_betas", "drop_fields"])
def test_a_list_of_names_is_required(key: str) -> None:
    _, problems = routes_of(
        f"providers:\n  p:\n    base_url: http://127.0.0.1:9\n    {key}: {{a: 1}}\n"
        "models:\n  m: {providers: [p]}\n"
    )
    assert_problems(problems, [(4, f"{key} must be a list")])


def test_websocket_is_refused_with_aws_auth() -> None:
    """A WebSocket upgrade is one GET: no SigV4 signature covers the frames after it."""
    _, problems = routes_of(
        "providers:\n"
        "  bedrock:\n"
        "    base_url: https://bedrock-runtime.us-east-1.amazonaws.com\n"
        "    auth: {aws: {region: us-east-1}}\n"
        "    websocket: true\n"
        "  bedrock2:\n"
        "    base_url: https://bedrock-runtime.us-west-2.amazonaws.com\n"
        "    auth: {aws: {region: us-west-2}}\n"
        "models:\n"
        "  m:\n"
        "    providers:\n"
        "      - {provider: bedrock2, websocket: true}\n"
    )
    assert_problems(
        problems,
        [
            (5, "websocket cannot be used with aws auth"),
            (12, "websocket cannot be used with aws auth"),
        ],
    )
