"""YAML with line numbers: mappings and sequences remember where each entry stood."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml


@dataclass(frozen=True, slots=True)
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


class LineMap(dict[str, Any]):
    """A mapping that knows its own line and the line of each key."""

    line: int = 1
    lines: dict[str, int]


class LineList(list[Any]):
    line: int = 1
    lines: list[int]


@dataclass(slots=True)
class Source:
    """One file being read; collects every problem instead of stopping at the first."""

    path: str
    problems: list[Problem] = field(default_factory=list)

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.path, line, message))


def _loader_classes() -> tuple[type[Any], type[Any]]:
    """(fast, stepwise) loaders with the same constructors and line numbers.

    fast: libyaml's CSafeLoader where pyyaml was built with it (3x the pure loader),
    else the pure one. stepwise: libyaml's event parser under the pure-Python composer,
    so parsing a large file in a thread returns to the interpreter between events and
    never holds the event loop off (a reload); without libyaml, the pure loader."""
    if not getattr(yaml, "__with_libyaml__", False):
        return yaml.SafeLoader, yaml.SafeLoader
    from yaml._yaml import CParser
    from yaml.composer import Composer
    from yaml.constructor import SafeConstructor
    from yaml.resolver import Resolver

    class StepLoader(Composer, CParser, SafeConstructor, Resolver):
        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)

        def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
            # Scalars are not memoized: an alias to one gives an equal immutable value,
            # and the memo of every node grew to a dict of a million entries whose
            # resizes held the interpreter lock 70 ms at a time (100k models).
            if isinstance(node, yaml.ScalarNode):
                construct = self.yaml_constructors.get(node.tag)
                if construct is not None:
                    return construct(self, node)
            return SafeConstructor.construct_object(self, node, deep)

    return yaml.CSafeLoader, StepLoader


def _with_lines(base: type[Any]) -> type[Any]:
    loader: Any = type(f"Line{base.__name__}", (base,), {"duplicates": []})
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
    loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)
    for kind in ("bool", "int", "float", "timestamp"):
        tag = f"tag:yaml.org,2002:{kind}"
        loader.add_constructor(tag, _checked(kind, loader.yaml_constructors[tag]))
    built: type[Any] = loader
    return built


def _checked(kind: str, construct: Any) -> Any:
    """pyyaml's scalar constructors raise plain ValueError, KeyError or AttributeError on
    `!!int abc` or `2027-13-01` (a traceback, not a problem with a line): here that
    becomes a YAML error at the value's line. A date-shaped value that is no date
    (`2027-13-01`) stays the string it is, for its field's check to name."""

    def checked(loader: Any, node: yaml.ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, KeyError, AttributeError, OverflowError):
            if kind == "timestamp" and isinstance(node.value, str):
                return node.value
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a valid {kind}", node.start_mark
            ) from None

    return checked


def _construct_map(loader: Any, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    out = LineMap()
    out.line = node.start_mark.line + 1
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            key = str(key)
        if key in out:
            loader.duplicates.append((line, f"duplicate key {key!r}"))
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _construct_seq(loader: Any, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.lines = [child.start_mark.line + 1 for child in node.value]
    return out


class Loaders:
    """Built on first use, not at import (nothing is built at import time)."""

    _built: tuple[type[Any], type[Any]] | None = None

    @classmethod
    def get(cls, stepwise: bool) -> type[Any]:
        if cls._built is None:
            fast, step = _loader_classes()
            cls._built = (_with_lines(fast), _with_lines(step))
        return cls._built[1 if stepwise else 0]


def parse_yaml(text: str, src: Source, stepwise: bool = False) -> Any:
    """Parse one YAML document; a syntax error becomes a problem and None. `stepwise`:
    for a parse in a thread beside the event loop (see _loader_classes)."""
    loader = Loaders.get(stepwise)(text)
    loader.duplicates = []
    try:
        if not stepwise:
            data = loader.get_single_data()
        else:
            node = loader.get_single_node()
            data = None if node is None else loader.construct_document(node)
            release(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        src.problem(line, f"invalid YAML: {exc.problem or exc.context}")
        return None
    except yaml.YAMLError as exc:
        src.problem(1, f"invalid YAML: {exc}")
        return None
    finally:
        loader.dispose()
    for line, message in loader.duplicates:
        src.problem(line, message)
    return data


RELEASE_AT = 64  # containers larger than this are emptied piece by piece


def release(tree: Any) -> None:
    """Free a large tree (YAML nodes, parsed data) a piece at a time.

    Dropping the last reference to a tree of a million objects frees them all in one C
    call, ~170 ms with the interpreter lock held: in a reload thread that would stall
    the event loop just the same. Emptied here a container at a time, the lock is
    handed over between pieces."""
    stack = [tree]
    while stack:
        item = stack.pop()
        value = getattr(item, "value", item)  # a YAML node holds its children in .value
        if isinstance(value, dict):
            while value:
                _, child = value.popitem()
                if _large(child):
                    stack.append(child)
        elif isinstance(value, list):
            while value:
                child = value.pop()
                for part in child if isinstance(child, tuple) else (child,):
                    if _large(part):
                        stack.append(part)


def _large(item: Any) -> bool:
    value = getattr(item, "value", item)
    return isinstance(value, dict | list) and len(value) > RELEASE_AT


def line_of(container: Any, key: str | int, default: int = 1) -> int:
    lines = getattr(container, "lines", None)
    if isinstance(lines, dict) and isinstance(key, str):
        return int(lines.get(key, getattr(container, "line", default)))
    if isinstance(lines, list) and isinstance(key, int) and 0 <= key < len(lines):
        return int(lines[key])
    return int(getattr(container, "line", default))


def check_keys(src: Source, mapping: LineMap, allowed: frozenset[str], where: str) -> None:
    for key in mapping:
        if key not in allowed:
            choices = ", ".join(sorted(allowed))
            src.problem(
                line_of(mapping, key), f"unknown key {key!r} in {where} (allowed: {choices})"
            )


def number(src: Source, parent: LineMap, key: str, minimum: float, integer: bool = False) -> Any:
    value = parent[key]
    kind = "a whole number" if integer else "a number"
    if (
        isinstance(value, bool)
        or not isinstance(value, int if integer else (int, float))
        or value != value  # .nan compares below nothing and would pass any minimum
        or value == float("inf")
    ):
        src.problem(line_of(parent, key), f"{key} must be {kind}, got {value!r}")
        return None
    if value < minimum:
        src.problem(line_of(parent, key), f"{key} must be at least {minimum:g}, got {value!r}")
        return None
    return value
