"""Both YAML files -> one frozen Config snapshot, or every problem found in them."""

from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass
from pathlib import Path

from gateway.config.keys import Keys, parse_keys
from gateway.config.routes import Routes, parse_routes
from gateway.config.source import Problem, Source
from gateway.config.yamlsrc import parse_yaml, release


@dataclass(frozen=True, slots=True)
class Config:
    routes: Routes
    keys: Keys
    version: str  # a hash of both files' bytes, so an operator can see a reload took


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def load_config(
    routes_path: str, keys_path: str, keys_required: bool = False, stepwise: bool = False
) -> Config:
    """Read and validate both files; raise ConfigError listing every problem.
    `stepwise`: parsing in a thread beside a serving event loop (yamlsrc.parse_yaml)."""
    # A config of 10k models and keys is a million objects, nearly none in a cycle: the
    # cyclic collector would walk them again and again while they are made (60 % of the
    # time to load them). It runs as it did before once the loading is done.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _load(routes_path, keys_path, keys_required, stepwise)
    finally:
        if collecting:
            gc.enable()


def _load(routes_path: str, keys_path: str, keys_required: bool, stepwise: bool) -> Config:
    problems: list[Problem] = []
    digest = hashlib.sha256()

    routes_src = Source(routes_path)
    try:
        routes_bytes = Path(routes_path).read_bytes()
    except OSError as exc:
        problems.append(Problem(routes_path, 1, f"cannot read routes file: {exc.strerror}"))
        routes_bytes = b""
    digest.update(routes_bytes)
    raw = parse_yaml(_decode(routes_bytes, routes_src), routes_src, stepwise)
    routes = parse_routes(raw, routes_src)
    if stepwise:
        release(raw)  # a piece at a time: the loop's thread gets the lock between pieces
    del raw  # freed before the keys are read (at start-up in one go: nothing waits)
    problems += routes_src.problems

    keys_src = Source(keys_path)
    keys_bytes = b""
    try:
        keys_bytes = Path(keys_path).read_bytes()
    except FileNotFoundError:
        if keys_required:
            problems.append(Problem(keys_path, 1, "keys file does not exist"))
    except OSError as exc:
        problems.append(Problem(keys_path, 1, f"cannot read keys file: {exc.strerror}"))
    digest.update(b"\0")
    digest.update(keys_bytes)
    raw = parse_yaml(_decode(keys_bytes, keys_src), keys_src, stepwise)
    keys = parse_keys(raw, keys_src)
    if stepwise:
        release(raw)  # a piece at a time: the loop's thread gets the lock between pieces
    problems += keys_src.problems

    if problems:
        raise ConfigError(problems)
    return Config(routes=routes, keys=keys, version=digest.hexdigest()[:16])


def _decode(raw: bytes, src: Source) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        src.problem(raw[: exc.start].count(b"\n") + 1, "file is not valid UTF-8")
        return ""
