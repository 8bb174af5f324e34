"""gateway/telemetry/metrics.py on its own: the text format (read back by prometheus-client's own
parser) and how a scrape adds up other workers' files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry.metrics import DIR_ENV, RENDER_CHUNK, Metrics, snapshot_lines
from tests.conftest import GatewayFactory

ECHO_ROUTES = "providers:\n  echo:\n    base_url: builtin:echo\nmodels:\n  echo:\n    providers: [{provider: echo}]\n"


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(m.render().decode())
        for s in family.samples
    }


def test_counters_gauges_and_label_escaping_read_back_exactly() -> None:
    m = Metrics()
    m.requests('we"ird\\slug\n', "p", "200", "false").inc()
    m.requests('we"ird\\slug\n', "p", "200", "false").inc()
    m.tokens("svc", "prompt").inc(1234)
    m.in_flight.inc()
    m.in_flight.inc()
    m.in_flight.dec()
    m.provider_up("p", "m").set(0)
    got = samples(m)
    labels = (("provider", "p"), ("slug", 'we"ird\\slug\n'), ("status", "200"), ("stream", "false"))
    assert got[("gateway_requests_total", labels)] == 2
    assert got[("gateway_tokens_total", (("key", "svc"), ("kind", "prompt")))] == 1234
    assert got[("gateway_in_flight_requests", ())] == 1
    assert got[("gateway_provider_up", (("model", "m"), ("provider", "p")))] == 0
    text = m.render().decode()
    assert "# TYPE gateway_requests counter" in text
    assert "# TYPE gateway_in_flight_requests gauge" in text


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    m = Metrics()
    h = m.duration("s")
    for value in (0.005, 0.006, 0.3, 500.0):  # on a bound, between, mid, past the last
        h.observe(value)
    got = samples(m)

    def bucket(le: str) -> float:
        return got[("gateway_request_duration_seconds_bucket", (("le", le), ("slug", "s")))]

    assert bucket("0.005") == 1  # le: a value equal to the bound counts in it
    assert bucket("0.01") == 2
    assert bucket("0.25") == 2
    assert bucket("0.5") == 3
    assert bucket("300.0") == 3
    assert bucket("+Inf") == 4
    assert got[("gateway_request_duration_seconds_count", (("slug", "s"),))] == 4
    assert got[("gateway_request_duration_seconds_sum", (("slug", "s"),))] == pytest.approx(500.311)


def test_scrape_adds_other_workers_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    # A worker that has exited: its counters and histograms still count, its gauges not.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    other = Metrics()
    other.requests("m", "p", "200", "false").inc(5)
    other.duration("m").observe(0.02)
    other.in_flight.inc(7)
    other.provider_up("p", "m").set(0)
    snapshot = snapshot_lines([(f.name, f.children) for f in other.families])
    (tmp_path / f"metrics-{dead_pid}.json").write_bytes(snapshot)
    # A worker still running (this test's parent process stands in for it).
    live = Metrics()
    live.requests("m", "p", "200", "false").inc(2)
    live.in_flight.inc(3)
    live.provider_up("p", "m").set(1)
    live_snapshot = snapshot_lines([(f.name, f.children) for f in live.families])
    (tmp_path / f"metrics-{os.getppid()}.json").write_bytes(live_snapshot)
    (tmp_path / "metrics-999999999.json").write_bytes(b"{half a fi")  # unreadable: skipped

    mine = Metrics()
    mine.requests("m", "p", "200", "false").inc()
    mine.in_flight.inc()
    mine.provider_up("p", "m").set(1)
    got = samples(mine)
    req = (("provider", "p"), ("slug", "m"), ("status", "200"), ("stream", "false"))
    assert got[("gateway_requests_total", req)] == 5 + 2 + 1
    assert got[("gateway_request_duration_seconds_count", (("slug", "m"),))] == 1
    assert got[("gateway_in_flight_requests", ())] == 3 + 1  # the exited worker's 7 is gone
    # min across running workers: the exited worker's 0 no longer holds it down
    assert got[("gateway_provider_up", (("model", "m"), ("provider", "p")))] == 1


def test_dump_writes_this_workers_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    m = Metrics()
    m.attempts("p").inc(4)
    m.dump()
    path = tmp_path / f"metrics-{os.getpid()}.json"
    # Written from a thread: wait (bounded) for the file.
    for _ in range(500):
        if path.exists():
            break
        time.sleep(0.01)
    data = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert ["gateway_upstream_attempts", [["p", 4.0]]] in data
    assert not list(tmp_path.glob("*.tmp"))
    # Without the directory (one worker) nothing is written anywhere.
    monkeypatch.delenv(DIR_ENV)
    Metrics().dump()
    assert len(list(tmp_path.iterdir())) == 1


def test_a_scrape_comes_in_pieces_that_add_up_to_the_whole() -> None:
    m = Metrics()
    for i in range(1000):
        m.tokens(f"k{i}", "prompt").inc(i)
    pieces = list(m.render_chunks(series_per_chunk=100))
    assert len(pieces) >= 10
    assert b"".join(pieces) == m.render()
    tokens = [k for k in samples(m) if k[0] == "gateway_tokens_total"]
    assert len(tokens) == 1000


def test_forgotten_keys_leave_no_series_and_no_cached_labels() -> None:
    m = Metrics()
    m.tokens("gone", "prompt").inc(3)
    m.tokens("kept", "prompt").inc(4)
    m.render()  # fills the label cache
    m.forget_keys({"gone"})
    assert set(m.tokens.label_text) == {("kept", "prompt")}
    assert b'key="gone"' not in m.render()


async def test_a_large_scrape_hands_the_loop_back_between_pieces(
    gateway: GatewayFactory, client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 100k keys' series a scrape is many pieces, and other tasks run between them
    (a ticker task counts its turns; each piece notes the count when it is made)."""
    gw = await gateway(ECHO_ROUTES)
    metrics = gw.runtime.metrics
    for i in range(100_000):
        metrics.tokens(f"key-{i}", "prompt").inc(1)
    ticks = 0
    seen: list[int] = []
    real = metrics.render_chunks

    def spy(*args: Any, **kwargs: Any) -> Iterator[bytes]:
        for piece in real(*args, **kwargs):
            seen.append(ticks)
            yield piece

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    monkeypatch.setattr(metrics, "render_chunks", spy)
    task = asyncio.ensure_future(ticker())
    try:
        r = await asyncio.wait_for(client.get(f"{gw.url}/metrics"), 30)
    finally:
        task.cancel()
    assert r.status_code == 200 and b'key="key-99999"' in r.content
    assert len(seen) > 10
    assert seen[-1] - seen[0] >= len(seen) - 2  # the loop turned between the pieces


