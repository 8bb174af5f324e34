"""`make bench`: the gateway side by side with nginx, measured in one run on this machine.

Starts a fast upstream on 127.0.0.1 (nginx with fixed JSON and SSE bodies, plus a paced
SSE upstream in Python that stamps every event), then measures the same scenarios
against three targets: the upstream directly (the floor), nginx `proxy_pass` in front of
it (a C proxy: the practical limit for one hop), and the gateway with one worker.
The gateway and the nginx proxy run on one core; wrk, the upstreams and the clients on
another. Prints a table and writes bench/results/<timestamp>.json and latest.json.

Scenarios: 1 non-streaming throughput at 64 connections; 2 latency at one connection;
3 streaming (22 events) throughput at 64 connections; 4 per-event relay delay of one
paced stream (an event every 20 ms); 5 many slow streams at once (an event every 100 ms);
6 cold start to the first answered request, and idle RSS; 9 SPEC §15's paced streams
(a role event, then 64 content deltas 20 ms apart): time to first token, per-frame delay
and the largest gap at one keep-alive connection, and the streams held at once at rungs
of 64 to 2,048 with no frame over 100 ms late and no gap over 200 ms. The end prints
each SPEC §15 target with its measured value.

Usage: bench/run.py [--quick] [--slow-streams N] [--slow-seconds S] [--only limits|latency]
(`make bench ARGS=--quick` works too: ARGS is read when no argument is given.)
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
PYTHON = sys.executable
CHAT_PATH = "/v1/chat/completions"
TARGETS = ("direct", "nginx", "gateway")
JSON_BODY = b'{"model":"bench-json","messages":[{"role":"user","content":"hi"}]}'
SSE_BODY = b'{"model":"bench-sse","stream":true,"messages":[{"role":"user","content":"hi"}]}'
UPSTREAM_MODEL = "upstream-model"
STARTED = time.monotonic()
# SPEC §15's paced stream: a role event, then 64 content deltas 20 ms apart.
PACED_EVENTS, PACED_INTERVAL_MS = 64, 20
RUNGS = (64, 128, 256, 512, 1024, 2048)
QUICK_RUNGS = (64, 256, 1024)


class BenchError(Exception):
    """A failure that ends the run with a message saying what to do."""


# ---------------------------------------------------------------- fixed upstream bodies


def completion_body() -> str:
    return json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": 1700000000,
            "model": UPSTREAM_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
        },
        separators=(",", ":"),
    )


def sse_events(tokens: int = 18, pad: int = 0) -> list[str]:
    """~20 chunk events the way OpenAI streams them: role, content, finish, usage, [DONE].
    `tokens` content events, each `pad` characters longer (bench/instructions.py's curves)."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> str:
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": UPSTREAM_MODEL,
            "choices": choices,
            **extra,
        }
        return "data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n"

    def delta(d: dict[str, str], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": d, "finish_reason": finish}]

    events = [event(delta({"role": "assistant", "content": ""}))]
    events += [event(delta({"content": f"token{i} " + "x" * pad})) for i in range(tokens)]
    events.append(event(delta({}, "stop")))
    usage = {"prompt_tokens": 9, "completion_tokens": tokens, "total_tokens": 9 + tokens}
    events.append(event([], usage=usage))
    events.append("data: [DONE]\n\n")
    return events


SSE_EVENT_COUNT = len(sse_events())


def nginx_string(text: str) -> str:
    """Text for a single-quoted nginx string: newlines as \\n, no variables."""
    if any(c in text for c in "'\\$"):
        raise ValueError("nginx return text must not contain quotes, backslashes or $")
    return text.replace("\n", "\\n")


# ---------------------------------------------------------------- output


def progress(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", flush=True)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- processes


@dataclass
class Processes:
    """Every process the bench starts; each is stopped by its own pid."""

    cores: tuple[int, int] | None  # (proxy core, load core); None: no pinning
    running: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, argv: list[str], role: str) -> list[str]:
        if self.cores is None or role == "any":
            return argv
        core = self.cores[0] if role == "proxy" else self.cores[1]
        return ["taskset", "-c", str(core), *argv]

    def start(
        self,
        argv: list[str],
        role: str,
        log: Path | None = None,
        env: dict[str, str] | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a process pinned to the proxy or the load core, in its own session
        so that a Ctrl-C reaches only this script, which then stops it."""
        with contextlib.ExitStack() as stack:
            # Output to the log file, or both pipes for the caller to read, or nowhere.
            out: Any = subprocess.DEVNULL if stdout is None else stdout
            if log is not None:
                out = stack.enter_context(log.open("ab"))
            proc = subprocess.Popen(
                self.argv(argv, role),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
            )
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        """terminate, wait, kill; an nginx master's workers too if it had to be killed."""
        if proc.poll() is None:
            workers = children(proc.pid)
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                for pid in workers:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.running)):
            self.stop(proc)

    def run(
        self, argv: list[str], role: str, timeout: float, env: dict[str, str] | None = None
    ) -> str:
        """Run a tool to completion and return its stdout."""
        proc = self.start(argv, role, env=env, stdout=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
        finally:
            self.stop(proc)
        if proc.returncode != 0:
            raise BenchError(
                f"{Path(argv[0]).name} exited {proc.returncode}: {err.decode(errors='replace')[-800:]}"
            )
        return out.decode(errors="replace")


def pick_cores() -> tuple[int, int] | None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        progress("warning: fewer than 2 usable cores or no taskset; processes are not pinned")
        return None
    return cpus[0], cpus[1]


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    if hard < want and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


# ---------------------------------------------------------------- tools


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def ensure_tools() -> dict[str, str]:
    """wrk and nginx, installed with apt-get when missing (one `apt-get update` first)."""
    missing = [name for name in ("wrk", "nginx") if find_binary(name) is None]
    if missing:
        hint = f"install them with `apt-get install -y {' '.join(missing)}` and run again"
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise BenchError(f"{' and '.join(missing)} not found; {hint} (as root)")
        progress(f"installing {' '.join(missing)} with apt-get")
        # RUNLEVEL=1 keeps Debian's package scripts from starting a system-wide nginx.
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "RUNLEVEL": "1"}
        for cmd in (
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        ):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise BenchError(
                    f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n"
                    f"{(done.stdout + done.stderr)[-1500:]}\n{hint}"
                )
    tools = {name: find_binary(name) for name in ("wrk", "nginx")}
    for name, path in tools.items():
        if path is None:
            raise BenchError(f"{name} still not found after apt-get; install it and run again")
    return {name: str(path) for name, path in tools.items()}


