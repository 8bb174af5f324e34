"""A/B of two gateway trees on SPEC §15's paced-stream figures, rounds alternating.

One run of `make bench` cannot tell a change of a tenth of a millisecond on this kind of
VM: two runs of the same code minutes apart differ by more (added per-frame p99 0.81 and
0.31 ms). This starts bench/run.py's upstreams once, then for each round and each tree
(the working tree, then REV, archived with `git archive` and imported through
PYTHONPATH as bench/instructions.py does) starts one gateway on the proxy core and
measures scenario 9 (40 paced streams x 64 deltas, 20 ms apart, one keep-alive
connection; direct measured in the same round, so "added" is the gateway minus direct at
the same percentile) and then 1,024 paced streams at once (held or not, frame delay p99,
the gateway's CPU). It prints each round, then the median of the rounds per tree.

Usage: bench/ab.py --against REV [--rounds N]
Results: bench/results/ab-<UTC time>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import instructions  # found through the sys.path entry above
import run

STREAMS, RUNG = 40, 1024


def measure(bench: run.Bench, tree: instructions.Tree, log: Path) -> dict[str, Any]:
    """One gateway of `tree`: scenario 9 against direct, then the 1,024 rung."""
    os.environ["PYTHONPATH"] = str(tree.path)  # run.gateway_env keeps a caller's
    port = bench.ports.gateway
    proc = bench.start_gateway(port, log)
    try:
        run.wait_answered(port, proc, log, time.monotonic() + 30)
        got: dict[str, dict[str, Any]] = {}
        argv = ["--role", "--keep-alive"]
        for target in ("direct", "gateway"):
            paced = bench.ports.of(target, "paced")
            warm = run.stream_client(bench, paced, 2, 1, run.PACED_INTERVAL_MS, 4, 0.0, argv)
            run.client_result(bench, warm, 60)
            client = run.stream_client(
                bench, paced, STREAMS, 1, run.PACED_INTERVAL_MS, run.PACED_EVENTS, 0.0, argv
            )
            got[target] = run.client_result(bench, client, STREAMS * run.PACED_EVENTS * 0.02 + 60)
        pids = [proc.pid, *run.children(proc.pid)]
        cpu, began = run.cpu_seconds(pids), time.monotonic()
        client = run.stream_client(
            bench, bench.ports.of("gateway", "paced"), RUNG, RUNG,
            run.PACED_INTERVAL_MS, run.PACED_EVENTS, 1.0, ["--role"],
        )  # fmt: skip
        rung = run.client_result(bench, client, run.PACED_EVENTS * 0.02 + 90)
        cpu_percent = 100 * (run.cpu_seconds(pids) - cpu) / (time.monotonic() - began)
    finally:
        bench.procs.stop(proc)

    def added(path: str, q: str) -> float:
        return round(got["gateway"][path][q] - got["direct"][path][q], 3)

    return {
        "added_ttft_p50_ms": added("ttft_net_ms", "p50"),
        "added_ttft_p99_ms": added("ttft_net_ms", "p99"),
        "added_frame_p50_ms": added("delay_ms", "p50"),
        "added_frame_p99_ms": added("delay_ms", "p99"),
        f"rung_{RUNG}_held": rung["held"],
        f"rung_{RUNG}_frame_p99_ms": round(rung["delay_ms"]["p99"], 2),
        f"rung_{RUNG}_cpu_percent": round(cpu_percent, 1),
    }


def medians(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per tree, the median of each figure over the rounds; held only if every round held."""
    out: dict[str, dict[str, Any]] = {}
    for label, got in rounds.items():
        out[label] = {
            key: all(r[key] for r in got)
            if isinstance(got[0][key], bool)
            else statistics.median(r[key] for r in got)
            for key in got[0]
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description="A/B of two gateway trees, §15 paced streams")
    parser.add_argument("--against", required=True, metavar="REV", help="the other tree")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per tree (default 2)")
    args = parser.parse_args(sys.argv[1:] or None)
    cores = run.pick_cores()
    if cores is not None:
        os.sched_setaffinity(0, {cores[1]})
    procs = run.Processes(cores)
    rounds: dict[str, list[dict[str, Any]]] = {}
    try:
        with run.interrupt_on_sigterm(), tempfile.TemporaryDirectory(prefix="ab-") as tmp:
            folder = Path(tmp)
            folder.chmod(0o755)
            try:
                trees = [
                    instructions.working_tree(),
                    instructions.revision_tree(args.against, folder),
                ]
                tools = run.ensure_tools()
                bench = run.Bench(folder, procs, tools, run.Ports.pick(), False, 10, 5)
                bench.write_gateway_files()
                bench.start_upstream()
                run.progress(
                    f"upstreams up; {args.rounds} rounds of {', '.join(t.label for t in trees)}"
                )
                for i in range(args.rounds):
                    for tree in trees:
                        got = measure(bench, tree, folder / f"gateway-{tree.key}-{i}.log")
                        rounds.setdefault(tree.label, []).append(got)
                        run.progress(f"round {i + 1} · {tree.label}: {got}")
            finally:
                procs.stop_all()
    except run.BenchError as exc:
        print(f"ab: error: {exc}", file=sys.stderr)
        return 1
    summary = medians(rounds)
    for label, values in summary.items():
        print(f"median of {args.rounds} · {label}: {values}")
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = run.RESULTS / f"ab-{stamp}.json"
    path.write_text(json.dumps({"rounds": rounds, "medians": summary}, indent=2) + "\n")
    print(f"results: {path.relative_to(run.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
