"""The real coding agents as test clients (`make test-agents`; issue 22).

Their tests carry the `agents` marker and run only when the command line selects it
(`-m agents`, as the Makefile does): plain `make test` deselects them here, the way its
`-m 'not llama'` leaves out tests/e2e/test_llama.py, since they need the agents that
`make test-agents` installs into build/agents."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agents.harness import agent
from tests.agents.loopback import LoopThread, ProxySink
from tests.agents.scripted import ScriptedUpstream

MARKER = "agents"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}: runs the real Claude Code and Codex (make test-agents)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if MARKER in (config.option.markexpr or ""):
        return  # the command line chose: -m agents runs them, -m 'not agents' drops them
    dropped = [item for item in items if item.get_closest_marker(MARKER)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not item.get_closest_marker(MARKER)]


@pytest.fixture(scope="session")
def installed() -> None:
    for name in ("claude", "codex", "node"):
        try:
            agent(name)
        except FileNotFoundError as exc:
            pytest.fail(f"{exc}", pytrace=False)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def scripted(loop: LoopThread) -> ScriptedUpstream:
    return ScriptedUpstream(loop)


@pytest.fixture(scope="module")
def sink(loop: LoopThread) -> ProxySink:
    return ProxySink(loop)


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    """A temporary folder for a module's runs, removed after it."""
    with tempfile.TemporaryDirectory(prefix="gateway-agents-") as name:
        yield Path(name)
