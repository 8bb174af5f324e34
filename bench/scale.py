"""`make bench-scale`: what the gateway costs as the catalog, the keys and what clients
choose grow (SPEC §8). Everything runs on 127.0.0.1 against the built-in echo upstream;
every process is stopped by its own pid.

Targets (SPEC §8 and §15), each the median of three runs:
- 10,000 models + 10,000 keys with limits: ready (process start to the first answered
  request) <= 1 s, `gateway check` <= 1 s; 100,000 + 100,000: each <= 5 s.

Curves:
- config size: 10 -> 100k models and keys: time to the first answered request, idle RSS,
  and the longest /healthz answer while a SIGHUP reload of the same size runs (the event
  loop's stall), plus the supervisor's RSS with --workers 2;
- wildcard slug churn: N requests each with a new slug under `w/*`: RSS growth and the
  size of /metrics;
- request body size, 1 KB -> 8 MB: the gateway's peak RSS over its RSS before the
  request (VmHWM after /proc/PID/clear_refs), in bodies;
- syscalls per relayed stream event (`strace -f -c`, less a run without streams).

Usage: bench/scale.py [--quick] [--targets]   (--targets: the targets alone, ~2 min)
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: processes, ports, progress

progress = run.progress


def routes_text(models: int, wildcards: int = 0, extra: str = "") -> str:
    lines = ["providers:", "  echo:", "    base_url: builtin:echo", "models:"]
    lines += [f"  m{i}:\n    providers: [{{provider: echo, model: up{i}}}]" for i in range(models)]
    lines += [f'  "w{i}/*":\n    providers: [{{provider: echo}}]' for i in range(wildcards)]
    lines.append('  "w/*":\n    providers: [{provider: echo}]')
    return "\n".join(lines) + extra + "\n"


def keys_text(keys: int, limits: bool = False) -> str:
    if not keys:
        return ""
    lines = ["keys:"]
    extra = "\n    rpm: 600\n    tpm: 200000" if limits else ""
    for i in range(keys):
        digest = hashlib.sha256(f"sk-bench-{i}".encode()).hexdigest()
        lines.append(f"  - name: k{i}\n    sha256: {digest}{extra}")
    return "\n".join(lines) + "\n"


class Client:
    """One keep-alive connection, raw HTTP/1.1: little client-side noise in the figures."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, within: float) -> Client:
        deadline = time.monotonic() + within
        while True:
            try:
                return cls(*await asyncio.open_connection("127.0.0.1", port))
            except OSError:
                if time.monotonic() > deadline:
                    raise run.BenchError("the gateway did not start listening") from None
                await asyncio.sleep(0.01)

    async def request(self, method: str, path: str, body: bytes = b"", auth: str = "") -> bytes:
        # The gateway with no keys answers only requests addressed to its loopback name.
        head = f"{method} {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n"
        if auth:
            head += f"authorization: Bearer {auth}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 60)
        length = 0
        for line in raw.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
            elif line.lower() == b"transfer-encoding: chunked":
                return await self._chunked()
        return await self.reader.readexactly(length)

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                return b"".join(parts)
            parts.append(data[:-2])

    def close(self) -> None:
        self.writer.close()


async def config_point(procs: run.Processes, tmp: Path, models: int, keys: int) -> dict[str, Any]:
    routes, keyfile = tmp / "routes.yaml", tmp / "keys.yaml"
    routes.write_text(routes_text(models))
    keyfile.write_text(keys_text(keys))
    port = run.free_ports(1)[0]
    argv = [*run.gateway_command(), "serve", "--routes", str(routes), "--keys", str(keyfile)]
    argv += ["--port", str(port), "--log-level", "warning"]
    started = time.monotonic()
    proc = procs.start(argv, "proxy", log=tmp / "gateway.log")
    try:
        client = await Client.connect(port, 120)
        auth = "sk-bench-0" if keys else ""
        await client.request("GET", "/healthz", auth=auth)
        ready = time.monotonic() - started
        rss = run.rss_mib([proc.pid])
        routes.write_text(
            routes_text(models, extra="\n  extra:\n    providers: [{provider: echo}]")
        )
        before = json.loads(await client.request("GET", "/healthz"))["config_version"]
        proc.send_signal(signal.SIGHUP)
        worst = 0.0
        reloaded = time.monotonic() + 120
        while time.monotonic() < reloaded:
            t0 = time.perf_counter()
            answer = json.loads(await client.request("GET", "/healthz"))
            worst = max(worst, time.perf_counter() - t0)
            if answer["config_version"] != before:
                break
            await asyncio.sleep(0.002)
        client.close()
    finally:
        procs.stop(proc)
    point = {"models": models, "keys": keys, "ready_s": ready, "idle_rss_mib": rss}
    point["reload_worst_healthz_ms"] = worst * 1000
    progress(
        f"config {models:>7,} models {keys:>7,} keys: ready {ready:5.2f} s, idle RSS "
        f"{rss:6.1f} MiB, reload: longest /healthz {worst * 1000:6.1f} ms"
    )
    return point


