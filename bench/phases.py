"""Where one request's time goes, from the gateway process itself (issue 23, SPEC §15).

Runs the gateway in a process of its own (pinned to the proxy core, as `make bench` does)
with an instrumentation shim: this file, started as `phases.py --serve OUT -- <gateway
serve args>`, wraps points of the request path (monkeypatched from here; gateway/ is not
changed) with time.perf_counter_ns() stamps, then runs the gateway's own CLI. The driver
(this file without --serve) starts bench/run.py's upstreams, sends N JSON requests to the
fast nginx upstream and N paced streams (a role event, then content one interval later)
one after another on ONE keep-alive connection, stops the gateway with SIGINT and prints
the median and p99 of each phase.

The points, in request order: read (the first request bytes reach ServerProtocol), head
(on_headers_complete returned), endpoint (ProxyEndpoint.__call__ entered), plan
(build_plan returned), acquired (Pool.acquire returned), sent (H1Connection.send
returned), up_head_parsed (the upstream head parsed, H1Connection.on_headers_complete),
up_head (Upstream.send returned to its caller), up_data (the upstream bytes that carry
the answer or the first content arrived), held (open_attempt returned: the first content
found, or the JSON body read), released (the relay's first body message reaches
Cycle.send), written (the first transport.write of the response).

Also measured: writes per response; event-loop iterations between the arrival of the
answer's bytes and the first write (a call_soon chain counts them); TCP_NODELAY on the
client and the upstream sockets; garbage collections (gc.callbacks) and the background
work (traffic sampler, access-log flush, state-file sync, reload check, metrics dump)
that overlapped each request; the shim's own cost per wrapped call.

Usage: bench/phases.py [--requests N] [--quick] [--interval-ms MS] [--pause-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
POINTS = (
    "read",
    "head",
    "endpoint",
    "plan",
    "acquired",
    "sent",
    "up_head_parsed",
    "up_head",
    "up_data",
    "held",
    "released",
    "written",
)
# Phase name -> (from point, to point), in request order.
PHASES = (
    ("request read and head parsed", "read", "head"),
    ("head parsed -> endpoint entered", "head", "endpoint"),
    ("endpoint -> plan built", "endpoint", "plan"),
    ("plan -> upstream connection taken", "plan", "acquired"),
    ("connection -> request written", "acquired", "sent"),
    ("written -> upstream head parsed (upstream + loopback)", "sent", "up_head_parsed"),
    ("upstream head parsed -> Upstream.send returns", "up_head_parsed", "up_head"),
    ("Upstream.send returns -> answer bytes arrive (upstream)", "up_head", "up_data"),
    ("answer bytes arrive -> first event held / body read", "up_data", "held"),
    ("held -> released to Cycle.send", "held", "released"),
    ("released -> first transport.write", "released", "written"),
)
GATEWAY_PART = (  # the phases where the gateway works (the rest waits on the upstream)
    ("read", "sent"),
    ("up_head_parsed", "up_head"),
    ("up_data", "written"),
)
WATCH_SECONDS = 30.0


# ---------------------------------------------------------------- the shim (child side)


class Shim:
    """Stamps per request. One connection at a time: the request in flight is `current`."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.current: dict[str, Any] | None = None
        self.gc: list[tuple[int, int, int]] = []  # (start, end, generation)
        self.gc_start = 0
        self.background: list[tuple[str, int, int]] = []  # (what, start, end)
        self.nodelay: dict[str, list[int]] = {"client": [], "upstream": []}
        self.triggers = (b'"content":"tok', b'"choices"')

    def stamp(self, point: str) -> None:
        rec = self.current
        if rec is not None and point not in rec:
            rec[point] = time.perf_counter_ns()

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.gc_start = time.perf_counter_ns()
        else:
            self.gc.append((self.gc_start, time.perf_counter_ns(), info["generation"]))


def _nodelay(transport: Any) -> int:
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0)


