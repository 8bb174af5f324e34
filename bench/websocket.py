"""Per-turn overhead of Codex's WebSocket mode against plain SSE (issue 22's figure).

One `gateway serve` (a subprocess) in front of the scripted Responses upstream of
tests/agents; N text turns over one WebSocket, then N `POST /v1/responses` streams over
one keep-alive HTTP connection, then N streams straight to the upstream; each turn
timed from its send to its `response.completed`. Prints p50/mean per turn and what the
gateway adds over the direct stream, each way.

    .venv/bin/python bench/websocket.py [--turns 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.agents.harness import CODEX_MODEL, KEY, served_gateway  # noqa: E402
from tests.agents.loopback import LoopThread  # noqa: E402
from tests.agents.scripted import ScriptedUpstream  # noqa: E402

BODY = {"model": CODEX_MODEL, "input": "say something short", "store": False}


def over_sse(client: httpx.Client, url: str, key: str, turns: int) -> list[float]:
    out = []
    for _ in range(turns):
        t0 = time.perf_counter()
        with client.stream("POST", url, json={**BODY, "stream": True},
                           headers={"authorization": f"Bearer {key}"}) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data:") and '"response.completed"' in line:
                    break
        out.append(time.perf_counter() - t0)
    return out


def over_socket(url: str, turns: int) -> list[float]:
    out = []
    with connect(url, additional_headers={"authorization": f"Bearer {KEY}"}) as ws:
        for _ in range(turns):
            t0 = time.perf_counter()
            ws.send(json.dumps({"type": "response.create", **BODY}))
            while json.loads(ws.recv(timeout=10))["type"] != "response.completed":
                pass
            out.append(time.perf_counter() - t0)
    return out


def line(label: str, times: list[float], base: list[float] | None = None) -> None:
    p50, mean = statistics.median(times) * 1000, statistics.fmean(times) * 1000
    text = f"{label:<34} p50 {p50:7.3f} ms  mean {mean:7.3f} ms"
    if base is not None:
        text += f"  added p50 {p50 - statistics.median(base) * 1000:+.3f} ms"
    print(text, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=300)
    args = parser.parse_args()
    loop = LoopThread()
    try:
        upstream = ScriptedUpstream(loop)
        with (
            tempfile.TemporaryDirectory(prefix="bench-ws-") as name,
            served_gateway(Path(name), upstream.url) as gw,
            httpx.Client(timeout=10) as client,
        ):
            print(f"{args.turns} text turns each way; the gateway on port {gw.port}", flush=True)
            over_sse(client, f"{upstream.url}/v1/responses", "x", 20)  # warm both
            direct = over_sse(client, f"{upstream.url}/v1/responses", "x", args.turns)
            sse = over_sse(client, f"{gw.url}/v1/responses", KEY, args.turns)
            socket = over_socket(f"ws://127.0.0.1:{gw.port}/v1/responses", args.turns)
            line("direct SSE (the upstream)", direct)
            line("through the gateway, SSE", sse, direct)
            line("through the gateway, WebSocket", socket, direct)
    finally:
        loop.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