# (models, keys with limits, target seconds for ready and for check)
TARGETS = ((10_000, 10_000, 1.0), (100_000, 100_000, 5.0))
RUNS = 3


async def ready_once(procs: run.Processes, routes: Path, keyfile: Path, log: Path) -> float:
    """Seconds from the process's start to the first answered request (/healthz with a
    key), polling the port every 2 ms."""
    port = run.free_ports(1)[0]
    argv = [*run.gateway_command(), "serve", "--routes", str(routes), "--keys", str(keyfile)]
    argv += ["--port", str(port), "--log-level", "warning"]
    started = time.monotonic()
    proc = procs.start(argv, "proxy", log=log)
    try:
        deadline = started + 120
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise run.BenchError(f"the gateway did not start:\n{run.tail(log)}") from None
                await asyncio.sleep(0.002)
        client = Client(reader, writer)
        answer = await client.request("GET", "/healthz", auth="sk-bench-0")
        ready = time.monotonic() - started
        client.close()
        if b"config_version" not in answer:
            raise run.BenchError(f"/healthz answered {answer[:200]!r}")
    finally:
        procs.stop(proc)
    return ready


def check_once(procs: run.Processes, routes: Path, keyfile: Path) -> float:
    argv = procs.argv([*run.gateway_command(), "check", "--routes", str(routes)], "proxy")
    argv += ["--keys", str(keyfile)]
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    took = time.monotonic() - started
    if done.returncode != 0:
        raise run.BenchError(f"gateway check failed: {done.stderr.decode()[-800:]}")
    return took


async def target_points(procs: run.Processes, tmp: Path) -> list[dict[str, Any]]:
    """SPEC §8/§15: big configs ready and checked in time; each figure the median of
    RUNS runs (the VM's speed drifts), with the runs themselves kept."""
    points = []
    for models, keys, target in TARGETS:
        routes, keyfile = tmp / "routes.yaml", tmp / "keys.yaml"
        routes.write_text(routes_text(models))
        keyfile.write_text(keys_text(keys, limits=True))
        ready = [await ready_once(procs, routes, keyfile, tmp / "ready.log") for _ in range(RUNS)]
        check = [check_once(procs, routes, keyfile) for _ in range(RUNS)]
        point: dict[str, Any] = {"models": models, "keys": keys, "target_s": target}
        for name, runs in (("ready", ready), ("check", check)):
            median = statistics.median(runs)
            point[f"{name}_s"] = median
            point[f"{name}_runs_s"] = runs
            point[f"{name}_met"] = median <= target
        points.append(point)
        progress(
            f"target: {models:,} models + {keys:,} keys with limits: ready {point['ready_s']:.2f} s "
            f"({'met' if point['ready_met'] else 'NOT met'}), check {point['check_s']:.2f} s "
            f"({'met' if point['check_met'] else 'NOT met'}); target <= {target:g} s each"
        )
    return points


async def supervisor_point(procs: run.Processes, tmp: Path, models: int) -> dict[str, Any]:
    routes, keyfile = tmp / "routes.yaml", tmp / "keys.yaml"
    routes.write_text(routes_text(models))
    keyfile.write_text("")
    port = run.free_ports(1)[0]
    argv = [*run.gateway_command(), "serve", "--routes", str(routes), "--keys", str(keyfile)]
    argv += ["--port", str(port), "--workers", "2", "--log-level", "warning"]
    proc = procs.start(argv, "any", log=tmp / "supervisor.log")
    try:
        client = await Client.connect(port, 120)
        await client.request("GET", "/healthz")
        client.close()
        rss = run.rss_mib([proc.pid])
    finally:
        procs.stop(proc, grace=15)
    progress(f"--workers 2 with {models:,} models: supervisor RSS {rss:.1f} MiB")
    return {"models": models, "supervisor_rss_mib": rss}