class CountingTransport:
    """The client connection's transport, counting and stamping the response's writes."""

    def __init__(self, transport: Any, shim: Shim) -> None:
        self._transport = transport
        self._shim = shim

    def write(self, data: bytes) -> None:
        rec = self._shim.current
        if rec is not None and "released" in rec:
            rec["writes"] = rec.get("writes", 0) + 1
            if "written" not in rec:
                rec["written"] = time.perf_counter_ns()
                # A head written alone would be a split write (head, then body).
                rec["first_write"] = (
                    ("head" if data.startswith(b"HTTP/1.1 ") else "")
                    + ("+content" if any(t in data for t in self._shim.triggers) else "")
                ) or "other"
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def install(shim: Shim) -> None:
    """Wrap the request path's points (the gateway's code is not changed)."""
    from gateway import endpoints, relay
    from gateway.reload import Reloader
    from gateway.server.cycle import Cycle
    from gateway.server.protocol import ServerProtocol
    from gateway.state.file import StateFile
    from gateway.telemetry.accesslog import BatchedHandler
    from gateway.telemetry.metrics import Metrics
    from gateway.telemetry.traffic import Traffic
    from gateway.upstream.client import Upstream
    from gateway.upstream.connection import H1Connection
    from gateway.upstream.pool import Pool

    stamp = shim.stamp

    made = ServerProtocol.connection_made

    def connection_made(self: Any, transport: Any) -> None:
        shim.nodelay["client"].append(_nodelay(transport))
        made(self, CountingTransport(transport, shim))

    ServerProtocol.connection_made = connection_made  # type: ignore[method-assign]

    received = ServerProtocol.data_received

    def data_received(self: Any, data: bytes) -> None:
        if shim.current is None:
            shim.current = {"read": time.perf_counter_ns()}
        received(self, data)

    ServerProtocol.data_received = data_received  # type: ignore[method-assign]

    def after(owner: Any, name: str, point: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            result = original(*args, **kwargs)
            stamp(point)
            return result

        setattr(owner, name, wrapper)

    after(ServerProtocol, "on_headers_complete", "head")
    after(endpoints, "build_plan", "plan")
    after(H1Connection, "send", "sent")
    after(H1Connection, "on_headers_complete", "up_head_parsed")

    call = endpoints.ProxyEndpoint.__call__

    async def endpoint(self: Any, scope: Any, receive: Any, send: Any) -> None:
        stamp("endpoint")
        await call(self, scope, receive, send)

    endpoints.ProxyEndpoint.__call__ = endpoint  # type: ignore[method-assign]

    acquire = Pool.acquire

    async def pool_acquire(self: Any, origin: Any, seconds: float) -> Any:
        got = await acquire(self, origin, seconds)
        stamp("acquired")
        if shim.current is not None:
            shim.current["reused"] = got[1]
            shim.nodelay["upstream"].append(_nodelay(got[0].transport))
        return got

    Pool.acquire = pool_acquire  # type: ignore[method-assign]

    send = Upstream.send

    async def upstream_send(self: Any, *args: Any, **kwargs: Any) -> Any:
        got = await send(self, *args, **kwargs)
        stamp("up_head")
        return got

    Upstream.send = upstream_send  # type: ignore[method-assign]

    up_received = H1Connection.data_received

    def up_data_received(self: Any, data: bytes) -> None:
        up_received(self, data)
        rec = shim.current
        if rec is not None and "held" not in rec and any(t in data for t in shim.triggers):
            rec["up_data"] = time.perf_counter_ns()  # the last such arrival before `held`
            rec["ticks"] = 0
            token = rec["up_data"]
            loop = asyncio.get_running_loop()

            def tick() -> None:
                # One run per loop iteration until the response's first write. Queued
                # after the data's own callbacks (the waiter's wake-up): 0 ticks at the
                # write = the write came in the iteration right after the bytes.
                if rec.get("up_data") == token and "written" not in rec:
                    rec["ticks"] += 1
                    loop.call_soon(tick)

            loop.call_soon(tick)

    H1Connection.data_received = up_data_received  # type: ignore[method-assign]

    opener = relay.open_attempt

    async def open_attempt(*args: Any, **kwargs: Any) -> Any:
        got = await opener(*args, **kwargs)
        stamp("held")
        return got

    relay.open_attempt = open_attempt  # type: ignore[assignment]

    cycle_send = Cycle.send

    async def cycle_send_wrapper(self: Any, message: Any) -> None:
        rec = shim.current
        kind = message["type"]
        if kind == "http.response.body":
            stamp("released")
        await cycle_send(self, message)
        if rec is not None and kind == "http.response.body" and not message.get("more_body"):
            rec["end"] = time.perf_counter_ns()
            shim.records.append(rec)
            shim.current = None

    Cycle.send = cycle_send_wrapper  # type: ignore[method-assign]

    def timed(owner: Any, name: str, what: str) -> None:
        original = getattr(owner, name)
        if asyncio.iscoroutinefunction(original):

            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter_ns()
                try:
                    return await original(*args, **kwargs)
                finally:
                    shim.background.append((what, began, time.perf_counter_ns()))

            setattr(owner, name, awrapper)
        else:

            def wrapper(*args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter_ns()
                try:
                    return original(*args, **kwargs)
                finally:
                    shim.background.append((what, began, time.perf_counter_ns()))

            setattr(owner, name, wrapper)

    timed(Traffic, "sample", "traffic sampler")
    timed(BatchedHandler, "flush", "access-log flush")
    timed(StateFile, "save", "state-file sync")
    timed(Reloader, "_fingerprint", "reload check")
    timed(Metrics, "dump", "metrics dump")
    gc.callbacks.append(shim.on_gc)


def wrapper_cost() -> dict[str, float]:
    """ns per call of an empty function, plain and through one `after`-style wrapper,
    and through one async wrapper awaited (the shim's kinds)."""

    def empty() -> None:
        return None

    def wrapped() -> None:
        empty()
        time.perf_counter_ns()

    async def inner() -> None:
        return None

    async def outer() -> None:
        await inner()
        time.perf_counter_ns()

    n = 200_000

    def timeit(fn: Callable[[], Any]) -> float:
        best = float("inf")
        for _ in range(5):
            began = time.perf_counter_ns()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter_ns() - began) / n)
        return best

    def drive(coro_fn: Callable[[], Any]) -> Callable[[], None]:
        def run() -> None:
            coro = coro_fn()
            with contextlib.suppress(StopIteration):
                coro.send(None)

        return run

    return {
        "plain_ns": round(timeit(empty), 1),
        "sync_wrapper_ns": round(timeit(wrapped), 1),
        "plain_async_ns": round(timeit(drive(inner)), 1),
        "async_wrapper_ns": round(timeit(drive(outer)), 1),
    }


