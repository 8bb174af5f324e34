"""Codex (`codex exec`) against the scripted Responses upstream, directly and through
`gateway serve`: a text turn and a shell round trip each way, the same requests upstream,
and how many WebSocket handshakes it makes on the way (issue 22).

The provider says `supports_websockets = true`, so Codex opens a WebSocket to
/v1/responses before each turn, as its built-in OpenAI provider always does. The scripted
upstream answers the handshake 426, after which Codex falls back to HTTP at once; the
gateway is watched through a counting forwarder in front of it.

Codex sends `store: false`. Over HTTP each request carries the whole conversation; over a
WebSocket a later turn sends only its new items and `previous_response_id`, which only the
open socket can resolve (OpenAI's WebSocket mode keeps that chain on the connection). The
scripted upstream, like OpenAI, resolves `previous_response_id` only for stored responses,
so a gateway that serves the WebSocket mode over an upstream's SSE must send the whole
conversation, and the requests upstream are then the same as direct."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.agents.harness import (
    KEY,
    AgentRun,
    codex_argv,
    codex_env,
    run_agent,
    served_gateway,
)
from tests.agents.loopback import CountingForwarder, LoopThread, ProxySink
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
    handshakes: int  # WebSocket handshakes: at the upstream direct, at the gateway through it
    access: list[dict[str, Any]]  # the gateway's access lines for the run (none direct)

    def items(self, kind: str) -> list[dict[str, Any]]:
        """The completed items of one type from `codex exec --json`."""
        return [
            e["item"] for e in self.run.events
            if e.get("type") == "item.completed" and e.get("item", {}).get("type") == kind
        ]  # fmt: skip

    def thread_id(self) -> str:
        started = [e for e in self.run.events if e.get("type") == "thread.started"]
        assert started, self.run.explain()
        return str(started[0]["thread_id"])


def codex(base_url: str, api_key: str, prompt: str, folder: Path, sink: ProxySink) -> AgentRun:
    home, work = folder / "home", folder / "work"
    home.mkdir(parents=True)
    work.mkdir()
    return run_agent(codex_argv(prompt), codex_env(home, sink.url, base_url, api_key), work)


@pytest.fixture(scope="module")
def outcomes(
    installed: None, loop: LoopThread, scripted: ScriptedUpstream, sink: ProxySink, folder: Path
) -> Iterator[dict[tuple[str, str], Outcome]]:
    """Every (route, turn) run once for the module: the agent's startup is the cost."""
    done: dict[tuple[str, str], Outcome] = {}
    for turn, prompt in PROMPTS.items():
        scripted.forget()
        run = codex(f"{scripted.url}/v1", "sk-direct", prompt, folder / f"direct-{turn}", sink)
        done["direct", turn] = Outcome(run, list(scripted.requests), len(scripted.handshakes), [])
    gw_folder = folder / "gateway"
    gw_folder.mkdir()
    with served_gateway(gw_folder, scripted.url) as gw:
        front = CountingForwarder(loop, gw.port)
        for turn, prompt in PROMPTS.items():
            scripted.forget()
            seen, shaken = len(gw.access()), len(front.handshakes)
            run = codex(f"{front.url}/v1", KEY, prompt, folder / f"gateway-{turn}", sink)
            requests = list(scripted.requests)
            access = gw.wait_access(seen + len(requests))[seen:]
            handshakes = len(front.handshakes) - shaken
            done["gateway", turn] = Outcome(run, requests, handshakes, access)
    yield done


def shape(seen: Seen) -> tuple[Any, ...]:
    """What must be the same direct and through the gateway: the method and path, the
    model, streaming, the input items' types (a function_call_output among them after
    the tool ran) and the tools offered."""
    body = seen.json() or {}
    items = body.get("input") or []
    kinds = [item.get("type") for item in items if isinstance(item, dict)]
    tools = [t.get("name") or t.get("type") for t in body.get("tools") or ()]
    return (seen.method, seen.path, body.get("model"), body.get("stream"), kinds, tools)


@pytest.mark.parametrize("route", ROUTES)
def test_text_turn(outcomes: dict[tuple[str, str], Outcome], route: str) -> None:
    outcome = outcomes[route, "text"]
    assert outcome.run.returncode == 0, outcome.run.explain()
    assert [m["text"] for m in outcome.items("agent_message")] == [TEXT_ANSWER]
    assert any(e.get("type") == "turn.completed" for e in outcome.run.events)


@pytest.mark.parametrize("route", ROUTES)
def test_shell_round_trip(outcomes: dict[tuple[str, str], Outcome], route: str) -> None:
    outcome = outcomes[route, "tool"]
    assert outcome.run.returncode == 0, outcome.run.explain()
    # The command ran in the sandbox and printed what only running it prints...
    [ran] = outcome.items("command_execution")
    assert ran["exit_code"] == 0 and ran["aggregated_output"].strip() == TOOL_OUTPUT, ran
    # ...its output went upstream in a function_call_output, and the answer quotes it.
    last = outcome.requests[-1].json()
    outputs = [i for i in last["input"] if i.get("type") == "function_call_output"]
    assert len(outputs) == 1 and TOOL_OUTPUT in json.dumps(outputs[0])
    assert [m["text"] for m in outcome.items("agent_message")] == [FINAL_PREFIX + TOOL_OUTPUT]


@pytest.mark.parametrize("turn", PROMPTS)
def test_same_requests_direct_and_through_the_gateway(
    outcomes: dict[tuple[str, str], Outcome], turn: str
) -> None:
    direct = [shape(seen) for seen in outcomes["direct", turn].requests]
    through = [shape(seen) for seen in outcomes["gateway", turn].requests]
    assert direct and through == direct
    if turn == "tool":
        assert ["function_call_output" in s[4] for s in through] == [False, True]
    assert {s[:4] for s in through} == {("POST", "/v1/responses", "gpt-test", True)}


@pytest.mark.parametrize("turn", PROMPTS)
def test_direct_codex_tries_websocket_once(
    outcomes: dict[tuple[str, str], Outcome], turn: str
) -> None:
    """The premise: with `supports_websockets` this custom provider is tried over a
    WebSocket first, and a 426 sends Codex to HTTP after one handshake."""
    assert outcomes["direct", turn].handshakes == 1


@pytest.mark.parametrize("turn", PROMPTS)
def test_at_most_one_websocket_handshake_through_the_gateway(
    outcomes: dict[tuple[str, str], Outcome], turn: str
) -> None:
    outcome = outcomes["gateway", turn]
    assert outcome.handshakes <= 1, (
        f"{outcome.handshakes} handshakes in {outcome.run.seconds:.1f} s"
    )


@pytest.mark.parametrize("turn", PROMPTS)
def test_access_log_has_codexs_session_id(
    outcomes: dict[tuple[str, str], Outcome], turn: str
) -> None:
    outcome = outcomes["gateway", turn]
    thread = outcome.thread_id()
    assert [r.headers.get("session-id") for r in outcome.requests] == [thread] * len(
        outcome.requests
    )
    served = [line for line in outcome.access if line.get("path") == "/responses"]
    assert len(served) == len(outcome.requests)
    assert [line.get("session_id") for line in served] == [thread] * len(served)


def test_nothing_leaves_the_machine(
    outcomes: dict[tuple[str, str], Outcome], sink: ProxySink
) -> None:
    """Every connection past loopback goes through the proxy sink, which forwards none."""
    assert sink.attempts == []
