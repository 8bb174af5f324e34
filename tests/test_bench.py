"""bench/'s pure helpers: SPEC §15's verdicts and the stream client's summary."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(name: str) -> ModuleType:
    """bench/<name>.py by path, under its own name: bench/ never goes on sys.path (its
    websocket.py would shadow the library for the rest of the worker)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


run = load("run")
sse_client = load("sse_client")


def results(gateway_net_p50: float, rig_fails_at: int | None, gw_held: int) -> dict[str, Any]:
    def ttft(net50: float) -> dict[str, Any]:
        return {"ttft_net_ms": {"p50": net50, "p99": net50 + 0.1}, "delay_ms": {"p99": 0.3}}

    rate = {"rps_per_core": 1000.0, "p99_ms": 0.2}
    return {
        "9_first_token": {
            "direct": ttft(0.2),
            "nginx": ttft(0.25),
            "gateway": ttft(gateway_net_p50),
        },
        "2_nonstream_c1": {t: {"p99_ms": 0.1 + i * 0.1} for i, t in enumerate(run.TARGETS)},
        "1_nonstream_c64": {"nginx": rate, "gateway": {"rps_per_core": 300.0}},
        "3_stream_c64": {"nginx": rate, "gateway": {"rps_per_core": 200.0}},
        "10_rungs": {
            "direct": {"held": 1024, "failed_at": rig_fails_at},
            "gateway": {"held": gw_held, "failed_at": None if gw_held == 2048 else gw_held * 2},
        },
    }


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {row["target"]: (row["gateway"], row["met"]) for row in rows}


def test_added_is_the_proxy_minus_direct_at_the_same_percentile() -> None:
    got = verdicts(run.spec15(results(0.3, None, 2048)))
    assert got["added TTFT p50 ms (c1)"] == (0.1, True)
    assert got["added TTFT p99 ms (c1)"] == (0.1, True)
    assert got["added non-stream p99 ms (c1)"] == (0.2, True)
    assert got["non-stream req/s per core vs nginx"] == (0.3, True)
    assert got["stream req/s per core vs nginx"] == (0.2, False)


def test_a_target_over_its_goal_is_not_met() -> None:
    got = verdicts(run.spec15(results(0.5, None, 2048)))
    assert got["added TTFT p50 ms (c1)"] == (0.3, False)


def test_streams_short_of_the_goal_where_direct_fails_too_are_the_rigs_limit() -> None:
    rows = run.spec15(results(0.3, 1024, 512))
    row = next(r for r in rows if r["target"].startswith("paced"))
    assert row["met"] is None and "rig-bound" in row["note"]
    rows = run.spec15(results(0.3, 2048, 256))  # the gateway fails before direct does
    row = next(r for r in rows if r["target"].startswith("paced"))
    assert row["met"] is False


def stream(stamps: list[tuple[int, int]], sent: int = 0, read: int = 0) -> Any:
    s = sse_client.Stream(b"", None, reuse=True)  # type: ignore[arg-type]
    s.stamps, s.sent_ns, s.read_ns, s.done_seen = stamps, sent, read, True
    s.first_ns = stamps[0][1]
    return s


def test_summary_ttft_net_of_the_upstream_and_late_frames_and_gaps() -> None:
    plan = sse_client.Plan(1, "m", 1, 1, 20, 3, 0.0, role=True)
    ms = 1_000_000
    # Sent at 0, read upstream at 0.1 ms, first content written at 20.1 ms, in at 20.3 ms.
    ok = stream([(20_100_000, 20_300_000), (40 * ms, 40 * ms + 200_000), (60 * ms, 60_300_000)],
                sent=0, read=100_000)  # fmt: skip
    got = sse_client.summarize(plan, [ok], 1.0)
    assert got["ttft_ms"]["p50"] == 20.3
    assert got["ttft_net_ms"]["p50"] == 0.3  # 20.3 less the upstream's own 20.0 ms
    assert got["held"] and got["late_frames"] == 0
    late = stream([(0, 150 * ms), (20 * ms, 400 * ms), (40 * ms, 401 * ms)])
    got = sse_client.summarize(plan, [late], 1.0)
    assert got["late_frames"] == 3 and got["long_gaps"] == 1 and not got["held"]
    assert got["gap_ms"]["max"] == 250.0


def test_ab_medians_per_tree_and_held_only_when_every_round_held() -> None:
    kept = list(sys.path)
    try:
        ab = load("ab")  # it puts bench/ on sys.path for its own imports
    finally:
        sys.path[:] = kept

    rounds = {
        "new": [{"added_ttft_p50_ms": 0.7, "rung_1024_held": True},
                {"added_ttft_p50_ms": 0.5, "rung_1024_held": True},
                {"added_ttft_p50_ms": 0.9, "rung_1024_held": False}],
        "old": [{"added_ttft_p50_ms": 0.8, "rung_1024_held": True}],
    }  # fmt: skip
    assert ab.medians(rounds) == {
        "new": {"added_ttft_p50_ms": 0.7, "rung_1024_held": False},
        "old": {"added_ttft_p50_ms": 0.8, "rung_1024_held": True},
    }