def serve(out: Path, argv: list[str]) -> int:
    shim = Shim()
    cost = wrapper_cost()
    install(shim)

    import atexit

    def dump() -> None:
        out.write_text(
            json.dumps(
                {
                    "records": shim.records,
                    "gc": shim.gc,
                    "background": shim.background,
                    "nodelay": shim.nodelay,
                    "wrapper_cost": cost,
                }
            )
        )

    atexit.register(dump)
    from gateway.cli import main

    sys.argv = ["gateway", *argv]
    return int(main() or 0)


# ---------------------------------------------------------------- the driver


def request(port: int, body: bytes) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def exchange(sock: socket.socket, data: bytes) -> bytes:
    """One request, its whole response (content-length or chunked) read."""
    sock.sendall(data)
    buf = b""
    while b"\r\n\r\n" not in buf:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed before the head")
        buf += more
    head, _, rest = buf.partition(b"\r\n\r\n")
    lower = head.lower()
    if not head.startswith(b"HTTP/1.1 200"):
        raise ConnectionError(f"answer {head[:200]!r}")
    if b"transfer-encoding: chunked" in lower:
        while not rest.endswith(b"0\r\n\r\n"):
            more = sock.recv(65536)
            if not more:
                raise ConnectionError("closed mid-stream")
            rest += more
        return rest
    length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed mid-body")
        rest += more
    return rest


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def analyse(dump: dict[str, Any], kind: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    for rec in records:
        # A JSON answer's body comes with its head (one read): nothing to wait for after.
        if "up_data" in rec and "up_head" in rec and rec["up_data"] < rec["up_head"]:
            rec["up_data"] = rec["up_head"]
    phases: dict[str, dict[str, float]] = {}
    for name, start, end in PHASES:
        spans = [(r[end] - r[start]) / 1000 for r in records if start in r and end in r]
        if spans:
            phases[name] = {
                "p50_us": round(statistics.median(spans), 1),
                "p99_us": round(percentile(spans, 99), 1),
                "n": len(spans),
            }
    own = [sum((r[b] - r[a]) for a, b in GATEWAY_PART if a in r and b in r) / 1000 for r in records]
    writes = [r.get("writes", 0) for r in records]
    firsts = [r.get("first_write", "none") for r in records]
    ticks = [r["ticks"] for r in records if "ticks" in r]
    # What ran during a request: gc and background work overlapping [read, end].
    slow_cut = percentile(own, 99)
    fast_cut = statistics.median(own)

    def overlapping(rec: dict[str, Any]) -> tuple[list[str], float]:
        found, spent = [], 0.0
        for began, ended, generation in dump["gc"]:
            if began < rec["end"] and ended > rec["read"]:
                found.append(f"gc{generation}")
                spent += (ended - began) / 1000
        for what, began, ended in dump["background"]:
            if began < rec["end"] and ended > rec["read"]:
                found.append(what)
                spent += (ended - began) / 1000
        return found, spent

    tail_hits: dict[str, int] = {}
    body_hits: dict[str, int] = {}
    tail_n = body_n = 0
    for rec, mine in zip(records, own, strict=True):
        found, _ = overlapping(rec)
        if mine >= slow_cut:
            tail_n += 1
            for what in found:
                tail_hits[what] = tail_hits.get(what, 0) + 1
        elif mine <= fast_cut:
            body_n += 1
            for what in found:
                body_hits[what] = body_hits.get(what, 0) + 1
    return {
        "kind": kind,
        "requests": len(records),
        "reused_upstream": sum(1 for r in records if r.get("reused")),
        "phases": phases,
        "gateway_own_us": {
            "p50": round(statistics.median(own), 1),
            "p99": round(percentile(own, 99), 1),
            "max": round(max(own), 1),
        },
        "writes_per_response": {str(w): writes.count(w) for w in sorted(set(writes))},
        "first_write_holds": {w: firsts.count(w) for w in sorted(set(firsts))},
        "loop_iterations_to_first_write": {str(t + 1): ticks.count(t) for t in sorted(set(ticks))},
        "tail": {"requests": tail_n, "overlapped_by": tail_hits},
        "median_or_below": {"requests": body_n, "overlapped_by": body_hits},
    }


def print_report(result: dict[str, Any], cost: dict[str, float], wrappers: int) -> None:
    print(f"\n{result['kind']}: {result['requests']} requests at one keep-alive connection, "
          f"{result['reused_upstream']} on a reused upstream connection")  # fmt: skip
    width = max(len(name) for name in result["phases"])
    print(f"  {'phase'.ljust(width)}  {'p50 us':>8}  {'p99 us':>8}")
    for name, got in result["phases"].items():
        print(f"  {name.ljust(width)}  {got['p50_us']:8.1f}  {got['p99_us']:8.1f}")
    own = result["gateway_own_us"]
    print(
        f"  the gateway's own time (upstream waits excluded): p50 {own['p50']:.1f} us, "
        f"p99 {own['p99']:.1f} us, max {own['max']:.1f} us"
    )
    shim = wrappers * (cost["sync_wrapper_ns"] - cost["plain_ns"]) / 1000
    print(f"  shim: about {wrappers} wrapped calls per request, ~{shim:.1f} us in all")
    print(f"  writes per response: {result['writes_per_response']}; the first write holds: "
          f"{result['first_write_holds']}")  # fmt: skip
    print(f"  loop iterations from the answer's bytes to the first write: "
          f"{result['loop_iterations_to_first_write']} (1 = the next iteration: no extra hop)")  # fmt: skip
    print(f"  p99 tail ({result['tail']['requests']} requests) overlapped by: "
          f"{result['tail']['overlapped_by'] or 'nothing'}")  # fmt: skip
    print(f"  median-or-faster ({result['median_or_below']['requests']}) overlapped by: "
          f"{result['median_or_below']['overlapped_by'] or 'nothing'}")  # fmt: skip


def drive(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(BENCH))
    import run

    cores = run.pick_cores()
    if cores is not None:
        os.sched_setaffinity(0, {cores[1]})
    procs = run.Processes(cores)
    n = args.requests or (300 if args.quick else 2000)
    try:
        with run.interrupt_on_sigterm(), tempfile.TemporaryDirectory(prefix="phases-") as tmp:
            folder = Path(tmp)
            folder.chmod(0o755)
            try:
                tools = {"nginx": run.find_binary("nginx") or "nginx"}
                bench = run.Bench(folder, procs, tools, run.Ports.pick(), True, 1, 1)
                routes, keys = bench.write_gateway_files()
                bench.start_upstream()
                out = folder / "phases.json"
                port = run.free_ports(1)[0]
                log = folder / "gateway.log"
                argv = [PYTHON, str(BENCH / "phases.py"), "--serve", str(out), "--", "serve"]
                argv += ["--routes", str(routes), "--keys", str(keys), "--port", str(port)]
                argv += ["--drain-seconds", "1"]
                env = run.gateway_env()  # this checkout's gateway, as make bench
                with log.open("ab") as err:
                    proc = subprocess.Popen(
                        procs.argv(argv, "proxy"),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,  # the access log: part of the cost
                        stderr=err,
                        cwd=folder,  # its ./gateway.state
                        env=env,
                        start_new_session=True,
                    )
                procs.running.append(proc)
                run.wait_answered(port, proc, log, time.monotonic() + 30)
                run.progress(f"gateway with the shim up; {n} JSON requests, then {n} streams")
                json_req = request(port, run.JSON_BODY)
                stream_body = json.dumps(
                    {"model": "bench-paced", "stream": True,
                     "messages": [{"role": "user", "content": "hi"}],
                     "bench_interval_ms": args.interval_ms, "bench_events": 2,
                     "bench_role": True},
                    separators=(",", ":"),
                ).encode()  # fmt: skip
                stream_req = request(port, stream_body)
                with socket.create_connection(("127.0.0.1", port), 10) as sock:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.settimeout(10)
                    for _ in range(50):  # warm-up: pools, caches
                        exchange(sock, json_req)
                        exchange(sock, stream_req)
                    marks = [time.monotonic()]
                    for i in range(n):
                        exchange(sock, json_req)
                        if args.pause_ms:  # idle like a stream's wait: caches go cold
                            time.sleep(args.pause_ms / 1000)
                        if i and i % 1000 == 0:
                            run.progress(f"  {i} JSON requests")
                    marks.append(time.monotonic())
                    for i in range(n):
                        exchange(sock, stream_req)
                        if i and i % 500 == 0:
                            run.progress(f"  {i} streams")
                    marks.append(time.monotonic())
                os.kill(proc.pid, signal.SIGINT)
                proc.wait(WATCH_SECONDS)
                procs.stop(proc)
                if not out.exists():
                    raise run.BenchError(f"the shim wrote nothing:\n{run.tail(log)}")
                dump = json.loads(out.read_text())
            finally:
                procs.stop_all()
    except run.BenchError as exc:
        print(f"phases: error: {exc}", file=sys.stderr)
        return 1
    records = dump["records"]
    warm = 100  # the warm-up's 2 x 50
    json_recs = records[warm : warm + n]
    stream_recs = records[warm + n : warm + 2 * n]
    results = [analyse(dump, "JSON (fast nginx upstream)", json_recs)]
    results.append(
        analyse(dump, f"stream (role, then content {args.interval_ms} ms later)", stream_recs)
    )
    cost = dump["wrapper_cost"]
    print(
        f"\nshim cost: an empty call {cost['plain_ns']:.0f} ns, through a stamping wrapper "
        f"{cost['sync_wrapper_ns']:.0f} ns; a coroutine {cost['plain_async_ns']:.0f} ns, "
        f"through an async wrapper {cost['async_wrapper_ns']:.0f} ns"
    )
    print(f"TCP_NODELAY: client sockets {set(dump['nodelay']['client'])}, "
          f"upstream sockets {set(dump['nodelay']['upstream'])} (1 = on)")  # fmt: skip
    for result in results:
        print_report(result, cost, 12)
    document = {"results": results, "wrapper_cost": cost, "nodelay": dump["nodelay"]}
    document["gc_count"] = len(dump["gc"])
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    path = run.RESULTS / "phases-latest.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {path.relative_to(run.ROOT)}")
    return 0


def main() -> int:
    if "--serve" in sys.argv:
        at = sys.argv.index("--serve")
        out = Path(sys.argv[at + 1])
        rest = sys.argv[sys.argv.index("--") + 1 :]
        return serve(out, rest)
    parser = argparse.ArgumentParser(description="per-phase time of one request, from inside")
    parser.add_argument("--requests", type=int, help="JSON requests and streams (default 2000)")
    parser.add_argument("--quick", action="store_true", help="300 of each")
    parser.add_argument(
        "--interval-ms", type=float, default=5, help="role -> first content in the stream"
    )
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=0,
        help="idle this long after each JSON request (tests whether a stream's slower "
        "phases come from the idle wait rather than its code)",
    )
    return drive(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
