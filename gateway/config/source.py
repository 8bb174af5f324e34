"""One config file being read: its problems (each with a line), and the helpers the
parsers use to read a line-tracked tree (config/yamlsrc.py builds the trees)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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


def line_of(container: Any, key: str | int, default: int = 1) -> int:
    lines = getattr(container, "lines", None)
    if isinstance(lines, dict) and isinstance(key, str):
        line = lines.get(key)  # called for every entry of a big file: the usual case first
        return int(line if line is not None else getattr(container, "line", default))
    if isinstance(lines, list) and isinstance(key, int) and 0 <= key < len(lines):
        return int(lines[key])
    return int(getattr(container, "line", default))


def check_keys(src: Source, mapping: LineMap, allowed: frozenset[str], where: str) -> None:
    if mapping.keys() <= allowed:  # one set operation in C for the usual mapping
        return
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
