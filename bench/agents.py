"""Codex's run time and WebSocket handshakes through the gateway (issue 22's before/after).

Runs the same `codex exec` task (a shell round trip: two model turns) against the
scripted Responses upstream of tests/agents, N times directly and N times through
`gateway serve`, a counting forwarder in front of the gateway; prints each run's wall
time and handshakes, then the means. Needs `make test-agents` once (it installs Codex).

    .venv/bin/python bench/agents.py [--runs 3] [--against REV] [--no-websockets]

--against REV runs that revision's gateway/ (from `git archive`) instead of the work
tree's, so one machine measures before and after.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.agents.harness import (  # noqa: E402 (after the path is set)
    KEY,
    AgentRun,
    codex_argv,
    codex_env,
    run_agent,
    served_gateway,
)
from tests.agents.loopback import CountingForwarder, LoopThread, ProxySink  # noqa: E402
from tests.agents.scripted import (  # noqa: E402
    FINAL_PREFIX,
    TOOL_OUTPUT,
    TOOL_TRIGGER,
    ScriptedUpstream,
)

PROMPT = f"{TOOL_TRIGGER}: run the shell command you are given and report its output."


def export(rev: str, into: Path) -> Path:
    """`rev`'s gateway/ package, unpacked into `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "gateway"],
                             check=True, capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def one_run(base_url: str, folder: Path, sink: ProxySink, websockets: bool) -> AgentRun:
    home, work = folder / "home", folder / "work"
    home.mkdir(parents=True)
    work.mkdir()
    env = codex_env(home, sink.url, base_url, KEY, websockets=websockets)
    run = run_agent(codex_argv(PROMPT), env, work)
    answered = any(FINAL_PREFIX + TOOL_OUTPUT in line for line in run.stdout.splitlines())
    if run.returncode != 0 or not answered:
        raise SystemExit(f"codex did not finish the task:\n{run.explain()}")
    return run


def report(label: str, seconds: list[float], handshakes: list[int], requests: list[int]) -> None:
    for i, (s, h, r) in enumerate(zip(seconds, handshakes, requests, strict=True), 1):
        print(f"  {label} run {i}: {s:6.2f} s  {h} WebSocket handshake(s)  {r} request(s) upstream")
    print(f"{label}: mean {statistics.mean(seconds):.2f} s over {len(seconds)} runs, "
          f"handshakes per run {handshakes}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--against", metavar="REV", help="run this revision's gateway/")
    parser.add_argument("--no-websockets", action="store_true",
                        help="the provider without supports_websockets (HTTP only)")  # fmt: skip
    args = parser.parse_args()
    websockets = not args.no_websockets
    loop = LoopThread()
    try:
        scripted, sink = ScriptedUpstream(loop), ProxySink(loop)
        with tempfile.TemporaryDirectory(prefix="bench-agents-") as name:
            folder = Path(name)
            src = export(args.against, folder / "src") if args.against else None
            print(f"codex exec, a shell round trip; supports_websockets = {str(websockets).lower()}; "
                  f"gateway: {args.against or 'work tree'}")  # fmt: skip
            seconds, handshakes, requests = [], [], []
            for i in range(args.runs):
                scripted.forget()
                run = one_run(f"{scripted.url}/v1", folder / f"direct-{i}", sink, websockets)
                seconds.append(run.seconds)
                handshakes.append(len(scripted.handshakes))
                requests.append(len(scripted.requests))
            report("direct (upstream answers the upgrade 426)", seconds, handshakes, requests)
            (folder / "gateway").mkdir()
            with served_gateway(folder / "gateway", scripted.url, src) as gw:
                front = CountingForwarder(loop, gw.port)
                seconds, handshakes, requests = [], [], []
                for i in range(args.runs):
                    scripted.forget()
                    before = len(front.handshakes)
                    run = one_run(f"{front.url}/v1", folder / f"gateway-{i}", sink, websockets)
                    seconds.append(run.seconds)
                    handshakes.append(len(front.handshakes) - before)
                    requests.append(len(scripted.requests))
                report("through the gateway", seconds, handshakes, requests)
        if sink.attempts:
            print(f"warning: the agents tried to reach past this machine: {sink.attempts}")
    finally:
        loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
