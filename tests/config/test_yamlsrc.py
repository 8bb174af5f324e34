"""The fast ways to a YAML tree against pyyaml's constructor path: the same trees,
lines and messages.

parse_yaml builds a plain document straight from the parser's events (`from_events`)
and gives anything else to parse_nodes, which composes the nodes and walks them
(`build`); `parse_nodes(reference=True)` runs pyyaml's construct_object over the same
nodes, node by node, as the loader did before. Every YAML text in the config, CLI and
auth tests, a table of YAML's corners and generated documents must give the same tree
(types, .line, .lines), the same YAML problems and, through parse_routes and
parse_keys, the same frozen objects and `file:line: message` lines, by every path,
stepwise or not.
"""

from __future__ import annotations

import ast
import gc
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, load_config
from gateway.config.keys import parse_keys
from gateway.config.routes import parse_routes
from gateway.config.source import LineList, LineMap, Source
from gateway.config.yamlsrc import (
    Loaders,
    _resolve,
    _Unusual,
    from_events,
    parse_nodes,
    parse_yaml,
)

TESTS = Path(__file__).resolve().parent.parent
CORPUS_FILES = [
    *sorted((TESTS / "config").glob("test_*.py")),
    TESTS / "test_cli.py",
    TESTS / "test_auth.py",
    TESTS / "test_reload.py",
]


def harvested() -> list[str]:
    """Every string literal in the config tests that reads as YAML (a `key:` in it)."""
    texts: dict[str, None] = {}
    for path in CORPUS_FILES:
        if not path.exists() or path.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and ":" in node.value
                and len(node.value) < 20_000
            ):
                texts[node.value] = None
    return list(texts)


CORNERS = [
    "",
    "# only a comment\n",
    "just text\n",
    "'quoted'\n",
    "~\n",
    "---\n",
    "--- 12\n...\n",
    "a:\nb: ''\nc: -\n",
    "a: [[1, [2, {b: [3]}]], {}]\nc: {d: {e: {f: []}}}\n",
    "a: 1\na: 2\n",
    "a: {b: 1, b: 2}\nc: [1, 2]\n",
    "base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\n",
    "base: &b {x: 1}\nd:\n  <<: [*b, {z: 1}]\n  x: 2\n",
    "d:\n  <<: 5\n",
    "d:\n  <<: [1]\n",
    "d:\n  =: value\n",
    "a: &x [1, 2]\nb: *x\nc: *x\n",
    "a: &x {k: v}\nb: [*x, *x]\n",
    "a: &r [*r]\n",
    "a: &r {self: *r}\n",
    "a: *missing\n",
    "? [complex, key]\n: value\n1: int key\n~: null key\n2027-01-01: date key\n",
    "? {m: 1}\n: value\n",
    "a: !!int abc\n",
    "a: !!float x\nb: !!bool maybe\n",
    "a: !!str 5\nb: !!int '7'\nc: !!float '1.5'\n",
    "a: !!set {x, y}\n",
    "a: !!omap [{x: 1}, {y: 2}]\n",
    "a: !!pairs [{x: 1}]\n",
    "a: !!binary aGVsbG8=\n",
    "a: !custom thing\n",
    "a: !!str {x: 1}\n",
    "a: !!map [1]\n",
    "a: !!seq {x: 1}\n",
    "a: !!map {x: 1}\nb: !!seq [1]\n",
    "a: !!python/object:os.system x\n",
    "a: 2027-13-01\nb: 2027-01-01\nc: 2027-01-01T10:00:00Z\nd: 9999-12-31\n",
    "a: yes\nb: No\nc: ~\nd: null\ne: .nan\nf: -.inf\ng: 0x1F\nh: 0o17\ni: 1_000\nj: 1e3\n",
    "a: '1'\nb: \"yes\"\nc: ''\nd:\ne: -\n",
    "- a\n- b: 1\n  c: 2\n-\n  - nested\n",
    "a: [1, 2\n",
    "a: b: c\n",
    "a:\n\t- tab\n",
    "--- 1\n--- 2\n",
    "%YAML 1.1\n---\na: 1\n",
    "a: 'unterminated\n",
    'key: "\\x00"\n',
    "a: |\n  block\n  text\nb: >\n  folded\n",
    "[" * 50 + "]" * 50,
]