async def churn_point(procs: run.Processes, tmp: Path, requests: int) -> dict[str, Any]:
    routes, keyfile = tmp / "routes.yaml", tmp / "keys.yaml"
    routes.write_text(routes_text(1))
    keyfile.write_text("")
    port = run.free_ports(1)[0]
    argv = [*run.gateway_command(), "serve", "--routes", str(routes), "--keys", str(keyfile)]
    argv += ["--port", str(port), "--log-level", "warning"]
    proc = procs.start(argv, "proxy", log=tmp / "churn.log")
    try:
        client = await Client.connect(port, 30)
        await client.request("GET", "/healthz")
        before = run.rss_mib([proc.pid])
        for i in range(requests):
            body = b'{"model":"w/%d","messages":[{"role":"user","content":"hi"}]}' % i
            await client.request("POST", "/v1/chat/completions", body)
        after = run.rss_mib([proc.pid])
        metrics = await client.request("GET", "/metrics")
        client.close()
    finally:
        procs.stop(proc)
    series = sum(1 for line in metrics.splitlines() if line and not line.startswith(b"#"))
    progress(
        f"slug churn, {requests:,} new slugs under w/*: RSS {before:.1f} -> {after:.1f} MiB, "
        f"/metrics {len(metrics) / 1024:.1f} KiB in {series} series"
    )
    return {"requests": requests, "rss_before_mib": before, "rss_after_mib": after,
            "metrics_bytes": len(metrics), "metrics_series": series}  # fmt: skip


ANSWER = b'{"id":"x","object":"chat.completion","created":1,"model":"up","choices":[]}'


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request read whole (its body by content-length); its head."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return head


async def small_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An upstream that reads each request whole and answers a small JSON body: what the
    gateway holds for a large request is then the request's alone."""
    try:
        while True:
            await read_request(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(ANSWER), ANSWER)
            )
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        writer.close()  # the gateway went away, or the bench is ending


