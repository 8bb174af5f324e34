"""gateway/config/source.py: how the parsers read a line-tracked tree and say problems,
each at the line of the key it is about."""

from __future__ import annotations

import pytest

from gateway.config.source import LineList, LineMap, Problem, Source, check_keys, line_of, number
from gateway.config.yamlsrc import parse_yaml


def tree(text: str) -> LineMap:
    src = Source("routes.yaml")
    data = parse_yaml(text, src)
    assert not src.problems
    assert isinstance(data, LineMap)
    return data


def test_problems_name_the_file_and_line() -> None:
    src = Source("keys.yaml")
    src.problem(7, "something is wrong")
    assert src.problems == [Problem("keys.yaml", 7, "something is wrong")]
    assert str(src.problems[0]) == "keys.yaml:7: something is wrong"


def test_line_of_a_key_an_item_and_what_has_no_line() -> None:
    data = tree("a: 1\nlist:\n  - x\n  - y\n")
    assert line_of(data, "list") == 2
    items = data["list"]
    assert isinstance(items, LineList)
    assert line_of(items, 1) == 4
    assert line_of(items, 5) == items.line == 3  # past the end: the list's own line
    assert line_of(data, "absent") == data.line == 1
    assert line_of({"plain": 1}, "plain", default=9) == 9


def test_check_keys_names_each_unknown_key_at_its_line() -> None:
    src = Source("routes.yaml")
    data = tree("slug: a\nretries: 2\nbogus: 1\n")
    check_keys(src, data, frozenset({"slug"}), "a model")
    assert [(p.line, p.message) for p in src.problems] == [
        (2, "unknown key 'retries' in a model (allowed: slug)"),
        (3, "unknown key 'bogus' in a model (allowed: slug)"),
    ]


@pytest.mark.parametrize(
    ("value", "integer", "message"),
    [
        ("true", False, "n must be a number, got True"),
        ("1.5", True, "n must be a whole number, got 1.5"),
        (".nan", False, "n must be a number, got nan"),
        (".inf", False, "n must be a number, got inf"),
        ("-1", False, "n must be at least 0, got -1"),
    ],
)
def test_number_refuses_with_the_key_line(value: str, integer: bool, message: str) -> None:
    src = Source("keys.yaml")
    data = tree(f"other: 1\nn: {value}\n")
    assert number(src, data, "n", 0, integer) is None
    assert [(p.line, p.message) for p in src.problems] == [(2, message)]


def test_number_passes_a_good_value() -> None:
    src = Source("keys.yaml")
    assert number(src, tree("n: 3\n"), "n", 1, integer=True) == 3
    assert not src.problems