def gateway_env() -> dict[str, str]:
    """The gateway's environment: none of the caller's GATEWAY_ settings, and this
    checkout's package first. The venv's editable install points at one checkout, so a
    run from a git worktree would otherwise measure that one. A PYTHONPATH given by the
    caller is kept (to measure another tree on purpose)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.setdefault("PYTHONPATH", str(ROOT))
    return env


def gateway_command() -> list[str]:
    script = Path(PYTHON).parent / "gateway"
    return [str(script)] if script.exists() else [PYTHON, "-m", "gateway"]


# ---------------------------------------------------------------- HTTP helpers


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def post(port: int, body: bytes, timeout: float = 5.0) -> tuple[int, str, bytes]:
    """One POST to 127.0.0.1:port: (status, content-type, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", CHAT_PATH, body=body, headers={"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        conn.close()


def wait_answered(port: int, proc: subprocess.Popen[bytes], log: Path, deadline: float) -> float:
    """Poll until a chat completion answers 200; returns time.monotonic() then."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} while starting:\n{tail(log)}")
        try:
            status, _, body = post(port, JSON_BODY, timeout=2.0)
        except (ConnectionError, OSError, http.client.HTTPException):
            time.sleep(0.002)
            continue
        if status == 200:
            return time.monotonic()
        raise BenchError(f"port {port} answered {status}: {body[:300]!r}\n{tail(log)}")
    raise BenchError(f"nothing answered on port {port} within 30 s:\n{tail(log)}")


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} while starting:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.005)
    raise BenchError(f"nothing listens on port {port} after 15 s:\n{tail(log)}")


# ---------------------------------------------------------------- /proc


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def status_kib(pid: int, field_name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def rss_mib(pids: list[int], field_name: str = "VmRSS") -> float:
    return sum(status_kib(pid, field_name) for pid in pids) / 1024


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- the servers


@dataclass
class Ports:
    up_json: int
    up_sse: int
    up_paced: int
    nginx_json: int
    nginx_sse: int
    nginx_paced: int
    nginx_floor: int  # nginx on the proxy core answering by itself
    gateway: int

    @classmethod
    def pick(cls) -> Ports:
        return cls(*free_ports(8))

    def of(self, target: str, kind: str) -> int:
        """The port a target answers `kind` (json, sse, paced) on."""
        if target == "gateway":
            return self.gateway
        prefix = "up" if target == "direct" else "nginx"
        return int(getattr(self, f"{prefix}_{kind}"))


@dataclass
class Bench:
    tmp: Path
    procs: Processes
    tools: dict[str, str]
    ports: Ports
    quick: bool
    slow_streams: int
    slow_seconds: int
    servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- nginx

    def render(self, template: str, values: dict[str, Any]) -> str:
        text = (BENCH / template).read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", str(value))
        return text

    def start_nginx(
        self, name: str, template: str, values: dict[str, Any], role: str
    ) -> tuple[subprocess.Popen[bytes], Path]:
        prefix = self.tmp / name
        prefix.mkdir()
        prefix.chmod(0o755)  # workers run as nobody when the master runs as root
        conf = prefix / "nginx.conf"
        conf.write_text(self.render(template, {"PREFIX": prefix, **values}))
        log = prefix / "error.log"
        argv = [self.tools["nginx"], "-p", str(prefix), "-e", str(log), "-c", str(conf)]
        proc = self.procs.start([*argv, "-g", "daemon off;"], role, log=prefix / "stderr.log")
        return proc, log

    def start_upstream(self) -> None:
        values = {
            "JSON_PORT": self.ports.up_json,
            "SSE_PORT": self.ports.up_sse,
            "JSON_BODY": nginx_string(completion_body()),
            "SSE_BODY": nginx_string("".join(sse_events())),
        }
        proc, log = self.start_nginx("upstream", "nginx_upstream.conf.in", values, "load")
        for port in (self.ports.up_json, self.ports.up_sse):
            wait_listening(port, proc, log)
        self.servers["upstream"] = proc
        log = self.tmp / "paced.log"
        # niced: on the shared load core the client's reads come before the next send.
        argv = ["nice", "-n", "10", PYTHON, str(BENCH / "paced_upstream.py")]
        paced = self.procs.start([*argv, "--port", str(self.ports.up_paced)], "load", log=log)
        wait_listening(self.ports.up_paced, paced, log)
        self.servers["paced"] = paced

    def nginx_proxy_values(self, ports: list[int]) -> dict[str, Any]:
        return {
            "JSON_PORT": ports[0],
            "SSE_PORT": ports[1],
            "PACED_PORT": ports[2],
            "FLOOR_PORT": ports[3],
            "JSON_BODY": nginx_string(completion_body()),
            "UP_JSON_PORT": self.ports.up_json,
            "UP_SSE_PORT": self.ports.up_sse,
            "UP_PACED_PORT": self.ports.up_paced,
        }

    def start_nginx_proxy(
        self, name: str, ports: list[int]
    ) -> tuple[subprocess.Popen[bytes], Path]:
        values = self.nginx_proxy_values(ports)
        return self.start_nginx(name, "nginx_proxy.conf.in", values, "proxy")

    # -- gateway

    def write_gateway_files(self) -> tuple[Path, Path]:
        routes = self.tmp / "routes.yaml"
        lines = ["providers:"]
        for name, port in (
            ("bench-json", self.ports.up_json),
            ("bench-sse", self.ports.up_sse),
            ("bench-paced", self.ports.up_paced),
        ):
            lines += [f"  {name}:", f"    base_url: http://127.0.0.1:{port}/v1"]
            # As nginx's proxy has no cap: scenario 5 may hold more streams to one
            # upstream than the default 1,024 connections.
            lines.append(f"    max_connections: {max(2 * RUNGS[-1], 2 * self.slow_streams)}")
        lines.append("models:")
        for name in ("bench-json", "bench-sse", "bench-paced"):
            lines += [f"  {name}:", "    providers:", f"      - provider: {name}"]
            lines.append(f"        model: {UPSTREAM_MODEL}")
        # Scenario 8's: the JSON upstream at a price, so every answer is costed.
        lines += ["  bench-priced:", "    providers:", "      - provider: bench-json"]
        lines += [f"        model: {UPSTREAM_MODEL}", "        price: {input: 0.15, output: 0.6}"]
        routes.write_text("\n".join(lines) + "\n")
        keys = self.tmp / "keys.yaml"
        keys.write_text("keys: []\n")
        return routes, keys

    def start_gateway(self, port: int, log: Path) -> subprocess.Popen[bytes]:
        routes, keys = self.tmp / "routes.yaml", self.tmp / "keys.yaml"
        env = gateway_env()
        argv = [*gateway_command(), "serve", "--routes", str(routes), "--keys", str(keys)]
        # The default log level: the access log (one line per request) is part of the cost.
        argv += ["--port", str(port), "--drain-seconds", "1"]
        return self.procs.start(argv, "proxy", log=log, env=env)

    def pids(self, target: str) -> list[int]:
        proc = self.servers[target]
        return [proc.pid, *children(proc.pid)]


# ---------------------------------------------------------------- checks


def verify(bench: Bench) -> None:
    """Every target answers both bodies, with the model the client should see."""
    for target in TARGETS:
        gateway = target == "gateway"
        status, ctype, body = post(bench.ports.of(target, "json"), JSON_BODY)
        got = json.loads(body).get("model") if status == 200 else None
        if status != 200 or got != ("bench-json" if gateway else UPSTREAM_MODEL):
            raise BenchError(f"{target}: JSON answer {status} model={got!r}: {body[:300]!r}")
        status, ctype, body = post(bench.ports.of(target, "sse"), SSE_BODY)
        events = [e for e in body.split(b"\n\n") if e.startswith(b"data:")]
        want = f'"model":"{"bench-sse" if gateway else UPSTREAM_MODEL}"'.encode()
        if (
            status != 200
            or not ctype.startswith("text/event-stream")
            or len(events) != SSE_EVENT_COUNT
            or events[-1] != b"data: [DONE]"
            or want not in events[1]
        ):
            raise BenchError(
                f"{target}: stream answer {status} {ctype}, {len(events)} events "
                f"(want {SSE_EVENT_COUNT}): {body[:300]!r}"
            )
    progress(f"all three targets answer JSON and a {SSE_EVENT_COUNT}-event stream correctly")


# ---------------------------------------------------------------- wrk scenarios


def wrk(
    bench: Bench, port: int, body: bytes, connections: int, seconds: int, auth: str = ""
) -> dict[str, Any]:
    argv = [bench.tools["wrk"], "-t1", f"-c{connections}", f"-d{seconds}s", "--latency"]
    argv += ["--timeout", "10s", "-s", str(BENCH / "wrk_post.lua")]
    argv.append(f"http://127.0.0.1:{port}{CHAT_PATH}")
    env = {**os.environ, "BENCH_BODY": body.decode()}
    if auth:
        env["BENCH_AUTH"] = auth
    out = bench.procs.run(argv, "load", timeout=seconds + 60, env=env)
    line = next((ln for ln in out.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise BenchError(f"wrk printed no result line:\n{out[-1500:]}")
    raw = json.loads(line[len("BENCH ") :])
    lat = raw["latency_us"]
    return {
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "seconds": raw["duration_us"] / 1e6,
        "requests": raw["requests"],
        "errors": sum(raw["errors"].values()),
        "error_kinds": raw["errors"],
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "max_ms": lat["max"] / 1000,
    }


def wrk_scenario(
    bench: Bench, key: str, title: str, kind: str, connections: int, seconds: int
) -> None:
    """wrk against each target; also the CPU share the proxy used, and so its rate per
    core (the proxies are pinned to one core; at c64 the load core may be the limit)."""
    body = JSON_BODY if kind == "json" else SSE_BODY
    bench.results[key] = {}
    for target in TARGETS:
        port = bench.ports.of(target, kind)
        wrk(bench, port, body, connections, 1)  # warm-up: pools, caches
        pids = bench.pids(target) if target != "direct" else []
        cpu_start = cpu_seconds(pids)
        got = wrk(bench, port, body, connections, seconds)
        if pids:
            share = (cpu_seconds(pids) - cpu_start) / got["seconds"]
            got["cpu_percent"] = round(100 * share, 1)
            got["rps_per_core"] = round(got["rps"] / share, 1) if share > 0 else None
        bench.results[key][target] = got
        errors = f", {got['errors']} ERRORS {got['error_kinds']}" if got["errors"] else ""
        cpu = f"  proxy CPU {got['cpu_percent']:.0f}%" if pids else ""
        progress(
            f"{title} · {target:7}: {got['rps']:>9,.0f} req/s  p50 {got['p50_ms']:.2f} ms"
            f"  p99 {got['p99_ms']:.2f} ms{cpu}{errors}"
        )


def workers_scenario(bench: Bench, seconds: int) -> None:
    """7: `--workers 2`. With two cores the load generator cannot run elsewhere, so this
    measures what a core of gateway CPU serves with two workers (req/s over the workers'
    CPU-seconds per second) against one worker's figure from scenario 1. With a core per
    worker and the load elsewhere, two workers serve 2 x eff2 / eff1 of one."""
    one = bench.results.get("1_nonstream_c64", {}).get("gateway", {}).get("rps_per_core")
    port = free_ports(1)[0]
    routes, keys = bench.tmp / "routes.yaml", bench.tmp / "keys.yaml"
    env = gateway_env()
    argv = [*gateway_command(), "serve", "--routes", str(routes), "--keys", str(keys)]
    argv += ["--port", str(port), "--workers", "2", "--drain-seconds", "1"]
    log = bench.tmp / "workers2.log"
    proc = bench.procs.start(argv, "any", log=log, env=env)
    try:
        wait_answered(port, proc, log, time.monotonic() + 30)
        wrk(bench, port, JSON_BODY, 64, 1)
        pids = [proc.pid, *children(proc.pid)]
        cpu_start = cpu_seconds(pids)
        got = wrk(bench, port, JSON_BODY, 64, seconds)
        share = (cpu_seconds(pids) - cpu_start) / got["seconds"]
        got["cpu_percent"] = round(100 * share, 1)
        got["rps_per_core"] = round(got["rps"] / share, 1) if share > 0 else None
        if one and got["rps_per_core"]:
            got["projected_scaling"] = round(2 * got["rps_per_core"] / one, 2)
        bench.results["7_workers2"] = {"gateway": got}
        progress(
            f"7 --workers 2 c64: {got['rps']:,.0f} req/s sharing both cores with wrk and the "
            f"upstream, {got['cpu_percent']:.0f}% CPU, {got['rps_per_core'] or 0:,.0f} req/s "
            f"per gateway core; projected 2-core scaling {got.get('projected_scaling')}x"
        )
    finally:
        bench.procs.stop(proc)


LIMITED_KEYS = """\
keys:
  - name: open
    key: sk-bench-open
  - name: limited
    key: sk-bench-limited
    rpm: 1000000000
    tpm: 1000000000000
    token_quota: {tokens: 1000000000000, period: day}
    budget: {usd: 1000000000, period: month}
"""
PRICED_BODY = b'{"model":"bench-priced","messages":[{"role":"user","content":"hi"}]}'


def limits_scenario(bench: Bench, seconds: int) -> None:
    """8: SPEC §11's cost of limits. A priced entry, c64, for a key without limits and
    for one with rpm, tpm, a daily token quota and a monthly budget (never reached), on
    each state backend: memory only, the state file, and Redis (redis-server on the load
    core). Also the Redis round trips per request, from the gateway's own counter."""
    redis_server = find_binary("redis-server")
    if redis_server is None:
        progress("8 limits: skipped, no redis-server (apt-get install redis-server)")
        return
    keys = bench.tmp / "keys-limits.yaml"
    keys.write_text(LIMITED_KEYS)
    routes = bench.tmp / "routes.yaml"
    redis_port, port = free_ports(2)
    redis_log = bench.tmp / "redis.log"
    redis = bench.procs.start(
        [redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(bench.tmp)],
        "load", log=redis_log,
    )  # fmt: skip
    wait_listening(redis_port, redis, redis_log)
    results: dict[str, Any] = {}
    env = gateway_env()
    backends = {
        "none": "none",
        "file": str(bench.tmp / "limits.state"),
        "redis": f"redis://127.0.0.1:{redis_port}/0",
    }
    try:
        for backend, state in backends.items():
            argv = [*gateway_command(), "serve", "--routes", str(routes), "--keys", str(keys)]
            argv += ["--port", str(port), "--drain-seconds", "1", "--state", state]
            log = bench.tmp / f"limits-{backend}.log"
            proc = bench.procs.start(argv, "proxy", log=log, env=env)
            try:
                wait_listening(port, proc, log)
                for who in ("open", "limited"):
                    auth = f"Bearer sk-bench-{who}"
                    wrk(bench, port, PRICED_BODY, 64, 1, auth)  # warm-up
                    trips = _metric(port, "gateway_state_round_trips_total")
                    pids = [proc.pid]
                    cpu_start = cpu_seconds(pids)
                    got = wrk(bench, port, PRICED_BODY, 64, seconds, auth)
                    share = (cpu_seconds(pids) - cpu_start) / got["seconds"]
                    got["cpu_percent"] = round(100 * share, 1)
                    got["rps_per_core"] = round(got["rps"] / share, 1) if share > 0 else None
                    if backend == "redis" and got["requests"]:
                        more = _metric(port, "gateway_state_round_trips_total") - trips
                        got["redis_round_trips_per_request"] = round(more / got["requests"], 3)
                    results[f"{backend}/{who}"] = got
                    if got["errors"] >= got["requests"] / 100:
                        raise BenchError(f"8 limits: {backend}/{who}: {got['error_kinds']}"
                                         f" errors in {got['requests']}:\n{tail(log)}")  # fmt: skip
                    rt = got.get("redis_round_trips_per_request")
                    progress(
                        f"8 limits · state {backend:5} · {who:7} key: {got['rps']:>8,.0f} req/s"
                        f"  {got['rps_per_core'] or 0:>8,.0f} per core  p99 {got['p99_ms']:.2f} ms"
                        + (f"  {rt} Redis round trips/request" if rt is not None else "")
                        + (
                            f"  {got['errors']} ERRORS {got['error_kinds']}"
                            if got["errors"]
                            else ""
                        )
                    )
            finally:
                bench.procs.stop(proc)
    finally:
        bench.procs.stop(redis)
    for backend in backends:
        open_, limited = results[f"{backend}/open"], results[f"{backend}/limited"]
        if open_.get("rps_per_core") and limited.get("rps_per_core"):
            limited["per_core_vs_open_key"] = round(
                limited["rps_per_core"] / open_["rps_per_core"], 3
            )
    bench.results["8_limits"] = results


def _metric(port: int, name: str) -> float:
    """One counter's value from the gateway's /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def cross_core_floor(bench: Bench, seconds: int) -> None:
    """wrk at one connection against nginx answering by itself on the proxy core: what
    crossing cores and back costs on this machine, with no proxying at all."""
    port = bench.ports.nginx_floor
    wrk(bench, port, JSON_BODY, 1, 1)
    got = wrk(bench, port, JSON_BODY, 1, seconds)
    bench.results["2_cross_core_floor"] = {"direct": got}
    progress(
        f"2 c1 floor: nginx answering on the proxy core: {got['rps']:>9,.0f} req/s"
        f"  p50 {got['p50_ms']:.2f} ms  p99 {got['p99_ms']:.2f} ms"
    )


# ---------------------------------------------------------------- stream scenarios


def stream_client(
    bench: Bench,
    port: int,
    streams: int,
    concurrency: int,
    interval_ms: int,
    events: int,
    ramp: float,
    extra: list[str] | None = None,
) -> subprocess.Popen[bytes]:
    argv = [PYTHON, str(BENCH / "sse_client.py"), "--port", str(port)]
    argv += ["--streams", str(streams), "--concurrency", str(concurrency)]
    argv += ["--interval-ms", str(interval_ms), "--events", str(events)]
    argv += ["--ramp-seconds", str(ramp), *(extra or [])]
    return bench.procs.start(argv, "load", stdout=subprocess.PIPE)


def client_result(bench: Bench, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"the stream client did not finish within {timeout:.0f} s") from None
    finally:
        bench.procs.stop(proc)
    if proc.returncode != 0:
        raise BenchError(f"the stream client failed: {err.decode(errors='replace')[-1500:]}")
    result: dict[str, Any] = json.loads(out)
    return result


def paced_scenario(bench: Bench) -> None:
    """4: one stream at a time, an event every 20 ms; arrival minus the upstream's stamp."""
    streams, events = (2, 50) if bench.quick else (5, 50)
    bench.results["4_paced_stream"] = {}
    for target in TARGETS:
        port = bench.ports.of(target, "paced")
        proc = stream_client(bench, port, streams, 1, 20, events, 0.0)
        got = client_result(bench, proc, timeout=streams * events * 0.02 + 60)
        bench.results["4_paced_stream"][target] = got
        delay = got["delay_ms"]
        errors = f", {got['errors']} ERRORS {got['error_kinds']}" if got["errors"] else ""
        progress(
            f"4 paced stream, {streams}x{events} events · {target:7}: delay p50 {delay['p50']:.3f}"
            f" ms  p99 {delay['p99']:.3f} ms  max {delay['max']:.3f} ms"
            f"  bursts {got['bursts']}{errors}"
        )


def fresh_gateway(bench: Bench, name: str) -> subprocess.Popen[bytes]:
    log = bench.tmp / f"{name}.log"
    proc = bench.start_gateway(bench.ports.gateway, log)
    wait_answered(bench.ports.gateway, proc, log, time.monotonic() + 30)
    return proc


def slow_streams(bench: Bench) -> None:
    """5: many concurrent slow streams; errors, peak RSS and CPU of the proxy, delays."""
    streams, seconds = bench.slow_streams, bench.slow_seconds
    interval_ms, ramp = 100, 1.0
    events = seconds * 1000 // interval_ms
    bench.results["5_slow_streams"] = {}
    for target in TARGETS:
        if target == "gateway":  # a fresh process, so its VmHWM is this scenario's peak
            bench.procs.stop(bench.servers.pop("gateway"))
            bench.servers["gateway"] = fresh_gateway(bench, "gateway-slow")
        pids = bench.pids(target) if target != "direct" else []
        rss_start = rss_mib(pids)
        cpu_start = cpu_seconds(pids)
        began = time.monotonic()
        proc = stream_client(
            bench, bench.ports.of(target, "paced"), streams, streams, interval_ms, events, ramp
        )
        peak, next_note = rss_start, began + 10
        while proc.poll() is None and time.monotonic() - began < seconds + 90:
            time.sleep(0.2)
            peak = max(peak, rss_mib(pids))
            if time.monotonic() >= next_note:
                next_note += 10
                where = f", proxy RSS {rss_mib(pids):.1f} MiB" if pids else ""
                progress(f"5 slow streams · {target:7}: {time.monotonic() - began:.0f} s{where}")
        wall = time.monotonic() - began
        got = client_result(bench, proc, timeout=30)
        if pids:
            hwm = rss_mib(pids, "VmHWM") if target == "gateway" else peak
            got["rss_start_mib"] = round(rss_start, 1)
            got["peak_rss_mib"] = round(max(peak, hwm), 1)
            got["cpu_percent"] = round(100 * (cpu_seconds(pids) - cpu_start) / wall, 1)
        bench.results["5_slow_streams"][target] = got
        delay = got["delay_ms"]
        extra = (
            f"  peak RSS {got['peak_rss_mib']:.1f} MiB  CPU {got['cpu_percent']:.0f}%"
            if pids
            else ""
        )
        progress(
            f"5 {streams} slow streams, {seconds} s · {target:7}: errors {got['errors']}"
            f"  delay p50 {delay['p50']:.2f} ms  p99 {delay['p99']:.2f} ms{extra}"
            + (f"  {got['error_kinds']}" if got["errors"] else "")
        )


# ---------------------------------------------------------------- SPEC §15


def first_token(bench: Bench) -> None:
    """9: paced streams one after another on one keep-alive connection: time to first
    token (raw, and net of the upstream's own pacing time), per-frame delay, largest gap."""
    streams = 8 if bench.quick else 40
    bench.results["9_first_token"] = {}
    for target in TARGETS:
        port = bench.ports.of(target, "paced")
        argv = ["--role", "--keep-alive"]
        proc = stream_client(bench, port, 2, 1, PACED_INTERVAL_MS, 4, 0.0, argv)  # warm-up
        client_result(bench, proc, timeout=60)
        proc = stream_client(bench, port, streams, 1, PACED_INTERVAL_MS, PACED_EVENTS, 0.0, argv)
        got = client_result(bench, proc, timeout=streams * PACED_EVENTS * 0.02 + 60)
        bench.results["9_first_token"][target] = got
        errors = f", {got['errors']} ERRORS {got['error_kinds']}" if got["errors"] else ""
        ttft, net, delay = got["ttft_ms"], got["ttft_net_ms"], got["delay_ms"]
        progress(
            f"9 first token, {streams} streams x {PACED_EVENTS} deltas at c1 · {target:7}: "
            f"TTFT p50 {ttft['p50']:.3f} p99 {ttft['p99']:.3f} ms (net of the upstream "
            f"p50 {net['p50']:.3f} p99 {net['p99']:.3f}), frame delay p50 {delay['p50']:.3f}"
            f" p99 {delay['p99']:.3f} ms, largest gap {got['gap_ms']['max']:.1f} ms{errors}"
        )


def rungs(bench: Bench) -> None:
    """10: paced streams held at once, rung by rung, until a rung fails (a frame over
    100 ms late, a gap over 200 ms, or an error); direct's first failure is the rig's."""
    ladder = QUICK_RUNGS if bench.quick else RUNGS
    bench.results["10_rungs"] = {}
    for target in TARGETS:
        found: dict[str, Any] = {"rungs": {}, "held": 0, "failed_at": None}
        pids = bench.pids(target) if target != "direct" else []
        for rung in ladder:
            ramp = max(1.0, rung / 1024)
            cpu_start, began = cpu_seconds(pids), time.monotonic()
            proc = stream_client(
                bench, bench.ports.of(target, "paced"), rung, rung,
                PACED_INTERVAL_MS, PACED_EVENTS, ramp, ["--role"],
            )  # fmt: skip
            got = client_result(bench, proc, timeout=ramp + PACED_EVENTS * 0.02 + 90)
            if pids:
                got["cpu_percent"] = round(
                    100 * (cpu_seconds(pids) - cpu_start) / (time.monotonic() - began), 1
                )
            found["rungs"][str(rung)] = got
            cpu = f"  proxy CPU {got['cpu_percent']:.0f}%" if pids else ""
            progress(
                f"10 rung {rung:5} paced streams · {target:7}: "
                + ("held" if got["held"] else "FAILED")
                + f"  frame delay p99 {got['delay_ms']['p99']:.2f} ms max"
                f" {got['delay_ms']['max']:.1f} ms, {got['late_frames']} late,"
                f" largest gap {got['gap_ms']['max'] or 0:.0f} ms, {got['errors']} errors{cpu}"
            )
            if not got["held"]:
                found["failed_at"] = rung
                break
            found["held"] = rung
        bench.results["10_rungs"][target] = found


TARGETS_15: list[tuple[str, float, str]] = [
    ("added TTFT p50 ms (c1)", 0.15, "<="),
    ("added TTFT p99 ms (c1)", 0.3, "<="),
    ("added per-frame delay p99 ms (c1)", 0.5, "<="),
    ("added non-stream p99 ms (c1)", 0.25, "<="),
    ("paced streams held by one worker", 1000, ">="),
    ("non-stream req/s per core vs nginx", 0.25, ">="),
    ("stream req/s per core vs nginx", 0.25, ">="),
]


def spec15(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each SPEC §15 target: the gateway's value, nginx's for comparison, met or not."""

    def added(scenario: str, path: str, target: str) -> float | None:
        got, base = (
            metric(results, scenario, path, target),
            metric(results, scenario, path, "direct"),
        )
        return None if got is None or base is None else round(got - base, 3)

    def ratio(scenario: str) -> float | None:
        g = metric(results, scenario, "rps_per_core", "gateway")
        n = metric(results, scenario, "rps_per_core", "nginx")
        return round(g / n, 3) if g and n else None

    rungs_ = results.get("10_rungs", {})
    rig = (rungs_.get("direct") or {}).get("failed_at")
    values: dict[str, tuple[float | None, float | None]] = {
        "added TTFT p50 ms (c1)": tuple(  # type: ignore[dict-item]
            added("9_first_token", "ttft_net_ms.p50", t) for t in ("gateway", "nginx")
        ),
        "added TTFT p99 ms (c1)": tuple(  # type: ignore[dict-item]
            added("9_first_token", "ttft_net_ms.p99", t) for t in ("gateway", "nginx")
        ),
        "added per-frame delay p99 ms (c1)": tuple(  # type: ignore[dict-item]
            added("9_first_token", "delay_ms.p99", t) for t in ("gateway", "nginx")
        ),
        "added non-stream p99 ms (c1)": tuple(  # type: ignore[dict-item]
            added("2_nonstream_c1", "p99_ms", t) for t in ("gateway", "nginx")
        ),
        "paced streams held by one worker": (
            (rungs_.get("gateway") or {}).get("held"),
            (rungs_.get("nginx") or {}).get("held"),
        ),
        "non-stream req/s per core vs nginx": (ratio("1_nonstream_c64"), 1.0),
        "stream req/s per core vs nginx": (ratio("3_stream_c64"), 1.0),
    }
    rows = []
    for name, goal, sense in TARGETS_15:
        value, nginx = values[name]
        met = None if value is None else (value <= goal if sense == "<=" else value >= goal)
        note = ""
        if name.startswith("paced") and rig is not None and not met:
            gw_failed = (rungs_.get("gateway") or {}).get("failed_at")
            if gw_failed is None or gw_failed >= rig:
                met, note = None, f"rig-bound: direct itself fails at {rig}"
            else:
                note = f"direct fails at {rig} (the rig's limit)"
        elif name.startswith("paced") and rig is not None:
            note = f"direct fails at {rig} (the rig's limit)"
        rows.append(
            {"target": name, "goal": f"{sense} {goal:g}", "gateway": value, "nginx": nginx,
             "met": met, "note": note}
        )  # fmt: skip
    return rows


def print_spec15(rows: list[dict[str, Any]]) -> None:
    def shown(value: Any) -> str:
        return "-" if value is None else f"{value:g}"

    table_rows = [["SPEC §15 target", "goal", "gateway", "nginx", "met"]]
    for row in rows:
        met = {True: "met", False: "NOT MET", None: "unknown"}[row["met"]]
        table_rows.append(
            [row["target"], row["goal"], shown(row["gateway"]), shown(row["nginx"]),
             met + (f" ({row['note']})" if row["note"] else "")]
        )  # fmt: skip
    print_table(table_rows)
    print(
        "added = through the proxy minus direct at the same percentile; TTFT is net of the "
        "upstream's own time between reading the request and writing the first content "
        "(its 20 ms pacing timer), raw TTFT is in the JSON"
    )


# ---------------------------------------------------------------- cold start


def cold_starts(bench: Bench) -> None:
    """6: from exec to the first answered chat completion, then RSS after 1 s idle."""
    runs = 1 if bench.quick else 3
    found: dict[str, list[tuple[float, float]]] = {"nginx": [], "gateway": []}
    for i in range(runs):
        for target in found:
            port = free_ports(4)
            log = bench.tmp / f"cold-{target}-{i}.log"
            began = time.monotonic()
            if target == "gateway":
                proc = bench.start_gateway(port[0], log)
            else:
                proc, log = bench.start_nginx_proxy(f"cold-nginx-{i}", port)
            try:
                ready = wait_answered(port[0], proc, log, began + 30) - began
                time.sleep(1.0)
                idle = rss_mib([proc.pid, *children(proc.pid)])
            finally:
                bench.procs.stop(proc)
            found[target].append((ready * 1000, idle))
    bench.results["6_cold_start"] = {"direct": None}
    for target, samples in found.items():
        ready_ms = statistics.median(s[0] for s in samples)
        idle = statistics.median(s[1] for s in samples)
        bench.results["6_cold_start"][target] = {
            "ready_ms": round(ready_ms, 1),
            "idle_rss_mib": round(idle, 1),
            "runs": [{"ready_ms": round(r, 1), "idle_rss_mib": round(m, 1)} for r, m in samples],
        }
        progress(
            f"6 cold start · {target:7}: first answer after {ready_ms:.0f} ms,"
            f" idle RSS {idle:.1f} MiB (median of {runs})"
        )


# ---------------------------------------------------------------- the table

# (label, scenario, metric path, kind[, scenario for the direct column]): kind picks
# the formatting and the comparison columns.
ROWS: list[tuple[str, ...]] = [
    ("1 non-stream c64 req/s", "1_nonstream_c64", "rps", "rate"),
    ("1 non-stream c64 p50 ms", "1_nonstream_c64", "p50_ms", "ms"),
    ("1 non-stream c64 p99 ms", "1_nonstream_c64", "p99_ms", "ms"),
    ("1 proxy CPU %", "1_nonstream_c64", "cpu_percent", "count"),
    ("1 req/s per proxy core", "1_nonstream_c64", "rps_per_core", "rate"),
    ("2 non-stream c1 req/s", "2_nonstream_c1", "rps", "rate"),
    ("2 non-stream c1 p50 ms", "2_nonstream_c1", "p50_ms", "ms"),
    ("2 non-stream c1 p99 ms", "2_nonstream_c1", "p99_ms", "ms"),
    # The direct column here: one hop across cores (wrk to nginx answering on the proxy
    # core), so gw/direct is what the gateway adds beyond crossing cores.
    ("2 c1 p50 ms vs cross-core", "2_nonstream_c1", "p50_ms", "ms", "2_cross_core_floor"),
    ("2 c1 p99 ms vs cross-core", "2_nonstream_c1", "p99_ms", "ms", "2_cross_core_floor"),
    ("3 stream c64 req/s", "3_stream_c64", "rps", "rate"),
    ("3 stream c64 p50 ms", "3_stream_c64", "p50_ms", "ms"),
    ("3 stream c64 p99 ms", "3_stream_c64", "p99_ms", "ms"),
    ("3 proxy CPU %", "3_stream_c64", "cpu_percent", "count"),
    ("3 req/s per proxy core", "3_stream_c64", "rps_per_core", "rate"),
    ("4 paced event delay p50 ms", "4_paced_stream", "delay_ms.p50", "ms"),
    ("4 paced event delay p99 ms", "4_paced_stream", "delay_ms.p99", "ms"),
    ("4 paced bursts", "4_paced_stream", "bursts", "count"),
    ("5 slow streams errors", "5_slow_streams", "errors", "count"),
    ("5 slow event delay p50 ms", "5_slow_streams", "delay_ms.p50", "ms"),
    ("5 slow event delay p99 ms", "5_slow_streams", "delay_ms.p99", "ms"),
    ("5 slow bursts", "5_slow_streams", "bursts", "count"),
    ("5 slow first event p99 ms", "5_slow_streams", "first_event_ms.p99", "ms"),
    ("5 slow peak RSS MiB", "5_slow_streams", "peak_rss_mib", "size"),
    ("5 slow proxy CPU %", "5_slow_streams", "cpu_percent", "count"),
    ("9 TTFT c1 p50 ms", "9_first_token", "ttft_ms.p50", "ms"),
    ("9 TTFT c1 p99 ms", "9_first_token", "ttft_ms.p99", "ms"),
    ("9 TTFT net c1 p50 ms", "9_first_token", "ttft_net_ms.p50", "ms"),
    ("9 TTFT net c1 p99 ms", "9_first_token", "ttft_net_ms.p99", "ms"),
    ("9 frame delay c1 p50 ms", "9_first_token", "delay_ms.p50", "ms"),
    ("9 frame delay c1 p99 ms", "9_first_token", "delay_ms.p99", "ms"),
    ("9 largest gap c1 ms", "9_first_token", "gap_ms.max", "ms"),
    ("10 paced streams held", "10_rungs", "held", "count"),
    ("6 cold start ms", "6_cold_start", "ready_ms", "ms"),
    ("6 idle RSS MiB", "6_cold_start", "idle_rss_mib", "size"),
]


def metric(results: dict[str, Any], scenario: str, path: str, target: str) -> float | None:
    value: Any = (results.get(scenario) or {}).get(target)
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return float(value) if isinstance(value, int | float) else None


def cell(value: float | None, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "count":
        return f"{value:.0f}"
    if kind == "size":
        return f"{value:.1f}"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def compare(gateway: float | None, other: float | None, kind: str) -> str:
    if gateway is None or other is None:
        return "-"
    if kind in ("rate", "size"):
        return f"{gateway / other:.2f}x" if other else "-"
    if kind == "ms":
        return f"{gateway - other:+.2f} ms"
    return "-"


def table(results: dict[str, Any]) -> list[list[str]]:
    rows = [["scenario", "direct", "nginx", "gateway", "gw/direct", "gw/nginx"]]
    for label, scenario, path, kind, *direct_from in ROWS:
        d, n, g = (metric(results, scenario, path, t) for t in TARGETS)
        if direct_from:
            d = metric(results, direct_from[0], path, "direct")
        rows.append([label, cell(d, kind), cell(n, kind), cell(g, kind)])
        rows[-1] += [compare(g, d, kind), compare(g, n, kind)]
    return rows


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        first = row[0].ljust(widths[0])
        rest = "  ".join(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))
        print(f"{first}  {rest}")
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))


# ---------------------------------------------------------------- machine and results


def command_output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def machine(tools: dict[str, str]) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = status_like("/proc/meminfo", "MemTotal")
    commit = command_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = command_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "gateway"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": os_name(),
        "python": platform.python_version(),
        "nginx": command_output([tools["nginx"], "-v"]).replace("nginx version: ", ""),
        "wrk": command_output([tools["wrk"], "-v"]).split("\n", 1)[0].split(" [", 1)[0],
        "gateway_commit": commit + ("+changes" if dirty else ""),
        "load_before": [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]],
    }


def os_name() -> str:
    try:
        return platform.freedesktop_os_release().get("PRETTY_NAME", platform.system())
    except OSError:
        return platform.system()


def status_like(path: str, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def write_results(document: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{stamp}.json"
    text = json.dumps(document, indent=2) + "\n"
    path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    return path


# ---------------------------------------------------------------- main


def core_busy(seconds: float = 0.5) -> dict[str, float]:
    """Percent busy of each core over a short sample, before anything is started."""

    def sample() -> dict[str, tuple[int, int]]:
        found = {}
        for line in Path("/proc/stat").read_text().splitlines():
            name, *ticks = line.split()
            if name.startswith("cpu") and name != "cpu":
                values = [int(t) for t in ticks]
                idle = values[3] + (values[4] if len(values) > 4 else 0)
                found[name] = (sum(values), idle)
        return found

    before = sample()
    time.sleep(seconds)
    after = sample()
    busy = {}
    for name, (total, idle) in after.items():
        spent = total - before[name][0]
        busy[name] = round(100 * (1 - (idle - before[name][1]) / spent), 1) if spent else 0.0
    return busy


def warn_if_busy(busy: dict[str, float]) -> None:
    if any(value > 10 for value in busy.values()):
        shown = ", ".join(f"{name} {value:.0f}%" for name, value in busy.items())
        progress(
            f"warning: cores already busy before the run ({shown}): other work on this "
            "machine makes the figures noisy"
        )


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> dict[str, Any]:
    tools = ensure_tools()
    info = machine(tools)
    progress(
        f"{info['cpu']}, {info['cores']} cores, {info['os']}, Python {info['python']}, "
        f"nginx {info['nginx']}, gateway {info['gateway_commit']}"
    )
    info["busy_before"] = core_busy()
    warn_if_busy(info["busy_before"])
    quick = args.quick
    bench = Bench(
        tmp=tmp,
        procs=procs,
        tools=tools,
        ports=Ports.pick(),
        quick=quick,
        slow_streams=args.slow_streams or (100 if quick else 1000),
        slow_seconds=args.slow_seconds or (5 if quick else 30),
    )
    bench.write_gateway_files()
    bench.start_upstream()
    progress("upstreams up: nginx (fixed JSON and SSE) and the paced SSE server")
    if not args.only:
        cold_starts(bench)
    ports = [bench.ports.nginx_json, bench.ports.nginx_sse, bench.ports.nginx_paced]
    ports.append(bench.ports.nginx_floor)
    proc, log = bench.start_nginx_proxy("proxy", ports)
    for port in ports:
        wait_listening(port, proc, log)
    bench.servers["nginx"] = proc
    bench.servers["gateway"] = fresh_gateway(bench, "gateway")
    progress("nginx proxy and gateway up")
    verify(bench)
    long, short = (2, 2) if quick else (10, 5)
    if args.only == "latency":  # SPEC §15 alone: c1 latencies, rungs, per-core rates
        wrk_scenario(bench, "2_nonstream_c1", "2 non-stream c1 ", "json", 1, short)
        first_token(bench)
        rungs(bench)
        wrk_scenario(bench, "1_nonstream_c64", "1 non-stream c64", "json", 64, long)
        wrk_scenario(
            bench, "3_stream_c64", f"3 stream ({SSE_EVENT_COUNT} events) c64", "sse", 64, long
        )
        return _document(bench, info, quick, procs)
    wrk_scenario(bench, "1_nonstream_c64", "1 non-stream c64", "json", 64, long)
    if args.only == "limits":
        limits_scenario(bench, long)
        return _document(bench, info, quick, procs)
    wrk_scenario(bench, "2_nonstream_c1", "2 non-stream c1 ", "json", 1, short)
    cross_core_floor(bench, short)
    wrk_scenario(bench, "3_stream_c64", f"3 stream ({SSE_EVENT_COUNT} events) c64", "sse", 64, long)
    paced_scenario(bench)
    first_token(bench)
    rungs(bench)
    slow_streams(bench)
    workers_scenario(bench, long)
    limits_scenario(bench, long)
    return _document(bench, info, quick, procs)


def _document(bench: Bench, info: dict[str, Any], quick: bool, procs: Processes) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": info,
        "pinning": {"proxy_core": procs.cores[0], "load_core": procs.cores[1]}
        if procs.cores
        else None,
        "settings": {
            "slow_streams": bench.slow_streams,
            "slow_seconds": bench.slow_seconds,
            "sse_events": SSE_EVENT_COUNT,
        },
        "scenarios": bench.results,
        "table": table(bench.results),
        "spec15": spec15(bench.results),
        "seconds": round(time.monotonic() - STARTED, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="gateway vs nginx vs direct, on this machine")
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: seconds per scenario, 100 slow streams"
    )
    parser.add_argument("--slow-streams", type=int, help="scenario 5 streams (default 1000)")
    parser.add_argument(
        "--only",
        choices=["limits", "latency"],
        help="limits: scenario 1 and scenario 8 alone (the cost of key limits by backend); "
        "latency: SPEC §15's figures alone (scenarios 1, 2, 3, 9, 10)",
    )
    parser.add_argument(
        "--slow-seconds", type=int, help="scenario 5 duration in seconds (default 30; 15 is fine)"
    )
    # `make bench ARGS=--quick`: make puts a command-line variable in the environment.
    given = sys.argv[1:] or shlex.split(os.environ.get("ARGS", ""))
    args = parser.parse_args(given)
    raise_fd_limit()
    cores = pick_cores()
    if cores is not None:
        os.sched_setaffinity(0, {cores[1]})  # this script's polling stays off the proxy core
    procs = Processes(cores)
    try:
        with interrupt_on_sigterm(), tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
            Path(tmp).chmod(0o755)  # for nginx workers running as nobody
            try:
                document = run(args, procs, Path(tmp))
            finally:
                procs.stop_all()
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    print()
    print(
        f"{document['machine']['cpu']} · {document['machine']['cores']} cores · "
        f"{document['date']} · gateway {document['machine']['gateway_commit']}"
        + (" · QUICK (smoke) run" if document["quick"] else "")
    )
    busy = document["machine"]["busy_before"]
    if any(value > 10 for value in busy.values()):
        shown = ", ".join(f"{name} {value:.0f}%" for name, value in busy.items())
        print(f"(cores already busy before the run: {shown}; figures are noisy)")
    print_table(document["table"])
    print(
        "gw/direct, gw/nginx: ratio for rates and sizes, difference for times; "
        "proxy = the nginx proxy or the gateway (pinned to one core)"
    )
    print()
    print_spec15(document["spec15"])
    path = write_results(document)
    print(f"\nresults: {path.relative_to(ROOT)} (also bench/results/latest.json)")
    print(f"done in {document['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