async def body_points(procs: run.Processes, tmp: Path, sizes: list[int]) -> list[dict[str, Any]]:
    upstream = await asyncio.start_server(small_answers, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    routes, keyfile = tmp / "routes.yaml", tmp / "keys.yaml"
    routes.write_text(
        f"providers:\n  up:\n    base_url: http://127.0.0.1:{up_port}/v1\n"
        "models:\n  m0:\n    providers: [{provider: up}]\n"
    )
    keyfile.write_text("")
    port = run.free_ports(1)[0]
    argv = [*run.gateway_command(), "serve", "--routes", str(routes), "--keys", str(keyfile)]
    argv += ["--port", str(port), "--log-level", "warning", "--max-body-bytes", str(64 << 20)]
    proc = procs.start(argv, "proxy", log=tmp / "bodies.log")
    points = []
    try:
        client = await Client.connect(port, 30)
        await client.request("GET", "/healthz")
        for size in sizes:
            text = "hello " * (size // 6)
            body = json.dumps({"model": "m0", "messages": [{"role": "user", "content": text}]})
            before = run.status_kib(proc.pid, "VmRSS")
            reset_peak(proc.pid)
            await client.request("POST", "/v1/chat/completions", body.encode())
            peak = run.status_kib(proc.pid, "VmHWM") - before
            ratio = peak * 1024 / len(body)
            progress(f"body {len(body) / 1024:>8,.0f} KiB: peak {peak / 1024:6.1f} MiB over the "
                     f"RSS before it = {ratio:4.1f} bodies")  # fmt: skip
            points.append({"body_bytes": len(body), "peak_kib": peak, "bodies": ratio})
        client.close()
    finally:
        procs.stop(proc)
        upstream.close()
        await upstream.wait_closed()
    return points


LONG_TOKENS = 200  # the long stream: 204 events, the short one 22


async def sse_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """An upstream streaming bench/run.py's 22 chat events, one write per event with the
    loop handed over between them, as a model's tokens come."""
    short = [e.encode() for e in run.sse_events()]
    long = [e.encode() for e in run.sse_events(tokens=LONG_TOKENS)]
    try:
        while True:
            head = await read_request(reader)
            events = long if head.startswith(b"POST /long/") else short
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"content-length: %d\r\n\r\n" % sum(map(len, events))
            )
            for event in events:
                writer.write(event)
                await writer.drain()
                await asyncio.sleep(0)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        writer.close()


def strace_counts(path: Path) -> dict[str, int]:
    """`strace -c` summary lines: syscall name -> calls."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] not in ("total",):
            counts[parts[-1]] = int(parts[3])
    return counts


async def syscall_point(procs: run.Processes, tmp: Path, streams: int) -> dict[str, Any]:
    """Syscalls per stream and per event, counted by `strace -f -c`: `streams` streams of
    22 events and as many of 204, each run less one without streams (start-up and
    shutdown); per event = the difference between the two lengths over 182 events, what
    every stream costs once (its request) then drops out."""
    strace = run.find_binary("strace")
    if strace is None:
        progress("syscalls per event: skipped (no strace; apt-get install strace)")
        return {}
    upstream = await asyncio.start_server(sse_answers, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    routes, keyfile = tmp / "routes.yaml", tmp / "keys.yaml"
    routes.write_text(
        f"providers:\n  up:\n    base_url: http://127.0.0.1:{up_port}/v1\n"
        f"  long:\n    base_url: http://127.0.0.1:{up_port}/long/v1\n"
        "models:\n  m0:\n    providers: [{provider: up}]\n"
        "  m1:\n    providers: [{provider: long}]\n"
    )
    keyfile.write_text("")
    lengths = {"m0": run.SSE_EVENT_COUNT, "m1": LONG_TOKENS + 4}
    runs: dict[str, dict[str, int]] = {}
    try:
        for model in ("", "m0", "m1"):
            out = tmp / f"strace-{model or 'none'}.txt"
            port = run.free_ports(1)[0]
            argv = [str(strace), "-f", "-c", "-o", str(out), *run.gateway_command(), "serve"]
            argv += ["--routes", str(routes), "--keys", str(keyfile), "--port", str(port)]
            argv += ["--log-level", "warning"]
            proc = procs.start(argv, "proxy", log=tmp / "strace.log")
            try:
                client = await Client.connect(port, 60)
                await client.request("GET", "/healthz")
                body = b'{"model":"%s","stream":true,"messages":[]}' % model.encode()
                body = body.replace(b"[]", b'[{"role":"user","content":"hi"}]')
                for _ in range(streams if model else 0):
                    answer = await client.request("POST", "/v1/chat/completions", body)
                    if answer.count(b"data:") != lengths[model]:
                        raise run.BenchError(f"a stream came back short: {answer[:300]!r}")
                client.close()
                for pid in run.children(proc.pid):  # the gateway; strace exits after it
                    os.kill(pid, signal.SIGTERM)
                await asyncio.to_thread(proc.wait, 60)
            finally:
                procs.stop(proc)
            runs[model] = strace_counts(out)
    finally:
        upstream.close()
        await upstream.wait_closed()

    def per_stream(model: str, name: str) -> float:
        return (runs[model].get(name, 0) - runs[""].get(name, 0)) / streams

    names = sorted(set(runs["m0"]) | set(runs["m1"]))
    short = {name: round(per_stream("m0", name), 2) for name in names}
    extra = lengths["m1"] - lengths["m0"]
    per_event = {
        name: round((per_stream("m1", name) - per_stream("m0", name)) / extra, 3) for name in names
    }
    top = sorted(short.items(), key=lambda item: -item[1])[:5]
    progress(
        f"syscalls per {lengths['m0']}-event stream: "
        + ", ".join(f"{name} {value:.1f}" for name, value in top)
        + "; per further event: "
        + ", ".join(f"{name} {per_event[name]:.3f}" for name, _ in top)
    )
    return {"streams": streams, "per_stream": short, "per_event": per_event}


def reset_peak(pid: int) -> None:
    """VmHWM starts again from the current RSS (Linux: clear_refs 5)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


async def bench(quick: bool, targets_only: bool) -> dict[str, Any]:
    procs = run.Processes(run.pick_cores())
    sizes = [(10, 10), (10_000, 10), (10, 10_000), (10_000, 10_000)]
    if not quick:
        sizes += [(100_000, 0), (10, 100_000)]
    out: dict[str, Any] = {"targets": [], "config": [], "supervisor": [], "churn": [], "bodies": []}
    with tempfile.TemporaryDirectory(prefix="gateway-scale-") as name:
        tmp = Path(name)
        try:
            out["targets"] = await target_points(procs, tmp)
            if targets_only:
                return out
            for models, keys in sizes:
                out["config"].append(await config_point(procs, tmp, models, keys))
            out["supervisor"].append(await supervisor_point(procs, tmp, 10_000))
            for n in (1_000, 10_000) if quick else (1_000, 10_000, 50_000):
                out["churn"].append(await churn_point(procs, tmp, n))
            sizes = [1 << 10, 64 << 10, 1 << 20, 8 << 20]
            out["bodies"] = await body_points(procs, tmp, sizes)
            out["syscalls"] = await syscall_point(procs, tmp, 100 if quick else 500)
        finally:
            procs.stop_all()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smaller points only")
    parser.add_argument("--targets", action="store_true", help="the ready/check targets only")
    args = parser.parse_args()
    run.raise_fd_limit()
    # This checkout's gateway in every process started (run.gateway_env says why).
    os.environ.setdefault("PYTHONPATH", str(run.ROOT))
    try:
        result = asyncio.run(bench(args.quick, args.targets))
    except run.BenchError as exc:
        print(f"bench-scale: {exc}", file=sys.stderr)
        return 1
    path = run.RESULTS / f"scale-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    progress(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
