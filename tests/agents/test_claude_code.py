"""Claude Code (`claude -p`) against the scripted Messages upstream, directly and through
`gateway serve`: a text turn and a Bash round trip each way, the same requests upstream
(issue 22)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agents.harness import (
    KEY,
    AgentRun,
    claude_argv,
    claude_env,
    run_agent,
    served_gateway,
)
from tests.agents.loopback import ProxySink
from tests.agents.scripted import (
    FINAL_PREFIX,
    TEXT_ANSWER,
    TOOL_OUTPUT,
    TOOL_TRIGGER,
    ScriptedUpstream,
    Seen,
)

pytestmark = pytest.mark.agents

PROMPTS = {
    "text": "Say hello.",
    "tool": f"{TOOL_TRIGGER}: run the shell command you are given and report its output.",
}
ROUTES = ("direct", "gateway")


@dataclass
class Outcome:
    run: AgentRun
    requests: list[Seen]  # what the upstream got during the run
    access: list[dict[str, Any]]  # the gateway's access lines for the run (none direct)

    def result(self) -> dict[str, Any]:
        results = [e for e in self.run.events if e.get("type") == "result"]
        assert results, self.run.explain()
        return results[-1]


def claude(base_url: str, api_key: str, prompt: str, folder: Path, sink: ProxySink) -> AgentRun:
    home, work = folder / "home", folder / "work"
    home.mkdir(parents=True)
    work.mkdir()
    return run_agent(claude_argv(prompt), claude_env(home, sink.url, base_url, api_key), work)


@pytest.fixture(scope="module")
def outcomes(
    installed: None, scripted: ScriptedUpstream, sink: ProxySink, folder: Path
) -> Iterator[dict[tuple[str, str], Outcome]]:
    """Every (route, turn) run once for the module: the agent's startup is the cost."""
    done: dict[tuple[str, str], Outcome] = {}
    for turn, prompt in PROMPTS.items():
        scripted.forget()
        run = claude(scripted.url, "sk-direct", prompt, folder / f"direct-{turn}", sink)
        done["direct", turn] = Outcome(run, list(scripted.requests), [])
    gw_folder = folder / "gateway"
    gw_folder.mkdir()
    with served_gateway(gw_folder, scripted.url) as gw:
        for turn, prompt in PROMPTS.items():
            scripted.forget()
            seen = len(gw.access())
            run = claude(gw.url, KEY, prompt, folder / f"gateway-{turn}", sink)
            requests = list(scripted.requests)
            access = gw.wait_access(seen + len(requests))[seen:]
            done["gateway", turn] = Outcome(run, requests, access)
    yield done


def shape(seen: Seen) -> tuple[Any, ...]:
    """What must be the same direct and through the gateway: the method and path, the
    model, streaming, how many messages, and whether a tool result is among them. (Not
    the query: Claude Code's `?beta=true` is not forwarded, as no POST's query is.)"""
    body = seen.json() or {}
    messages = body.get("messages") or []
    results = [
        block
        for message in messages
        if isinstance(message.get("content"), list)
        for block in message["content"]
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]
    return (seen.method, seen.path, body.get("model"), body.get("stream"),
            len(messages), bool(results))  # fmt: skip


@pytest.mark.parametrize("route", ROUTES)
def test_text_turn(outcomes: dict[tuple[str, str], Outcome], route: str) -> None:
    outcome = outcomes[route, "text"]
    assert outcome.run.returncode == 0, outcome.run.explain()
    assert outcome.result()["result"] == TEXT_ANSWER
    assert outcome.result()["is_error"] is False


@pytest.mark.parametrize("route", ROUTES)
def test_bash_round_trip(outcomes: dict[tuple[str, str], Outcome], route: str) -> None:
    outcome = outcomes[route, "tool"]
    assert outcome.run.returncode == 0, outcome.run.explain()
    # The tool ran: its output ("ran-42", not in the command) came back to the agent...
    ran = [e["tool_use_result"] for e in outcome.run.events if e.get("tool_use_result")]
    assert [r.get("stdout") for r in ran] == [TOOL_OUTPUT], outcome.run.explain()
    # ...went upstream in a tool_result, and the final answer quotes it.
    assert TOOL_OUTPUT in outcome.requests[-1].body.decode()
    assert outcome.result()["result"] == FINAL_PREFIX + TOOL_OUTPUT
    assert outcome.result()["num_turns"] == 2


@pytest.mark.parametrize("turn", PROMPTS)
def test_same_requests_direct_and_through_the_gateway(
    outcomes: dict[tuple[str, str], Outcome], turn: str
) -> None:
    direct = [shape(seen) for seen in outcomes["direct", turn].requests]
    through = [shape(seen) for seen in outcomes["gateway", turn].requests]
    assert direct and through == direct
    if turn == "tool":
        assert [s[-1] for s in through] == [False, True]  # the tool result, second
    # Claude Code's own headers reach the upstream as it sent them.
    for name in ("anthropic-beta", "anthropic-version", "x-claude-code-session-id"):
        sent = {seen.headers.get(name) is not None for seen in outcomes["gateway", turn].requests}
        assert sent == {True}, name


@pytest.mark.parametrize("turn", PROMPTS)
def test_access_log_has_claude_codes_session_id(
    outcomes: dict[tuple[str, str], Outcome], turn: str
) -> None:
    outcome = outcomes["gateway", turn]
    session = outcome.result()["session_id"]
    assert session
    assert [r.headers.get("x-claude-code-session-id") for r in outcome.requests] == [session] * len(
        outcome.requests
    )
    assert len(outcome.access) == len(outcome.requests)
    assert [line.get("session_id") for line in outcome.access] == [session] * len(outcome.access)


def test_nothing_leaves_the_machine(
    outcomes: dict[tuple[str, str], Outcome], sink: ProxySink
) -> None:
    """Every connection past loopback goes through the proxy sink, which forwards none."""
    assert sink.attempts == []