def same_tree(a: Any, b: Any, at: str = "$") -> None:
    assert type(a) is type(b), f"{at}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, LineMap):
        assert (a.line, a.lines, list(a)) == (b.line, b.lines, list(b)), at
        for key in a:
            same_tree(a[key], b[key], f"{at}.{key}")
    elif isinstance(a, LineList | list | tuple):
        assert len(a) == len(b), at
        if isinstance(a, LineList):
            assert (a.line, a.lines) == (b.line, b.lines), at
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            same_tree(x, y, f"{at}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), at
        for key in a:
            same_tree(a[key], b[key], f"{at}.{key}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), at
    else:
        assert a == b, at


PATHS = ("parse_yaml", "events", "build", "reference")


def parsed(text: str, stepwise: bool, path: str) -> tuple[Any, list[str]] | None:
    """(tree, problems) by one path; None where the events path leaves the text."""
    src = Source("f.yaml")
    if path == "events":
        loader = Loaders.get(stepwise)(text)
        try:
            data, duplicates = from_events(loader)
        except (_Unusual, yaml.YAMLError):
            return None
        finally:
            loader.dispose()
        return data, [f"f.yaml:{line}: {message}" for line, message in duplicates]
    if path == "parse_yaml":
        data = parse_yaml(text, src, stepwise)
    else:
        data = parse_nodes(text, src, stepwise, reference=path == "reference")
    return data, [str(p) for p in src.problems]


def validated(text: str, stepwise: bool, path: str) -> list[Any]:
    """The routes and the keys made of the text, each with its messages."""
    out: list[Any] = []
    for parse in (parse_routes, parse_keys):
        result = parsed(text, stepwise, path)
        assert result is not None
        src = Source("f.yaml")
        made = parse(result[0], src)
        out += [made, result[1] + [str(p) for p in src.problems]]
    return out


def assert_paths_agree(text: str) -> bool:
    """True where the events path took the text."""
    took = False
    for stepwise in (False, True):
        # The composers differ in a few syntax messages (libyaml's C one names an
        # undefined alias less), as they did before: each path against its own.
        expected = parsed(text, stepwise, "reference")
        assert expected is not None
        for path in PATHS[:-1]:
            got = parsed(text, stepwise, path)
            if got is None:
                continue
            took = took or path == "events"
            assert got[1] == expected[1], (text, stepwise, path)
            same_tree(got[0], expected[0])
            # The same frozen Routes and Keys (dataclass equality) and the same lines.
            assert validated(text, stepwise, path) == validated(text, stepwise, "reference")
    fast, step = parsed(text, False, "parse_yaml"), parsed(text, True, "parse_yaml")
    assert fast is not None and step is not None
    if not fast[1] and not step[1]:
        same_tree(fast[0], step[0])
    return took


CORPUS = harvested()


def test_the_corpus_is_the_config_tests_own() -> None:
    # A guard on the harvest: hundreds of configs, bad ones among them, and the events
    # path takes most of them.
    assert len(CORPUS) > 200
    assert any("unknown key" in " ".join(validated(t, False, "parse_yaml")[1]) for t in CORPUS)
    assert sum(parsed(t, False, "events") is not None for t in CORPUS) > 0.8 * len(CORPUS)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_every_config_of_the_tests_parses_the_same_by_either_path(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GW_SET_FOR_CORPUS", "x")
    assert_paths_agree(text)


@pytest.mark.parametrize("text", CORNERS, ids=range(len(CORNERS)))
def test_yaml_corners_parse_the_same_by_either_path(text: str) -> None:
    assert_paths_agree(text)


def test_yaml_corners_keep_their_messages() -> None:
    """Some corners by name, so a change in both paths at once is seen too."""

    def fast(text: str) -> tuple[Any, list[str]]:
        result = parsed(text, False, "parse_yaml")
        assert result is not None
        return result

    assert fast("a: 1\na: 2\n") == ({"a": 2}, ["f.yaml:2: duplicate key 'a'"])
    assert fast("a:\n  b: 1\n  b: {c: 1, c: 2}\n") == (
        {"a": {"b": {"c": 2}}},
        ["f.yaml:3: duplicate key 'b'", "f.yaml:3: duplicate key 'c'"],
    )
    data, problems = fast("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  y: 3\n")
    assert data["d"] == {"x": 1, "y": 3}
    assert problems == ["f.yaml:4: duplicate key 'y'"]
    assert fast("a: &r [*r]\n") == (
        None, ["f.yaml:1: invalid YAML: found unconstructable recursive node"])  # fmt: skip
    assert fast("a: !custom thing\n")[1] == [
        "f.yaml:1: invalid YAML: could not determine a constructor for the tag '!custom'"
    ]
    data, _ = fast("a: &x {k: v}\nb: [*x, *x]\n")
    assert data["b"][0] is data["b"][1] is data["a"]  # an alias is the object, built once
    data, _ = fast("a:\n  - x\n  -\n    - y\n")
    assert (data.lines, data["a"].line, data["a"].lines, data["a"][1].line) == (
        {"a": 1}, 2, [2, 4], 4)  # fmt: skip


@pytest.mark.parametrize("stepwise", [False, True])
@pytest.mark.parametrize("kind", ["[", "{a: "])
def test_nesting_deeper_than_python_recurses_is_a_problem_not_a_traceback(
    stepwise: bool, kind: str
) -> None:
    text = kind * 900 + "1" + ("]" if kind == "[" else "}") * 900
    src = Source("f.yaml")
    # The events path builds it (no recursion); the node paths cannot, and say so.
    assert parse_yaml(text, src, stepwise) is not None and not src.problems
    assert parsed(text, stepwise, "build") == (
        None, ["f.yaml:1: invalid YAML: nested too deeply"])  # fmt: skip
    text = "a: &x 1\nb: " + text  # an anchor: the node path
    assert parsed(text, stepwise, "parse_yaml") == (
        None, ["f.yaml:1: invalid YAML: nested too deeply"])  # fmt: skip


# ------------------------------------------------------------------- generated documents

KEYS = st.sampled_from(
    ["providers", "models", "keys", "echo", "m1", "base_url", "provider", "model", "name",
     "sha256", "key", "rpm", "tpm", "weight", "price", "input", "output", "timeout", "connect",
     "strategy", "expires", "cooldown", "token_quota", "tokens", "period", "x", "1", "~",
     "yes", "<<"]
)  # fmt: skip
SCALARS = st.sampled_from(
    ["echo", "builtin:echo", "http://127.0.0.1:9/v1", "fallback", "k1", "1", "-2", "0.5",
     "1e3", ".nan", ".inf", "0x1F", "yes", "no", "on", "~", "null", "", "2027-01-01",
     "2027-13-01", "2027-01-01T10:00:00Z", "'quoted'", '"dq\\t"', "!!int abc", "!!str 5",
     "!!float 2", "!!binary aGk=", "a" * 64, "f" * 64, "day", "month", "[]", "{}",
     "[echo]", "{provider: echo}", "[a, 1, yes]"]
)  # fmt: skip


def _block(draw: st.DrawFn, depth: int, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if draw(st.booleans()):  # a mapping
        for _ in range(draw(st.integers(1, 4))):
            key = draw(KEYS)
            if depth < 3 and draw(st.integers(0, 2)) == 0:
                lines.append(f"{pad}{key}:")
                lines += _block(draw, depth + 1, indent + 2)
            else:
                lines.append(f"{pad}{key}: {draw(SCALARS)}")
    else:  # a sequence
        for _ in range(draw(st.integers(1, 3))):
            if depth < 3 and draw(st.booleans()):
                inner = _block(draw, depth + 1, indent + 2)
                lines.append(f"{pad}- {inner[0].lstrip()}")
                lines += inner[1:]
            else:
                lines.append(f"{pad}- {draw(SCALARS)}")
    return lines


@st.composite
def documents(draw: st.DrawFn) -> str:
    lines = _block(draw, 0, 0)
    if draw(st.booleans()):  # an anchor on the first entry, an alias or a merge of it
        lines[0] = lines[0] + " &a {z: 1}" if lines[0].endswith(":") else lines[0]
        lines.append(draw(st.sampled_from(["zz: *a", "<<: *a", "- *a", "zz: *nope"])))
    return "\n".join(lines) + "\n"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_generated_documents_parse_the_same_by_either_path(text: str) -> None:
    assert_paths_agree(text)


DATES = r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}([Tt ][0-9:.]{0,12}(Z|[-+][0-9:]{1,5})?)?"
SCALAR_TEXT = st.one_of(
    st.text(alphabet="0123456789+-._:eExXoObB~nNyYtTfFaluEsr <=!&*TZ", max_size=24),
    st.from_regex(r"[-+]?[0-9_]{0,8}(\.[0-9]*)?([eE][-+]?[0-9]+)?", fullmatch=True),
    st.from_regex(DATES, fullmatch=True),
    st.text(max_size=12),
)


@given(SCALAR_TEXT, st.booleans(), st.booleans())
def test_resolve_is_pyyamls_for_every_scalar(value: str, plain: bool, quoted: bool) -> None:
    loader = Loaders.get(False)("")
    expected = yaml.resolver.Resolver().resolve(yaml.ScalarNode, value, (plain, quoted))
    assert _resolve(loader, yaml.ScalarNode, value, (plain, quoted)) == expected
    loader.dispose()


def test_resolve_names_containers_as_pyyaml_does() -> None:
    loader = Loaders.get(False)("")
    resolver = yaml.resolver.Resolver()
    for kind in (yaml.MappingNode, yaml.SequenceNode):
        assert _resolve(loader, kind, None, (True, False)) == resolver.resolve(
            kind, None, (True, False)
        )
    loader.dispose()


def test_values_are_pyyamls_safe_load_ones() -> None:
    """An oracle outside this module: where safe_load takes a corpus text, the tree is its
    (keys as text, as the loader makes them)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value

    compared = 0
    for text in CORPUS + CORNERS:
        try:
            expected = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
            continue
        result = parsed(text, False, "parse_yaml")
        assert result is not None
        data, problems = result
        if problems:
            continue
        same_tree(plain(data), plain(expected))
        compared += 1
    assert compared > 150


# ------------------------------------------------------------------- load_config


def test_load_config_leaves_the_collector_as_it_found_it(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("providers:\n  echo: {base_url: 'builtin:echo'}\n")
    keys = str(tmp_path / "keys.yaml")
    assert gc.isenabled()
    load_config(str(routes), keys)
    assert gc.isenabled()
    routes.write_text("providers: [\n")
    with pytest.raises(ConfigError):
        load_config(str(routes), keys)
    assert gc.isenabled()
    gc.disable()  # as the reload thread calls it: still off afterwards
    try:
        with pytest.raises(ConfigError):
            load_config(str(routes), keys, stepwise=True)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_big_config_loads_with_its_counts(tmp_path: Path) -> None:
    models = "".join(f"  m{i}:\n    providers: [{{provider: echo, model: up{i}}}]\n"
                     for i in range(2_000))  # fmt: skip
    routes = tmp_path / "routes.yaml"
    routes.write_text("providers:\n  echo:\n    base_url: builtin:echo\nmodels:\n" + models)
    keys = tmp_path / "keys.yaml"
    keys.write_text("keys:\n" + "".join(
        f"  - name: k{i}\n    key: sk-{i}\n    rpm: 60\n    tpm: 1000\n" for i in range(2_000)))  # fmt: skip
    for stepwise in (False, True):
        config = load_config(str(routes), str(keys), stepwise=stepwise)
        assert len(config.routes.models) == 2_000
        assert config.routes.models["m1999"].targets[0].model == "up1999"
        assert len(config.keys.entries) == 2_000
        assert config.keys.entries[-1].rpm == 60