def test_workers_files_are_lines_merged_a_piece_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's 3 x RENDER_CHUNK series come as three lines; the scrape merges
    them with an empty piece (a turn of the loop) after each, and sums what both have."""
    monkeypatch.setenv(DIR_ENV, str(tmp_path))
    other = Metrics()
    for i in range(3 * RENDER_CHUNK):
        other.tokens(f"k{i}", "prompt").inc(2)
    data = snapshot_lines([(f.name, f.children) for f in other.families])
    tokens_lines = [ln for ln in data.splitlines() if ln.startswith(b'["gateway_tokens"')]
    assert len(tokens_lines) == 3
    (tmp_path / f"metrics-{os.getppid()}.json").write_bytes(data)
    mine = Metrics()
    mine.tokens("k0", "prompt").inc(1)
    pieces = list(mine.render_chunks())
    assert pieces[:3] == [b"", b"", b""]  # one per line of the other's tokens
    got = samples(mine)
    assert got[("gateway_tokens_total", (("key", "k0"), ("kind", "prompt")))] == 3
    assert got[("gateway_tokens_total", (("key", "k5"), ("kind", "prompt")))] == 2


def test_a_key_that_leaves_and_comes_back_counts_in_exported_series() -> None:
    """Metrics.served keeps bundles of children; forgetting a key drops them too, so a
    key re-added by a reload counts in series a scrape shows."""
    m = Metrics()
    series = m.served("team", "m", "p", 200, False)
    series.prompt = m.tokens("team", "prompt")
    series.prompt.inc(5)
    m.forget_keys({"team"})
    assert ("team", "prompt") not in m.tokens.children
    again = m.served("team", "m", "p", 200, False)
    assert again is not series and again.prompt is None  # fetched afresh from the family
