"""`make bench-instructions`: user-space instructions per relayed request, counted by callgrind.

Wall-clock throughput on a small shared VM moves by tens of percent from one minute to
the next; the number of instructions the gateway executes per request does not. This
starts the fast nginx upstream of `make bench` (bench/run.py) on 127.0.0.1 and, for each
case, one gateway under `valgrind --tool=callgrind` (default log level, access log to
/dev/null), answers one GET /healthz, relays N requests over 8 keep-alive connections,
stops it with SIGINT and reads the instruction total callgrind wrote. Cases: a baseline
of 0 requests (start-up and shutdown), N chat completions, N streams (22 events each);
per request = (case total - baseline total) / N.

The same three cases also run for nginx as a `proxy_pass` in front of the same upstream
(bench/nginx_proxy.conf.in, one process: `daemon off; master_process off;`), counted the
same way, and the table shows the gateway's JSON and stream cost as "x nginx": a ratio
that does not drift with the VM's speed (user-space instructions only, both sides).

With --against REV the same cases run with the gateway package of that git revision
(`git archive REV gateway`, imported through PYTHONPATH), and the table shows new/old.
Results go to bench/results/instructions-<UTC time>.json and instructions-latest.json.

Usage: bench/instructions.py [--quick] [--against REV] [--requests N] [--streams N]
                             [--connections N] [--profiles DIR] [--keyed] [--curves]
                             [--paced] [--no-nginx]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# bench/run.py (`make bench`): upstream bodies, process handling, progress output.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # found through the sys.path entry above

BenchError = run.BenchError
ROOT = run.ROOT
RESULTS = run.RESULTS
PYTHON = sys.executable
CALLGRIND_FILE = "cg.%p"  # %p: the pid; valgrind runs the gateway in its own process
HEALTH_SECONDS = 60.0  # start-up under valgrind takes ~10 s on a small VM
STOP_SECONDS = 120.0  # graceful shutdown plus callgrind writing its output
REQUEST_SECONDS = 60.0  # one request under valgrind, queued behind the other connections
HASH_SEED = "0"  # the same str hashes (dict and set layouts) in every case
DEFAULT_COUNTS = {"json": 2000, "stream": 1000}
QUICK_COUNTS = {"json": 300, "stream": 150}
KINDS = ("json", "stream")
# The same stream for a key with a token limit (usage counted, stream_options injected):
# SPEC §8 bounds it at 1.5x the plain stream per event. Its own keys file, so the other
# cases keep running without auth, as in earlier tables.
LIMITED = "stream-limited"
LIMITED_SECRET = "sk-bench-limited"
# --keyed: the JSON and stream cases sent with a key that has no limits (keys-plain.yaml),
# as a gateway with keys serves them; without it they run keyless (the loopback
# sidecar, `make run`), which pays the sidecar's Host/Origin/Content-Type gate.
PLAIN_SECRET = "sk-bench-plain"
BUDGET_SECRET = "sk-bench-budget"
# --curves (SPEC §8: costs grow with the work): the same JSON request with bodies from
# 1 KiB to 8 MiB, streams longer or with larger events, and an exact slug looked up among
# 5,000 wildcard patterns. They run on their own routes file (5,000 patterns), so they
# have their own baseline.
CURVE_BASELINE = "curves-baseline"
WILDCARDS = 5000
LONG_TOKENS = 200  # content events of the long stream
BIG_PAD = 16 * 1024  # extra characters in each content event of the big-event stream
# A paced stream (bench/paced_upstream.py): one event per upstream read, as a model sends
# them, where nginx's fixed streams arrive in a read or two. Two lengths; the difference
# over the events between them is the cost of one relayed event (SPEC §15).
PACED_SHORT, PACED_LONG = 4, 64  # content events
PACED_MS = 2  # between events: well over one event's relay under valgrind (~0.5 ms)


def padded_body(size: int) -> bytes:
    head = b'{"model":"bench-json","messages":[{"role":"user","content":"'
    tail = b'"}]}'
    return head + b"x" * max(0, size - len(head) - len(tail)) + tail


@dataclass(frozen=True)
class Curve:
    body: bytes
    quick: int  # requests under --quick
    count: int  # requests otherwise
    per: str  # the unit the table divides by: "KiB" of request body or "event"
    units: float  # that unit's count per request
    path: str = run.CHAT_PATH
    secret: str | None = None  # sent as the key (keys-budget.yaml), with a --state file
    state: str = "file"  # or "redis": a redis-server of its own on the load core


def typed_events(kind: str) -> list[str]:
    """22 events of a Responses or a Messages stream, with chat's 18 text deltas."""

    def event(name: str, **data: Any) -> str:
        return f"event: {name}\ndata: " + json.dumps({"type": name, **data},
                                                     separators=(",", ":")) + "\n\n"  # fmt: skip

    model = run.UPSTREAM_MODEL
    if kind == "responses":
        response = {"id": "resp_bench", "object": "response", "created_at": 1700000000,
                    "status": "in_progress", "model": model, "output": []}  # fmt: skip
        item = {"id": "msg_bench", "type": "message", "role": "assistant", "content": []}
        events = [event("response.created", sequence_number=0, response=response)]
        events.append(event("response.output_item.added", output_index=0, item=item))
        events += [
            event(
                "response.output_text.delta",
                item_id="msg_bench",
                output_index=0,
                content_index=0,
                delta=f"token{i} ",
            )
            for i in range(18)
        ]
        events.append(event("response.output_item.done", output_index=0, item=item))
        usage = {"input_tokens": 9, "output_tokens": 18, "total_tokens": 27}
        done = {**response, "status": "completed", "usage": usage}
        events.append(event("response.completed", sequence_number=21, response=done))
        return events
    message = {"id": "msg_bench", "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": None,
               "usage": {"input_tokens": 9, "output_tokens": 1}}  # fmt: skip
    events = [event("message_start", message=message)]
    events.append(event("content_block_start", index=0, content_block={"type": "text",
                                                                      "text": ""}))  # fmt: skip
    events += [
        event("content_block_delta", index=0, delta={"type": "text_delta", "text": f"token{i} "})
        for i in range(17)
    ]
    events.append(event("content_block_stop", index=0))
    events.append(event("message_delta", delta={"stop_reason": "end_turn"},
                        usage={"output_tokens": 18}))  # fmt: skip
    events.append(event("message_stop"))
    return events


def paced_body(events: int) -> bytes:
    return (
        b'{"model":"bench-paced","stream":true,"messages":[{"role":"user","content":"hi"}],'
        b'"bench_events":%d,"bench_interval_ms":%d}' % (events, PACED_MS)
    )


PACED = {n: f"paced stream, {n} content events one per read" for n in (PACED_SHORT, PACED_LONG)}

CURVES: dict[str, Curve] = {
    "body 1 KiB": Curve(padded_body(1024), 100, 500, "KiB", 1),
    "body 64 KiB": Curve(padded_body(64 * 1024), 50, 200, "KiB", 64),
    "body 1 MiB": Curve(padded_body(1024 * 1024), 10, 30, "KiB", 1024),
    "body 8 MiB": Curve(padded_body(8 * 1024 * 1024), 3, 6, "KiB", 8192),
    f"stream {LONG_TOKENS + 4} events": Curve(
        b'{"model":"bench-long","stream":true,"messages":[{"role":"user","content":"hi"}]}',
        30,
        150,
        "event",
        LONG_TOKENS + 4,
    ),
    "stream 22 events of 16 KiB": Curve(
        b'{"model":"bench-big","stream":true,"messages":[{"role":"user","content":"hi"}]}',
        30,
        150,
        "event",
        22,
    ),
    # The same chat stream served from a file like the two below (nginx's static answer
    # has a few more headers than its `return`): the fair baseline for them.
    "chat stream 22 events (file)": Curve(
        b'{"model":"bench-chat","stream":true,"messages":[{"role":"user","content":"hi"}]}',
        30,
        300,
        "event",
        22,
    ),
    "responses stream 22 events": Curve(
        b'{"model":"bench-resp","stream":true,"input":"hi"}', 30, 300, "event", 22, "/v1/responses"
    ),
    "messages stream 22 events": Curve(
        b'{"model":"bench-msg","stream":true,"max_tokens":20,'
        b'"messages":[{"role":"user","content":"hi"}]}',
        30,
        300,
        "event",
        22,
        "/v1/messages",
    ),
    # SPEC §11 on the file backend: the same JSON request at a priced entry, for a key
    # with rpm, a daily token quota and a monthly budget, its spend synced to a file.
    "JSON, priced, budget key, state file": Curve(
        b'{"model":"bench-json-priced","messages":[{"role":"user","content":"hi"}]}',
        100,
        500,
        "request",
        1,
        secret=BUDGET_SECRET,
    ),
    # The same on the Redis backend: one check-and-take script call per request.
    "JSON, priced, budget key, Redis": Curve(
        b'{"model":"bench-json-priced","messages":[{"role":"user","content":"hi"}]}',
        100,
        500,
        "request",
        1,
        secret=BUDGET_SECRET,
        state="redis",
    ),
    "JSON, priced entry, no key limits": Curve(
        b'{"model":"bench-json-priced","messages":[{"role":"user","content":"hi"}]}',
        100,
        500,
        "request",
        1,
    ),
    f"JSON among {WILDCARDS:,} wildcards": Curve(
        b'{"model":"wild4999/x","messages":[{"role":"user","content":"hi"}]}',
        100,
        500,
        "request",
        1,
    ),
    # + finish, usage and [DONE]
    **{name: Curve(paced_body(n), 30, 100, "event", n + 3) for n, name in PACED.items()},
}


# ---------------------------------------------------------------- tools


def ensure_tools() -> dict[str, str]:
    """valgrind and nginx; `make bench-instructions` installs them when missing."""
    tools = {name: run.find_binary(name) for name in ("valgrind", "nginx")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        names = " ".join(missing)
        raise BenchError(
            f"{' and '.join(missing)} not found: run `make bench-instructions` (it installs "
            f"them) or `apt-get install -y --no-install-recommends {names}` (as root)"
        )
    return {name: str(path) for name, path in tools.items()}


def git(*args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"`git {' '.join(args)}` failed: {done.stderr.strip()[-500:]}")
    return done.stdout.strip()


# ---------------------------------------------------------------- the gateway trees


@dataclass
class Tree:
    """One gateway package to measure: the working tree, or a revision archived to tmp."""

    key: str  # "tree" or "rev-<short hash>": names its case folders and profiles
    label: str  # for the table: "103d9d4", "103d9d4+changes", "9784982", ...
    commit: str  # full hash (of HEAD for the working tree)
    path: Path  # the folder holding gateway/: what PYTHONPATH points at
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PYTHON"))}
        env["PYTHONPATH"] = str(self.path)
        env["PYTHONHASHSEED"] = HASH_SEED
        return env


def working_tree() -> Tree:
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", "gateway")
    label = f"{head}+changes" if dirty else head
    return Tree("tree", label, git("rev-parse", "HEAD"), ROOT)


def revision_tree(rev: str, tmp: Path) -> Tree:
    """`git archive REV gateway | tar -x -C tmp/rev-<hash>`."""
    try:
        commit = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BenchError:
        commit = ""
    if not commit:
        raise BenchError(
            f"--against {rev}: not a revision of this repository; give a commit, tag or "
            "branch (see `git log --oneline`)"
        )
    short = git("rev-parse", "--short", commit)
    folder = tmp / f"rev-{short}"
    folder.mkdir()
    archive = tmp / f"rev-{short}.tar"
    git("archive", "--format=tar", "-o", str(archive), commit, "gateway")
    done = subprocess.run(
        ["tar", "-x", "-f", str(archive), "-C", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"unpacking `git archive {short} gateway` failed: {done.stderr[-500:]}")
    if not (folder / "gateway" / "__main__.py").is_file():
        raise BenchError(f"revision {short} has no gateway/__main__.py: nothing to compare with")
    return Tree(folder.name, short if short == rev else f"{rev} ({short})", commit, folder)


def prepare(tree: Tree, workdir: Path) -> None:
    """Compile the package (so no case pays for compiling it), then check that
    `python -m gateway` really imports it from tree.path with this environment."""
    env = tree.env()
    done = subprocess.run(
        [PYTHON, "-m", "compileall", "-q", str(tree.path / "gateway")],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"compiling {tree.path / 'gateway'} failed:\n{done.stdout}{done.stderr}")
    probe = "import gateway, gateway.cli; print(gateway.__file__)"
    done = subprocess.run(
        [PYTHON, "-c", probe], cwd=workdir, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(
            f"{PYTHON} cannot import the gateway from {tree.path}:\n{done.stderr[-1500:]}\n"
            "run this with the venv's Python: `make bench-instructions` or "
            "`.venv/bin/python bench/instructions.py`"
        )
    found = Path(done.stdout.strip()).resolve().parent
    want = (tree.path / "gateway").resolve()
    if found != want:
        raise BenchError(
            f"{tree.label}: Python imports the gateway from {found}, not from {want}; "
            "is something in PYTHONSTARTUP, a .pth file or sitecustomize putting it first?"
        )


# ---------------------------------------------------------------- the upstream


def start_upstream(procs: run.Processes, tools: dict[str, str], tmp: Path) -> dict[str, int]:
    """bench/nginx_upstream.conf.in with bench/run.py's JSON body and SSE events."""
    ports = dict(zip(KINDS, run.free_ports(2), strict=True))
    prefix = tmp / "upstream"
    prefix.mkdir()
    prefix.chmod(0o755)  # workers run as nobody when the master runs as root
    values = {
        "PREFIX": prefix,
        "JSON_PORT": ports["json"],
        "SSE_PORT": ports["stream"],
        "JSON_BODY": run.nginx_string(run.completion_body()),
        "SSE_BODY": run.nginx_string("".join(run.sse_events())),
    }
    text = (run.BENCH / "nginx_upstream.conf.in").read_text()
    # The curves' streams are too long for a `return` string (4 KiB): they are files, which
    # nginx serves to a POST through error_page (its redirect turns the method into GET).
    sse_server = "listen 127.0.0.1:@SSE_PORT@ backlog=4096;\n"
    extra = f"        location /files/ {{\n            root {prefix};\n"
    extra += "            default_type text/event-stream;\n        }\n"
    for name, events in (
        ("long", run.sse_events(tokens=LONG_TOKENS)),
        ("big", run.sse_events(pad=BIG_PAD)),
        ("chat", run.sse_events()),
        ("resp", typed_events("responses")),
        ("msg", typed_events("messages")),
    ):
        (prefix / "files").mkdir(exist_ok=True)
        (prefix / "files" / f"{name}.sse").write_text("".join(events))
        extra += (
            f"        location /{name}/ {{\n            error_page 405 =200 /files/{name}.sse;\n"
        )
        extra += "            return 405;\n        }\n"
    text = text.replace(sse_server, sse_server + extra)
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    conf = prefix / "nginx.conf"
    conf.write_text(text)
    log = prefix / "error.log"
    argv = [tools["nginx"], "-p", str(prefix), "-e", str(log), "-c", str(conf)]
    proc = procs.start([*argv, "-g", "daemon off;"], "load", log=prefix / "stderr.log")
    for port in ports.values():
        run.wait_listening(port, proc, log)
    # The paced streams' upstream (the curves'), beside nginx on the load core.
    ports["paced"] = run.free_ports(1)[0]
    log = prefix / "paced.log"
    argv = [PYTHON, str(run.BENCH / "paced_upstream.py"), "--port", str(ports["paced"])]
    paced = procs.start(argv, "load", log=log)
    run.wait_listening(ports["paced"], paced, log)
    return ports


def routes_text(ports: dict[str, int], curves: bool) -> str:
    """The two models measured here (as bench/run.py's Bench.write_gateway_files); with
    `curves`, also the long and big-event streams and 5,000 wildcard patterns."""
    providers = [("bench-json", f"{ports['json']}/v1"), ("bench-sse", f"{ports['stream']}/v1")]
    if curves:
        providers += [("bench-long", f"{ports['stream']}/long/v1")]
        providers += [("bench-big", f"{ports['stream']}/big/v1")]
        providers += [("bench-chat", f"{ports['stream']}/chat/v1")]
        providers += [("bench-resp", f"{ports['stream']}/resp/v1")]
        providers += [("bench-msg", f"{ports['stream']}/msg/v1")]
        providers += [("bench-paced", f"{ports['paced']}/v1")]
    lines = ["providers:"]
    apis = {"bench-resp": "[responses]", "bench-msg": "[messages]"}
    for name, where in providers:
        lines += [f"  {name}:", f"    base_url: http://127.0.0.1:{where}"]
        if name in apis:
            lines.append(f"    apis: {apis[name]}")
    lines.append("models:")
    for name, _ in providers:
        lines += [f"  {name}:", "    providers:", f"      - provider: {name}"]
        lines.append(f"        model: {run.UPSTREAM_MODEL}")
    if curves:
        lines += ["  bench-json-priced:", "    providers:", "      - provider: bench-json",
                  f"        model: {run.UPSTREAM_MODEL}",
                  "        price: {input: 0.15, output: 0.6, cached_input: 0.075}"]  # fmt: skip
        for i in range(WILDCARDS):
            lines.append(f"  wild{i}/*: {{providers: [{{provider: bench-json, model: '{{1}}'}}]}}")
    return "\n".join(lines) + "\n"


def write_gateway_files(tmp: Path, ports: dict[str, int]) -> tuple[Path, Path]:
    routes = tmp / "routes.yaml"
    routes.write_text(routes_text(ports, curves=False))
    (tmp / "routes-curves.yaml").write_text(routes_text(ports, curves=True))
    keys = tmp / "keys.yaml"
    keys.write_text("keys: []\n")
    (tmp / "keys-budget.yaml").write_text(
        f"keys:\n  - name: budget\n    key: {BUDGET_SECRET}\n    rpm: 100000000\n"
        "    token_quota: {tokens: 1000000000000, period: day}\n"
        "    budget: {usd: 1000000, period: month}\n"
    )
    (tmp / "keys-plain.yaml").write_text(f"keys:\n  - name: plain\n    key: {PLAIN_SECRET}\n")
    limited = tmp / "keys-limited.yaml"
    limited.write_text(
        f"keys:\n  - name: limited\n    key: {LIMITED_SECRET}\n    tpm: 1000000000\n"
    )
    return routes, keys


# ---------------------------------------------------------------- the load


def check_json(status: int, body: bytes) -> str | None:
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    if b'"model":"bench-json"' not in body:
        return f"JSON answer without the client's model name: {body[:200]!r}"
    return None


def check_stream(status: int, body: bytes) -> str | None:
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data:")]
    if (
        len(events) != run.SSE_EVENT_COUNT
        or events[-1] != b"data: [DONE]"
        or b'"model":"bench-sse"' not in events[1]
    ):
        return f"stream of {len(events)} events (want {run.SSE_EVENT_COUNT}): {body[:200]!r}"
    return None


def check_limited_stream(status: int, body: bytes) -> str | None:
    """The stream less its usage-only chunk: the gateway asked for usage on the key's
    behalf (to count tokens), so it keeps that chunk from a client that did not."""
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data:")]
    if len(events) != run.SSE_EVENT_COUNT - 1 or any(b'"usage"' in e for e in events):
        return f"stream of {len(events)} events (want {run.SSE_EVENT_COUNT - 1}, no usage)"
    return None


def curve_check(curve: Curve) -> Callable[[int, bytes], str | None]:
    """The answer carries the client's model name (and, for a stream, every event)."""
    model = model_of(curve.body)

    def check(status: int, body: bytes) -> str | None:
        if status != 200:
            return f"status {status}: {body[:200]!r}"
        if b'"model":' + json.dumps(model).encode() not in body:
            return f"answer without the client's model name {model}: {body[:200]!r}"
        if curve.per == "event":
            events = [e for e in body.split(b"\n\n") if b"data:" in e]
            done = curve.path != run.CHAT_PATH or events[-1] == b"data: [DONE]"
            if len(events) != curve.units or not done:
                return f"stream of {len(events)} events (want {curve.units:.0f})"
        return None

    return check


def model_of(body: bytes) -> str:
    model = json.loads(body)["model"]
    assert isinstance(model, str)
    return model


def check_nginx_json(status: int, body: bytes) -> str | None:
    """nginx relays the upstream's answer as it is: the upstream's model name."""
    if status != 200 or f'"model":"{run.UPSTREAM_MODEL}"'.encode() not in body:
        return f"status {status}: {body[:200]!r}"
    return None


def check_nginx_stream(status: int, body: bytes) -> str | None:
    events = [e for e in body.split(b"\n\n") if e.startswith(b"data:")]
    if status != 200 or len(events) != run.SSE_EVENT_COUNT or events[-1] != b"data: [DONE]":
        return f"status {status}, stream of {len(events)} events: {body[:200]!r}"
    return None


NGINX = {"json": "nginx json", "stream": "nginx stream"}  # nginx's cases, by the gateway's

BODIES: dict[str, tuple[bytes, Callable[[int, bytes], str | None]]] = {
    NGINX["json"]: (run.JSON_BODY, check_nginx_json),
    NGINX["stream"]: (run.SSE_BODY, check_nginx_stream),
    "json": (run.JSON_BODY, check_json),
    "stream": (run.SSE_BODY, check_stream),
    LIMITED: (run.SSE_BODY, check_limited_stream),
    **{name: (curve.body, curve_check(curve)) for name, curve in CURVES.items()},
}


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes, bool]:
    """One request on a keep-alive connection: (status, body, connection still usable)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {}
    for line in head[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    keep = headers.get("connection") != "close"
    if "chunked" in headers.get("transfer-encoding", ""):
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                break
            chunks.append((await reader.readexactly(size + 2))[:-2])
        return status, b"".join(chunks), keep
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"])), keep
    return status, await reader.read(), False  # delimited by the close


async def load(
    port: int, kind: str, count: int, connections: int, keyed: bool = False
) -> tuple[int, list[str]]:
    """`count` POSTs over `connections` keep-alive connections: (failures, first reasons)."""
    body, check = BODIES[kind]
    auth = f"authorization: Bearer {LIMITED_SECRET}\r\n" if kind == LIMITED else ""
    if keyed and kind in KINDS:
        auth = f"authorization: Bearer {PLAIN_SECRET}\r\n"
    if kind in CURVES and CURVES[kind].secret is not None:
        auth = f"authorization: Bearer {CURVES[kind].secret}\r\n"
    path = CURVES[kind].path if kind in CURVES else run.CHAT_PATH
    request = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n{auth}"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    remaining = count
    failures = 0
    reasons: list[str] = []

    async def connection() -> None:
        nonlocal remaining, failures
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while remaining > 0:
                remaining -= 1
                keep = False
                try:
                    async with asyncio.timeout(REQUEST_SECONDS):
                        if reader is None or writer is None:
                            reader, writer = await asyncio.open_connection("127.0.0.1", port)
                        status, answer, keep = await exchange(reader, writer, request)
                    problem = check(status, answer)
                except (
                    OSError,
                    TimeoutError,
                    ValueError,
                    IndexError,
                    asyncio.IncompleteReadError,
                ) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
                except asyncio.LimitOverrunError as exc:
                    problem = f"response head too long: {exc}"
                if problem is not None:
                    failures += 1
                    if len(reasons) < 5:
                        reasons.append(problem)
                if not keep and writer is not None:
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    await asyncio.gather(*(connection() for _ in range(connections)))
    return failures, reasons


# ---------------------------------------------------------------- one case


@dataclass
class Context:
    procs: run.Processes
    tools: dict[str, str]
    tmp: Path
    routes: Path
    keys: Path
    counts: dict[str, int]
    connections: int
    profiles: Path | None
    curves: bool
    keyed: bool = False
    paced: bool = False


def wait_healthz(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    """One GET /healthz, retried only while nothing listens (the gateway binds its port
    before it loads, so a connection made early waits in the backlog until it answers)."""
    deadline = time.monotonic() + HEALTH_SECONDS
    while (left := deadline - time.monotonic()) > 0:
        if proc.poll() is not None:
            raise BenchError(
                f"the gateway exited with {proc.returncode} while starting:\n{run.tail(log)}"
            )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=left)
        try:
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            status, body = response.status, response.read()
        except ConnectionRefusedError:
            time.sleep(0.1)
            continue
        except TimeoutError:
            break
        except (OSError, http.client.HTTPException):
            time.sleep(0.1)  # reset while starting; proc.poll() above tells
            continue
        finally:
            conn.close()
        if status == 200:
            return
        raise BenchError(f"GET /healthz answered {status}: {body[:300]!r}\n{run.tail(log)}")
    raise BenchError(
        f"the gateway under valgrind did not answer /healthz within {HEALTH_SECONDS:.0f} s "
        f"(is the machine busy?):\n{run.tail(log)}"
    )


def stop_gateway(procs: run.Processes, proc: subprocess.Popen[bytes], log: Path) -> None:
    os.kill(proc.pid, signal.SIGINT)
    try:
        proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        procs.stop(proc)
        raise BenchError(
            f"the gateway did not exit within {STOP_SECONDS:.0f} s of SIGINT:\n{run.tail(log)}"
        ) from None
    procs.stop(proc)  # forget it; it has exited
    if proc.returncode != 0:
        raise BenchError(f"the gateway exited with {proc.returncode} on SIGINT:\n{run.tail(log)}")


def callgrind_total(folder: Path, log: Path) -> int:
    """The `totals:` line of the one callgrind output (or `summary:` if it has none)."""
    files = sorted(folder.glob("cg.*"))
    if len(files) != 1:
        raise BenchError(
            f"expected one callgrind output in {folder}, found {len(files)}:\n{run.tail(log)}"
        )
    found: dict[str, int] = {}
    with files[0].open(errors="replace") as lines:
        for line in lines:
            if line.startswith(("totals:", "summary:")):
                key, value = line.split(":", 1)
                found[key] = int(value.split()[0])
    total = found.get("totals", found.get("summary"))
    if total is None:
        raise BenchError(f"{files[0]} has no `totals:` or `summary:` line:\n{run.tail(log)}")
    return total


def start_redis(procs: run.Processes, folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server for one case, on the load core; its URL for --state."""
    binary = run.find_binary("redis-server")
    if binary is None:
        raise BenchError("redis-server not found: apt-get install redis-server, and run again")
    port = run.free_ports(1)[0]
    log = folder / "redis.log"
    proc = procs.start(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", str(folder)],
        "load", log=log,
    )  # fmt: skip
    run.wait_listening(port, proc, log)
    return proc, f"redis://127.0.0.1:{port}/0"


def run_case(ctx: Context, tree: Tree, case: str) -> dict[str, Any]:
    """One gateway under callgrind: start, /healthz, N requests of one kind, SIGINT."""
    count = ctx.counts.get(case, 0)
    folder = ctx.tmp / f"{tree.key}-{case}"
    folder.mkdir()
    log = folder / "stderr.log"
    port = run.free_ports(1)[0]
    argv = [
        ctx.tools["valgrind"],
        "--tool=callgrind",
        f"--callgrind-out-file={folder / CALLGRIND_FILE}",
    ]
    routes = ctx.routes
    if case == CURVE_BASELINE or case in CURVES:
        routes = routes.with_name("routes-curves.yaml")
    argv += [PYTHON, "-m", "gateway", "serve", "--routes", str(routes)]
    keys = ctx.keys.with_name("keys-limited.yaml") if case == LIMITED else ctx.keys
    if ctx.keyed and case in KINDS:
        keys = ctx.keys.with_name("keys-plain.yaml")
    redis: subprocess.Popen[bytes] | None = None
    if case in CURVES and CURVES[case].secret is not None:
        keys = ctx.keys.with_name("keys-budget.yaml")
        if CURVES[case].state == "redis":
            redis, url = start_redis(ctx.procs, folder)
            argv += ["--state", url]
        else:
            argv += ["--state", str(folder / "gateway.state")]
    argv += ["--keys", str(keys), "--port", str(port)]
    began = time.monotonic()
    with log.open("ab") as err:
        # The access log (stdout) is part of the cost; it goes to /dev/null.
        proc = subprocess.Popen(
            ctx.procs.argv(argv, "proxy"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=folder,  # so `-m` puts no gateway/ of the current folder first on sys.path
            env=tree.env(),
            start_new_session=True,  # a Ctrl-C reaches this script only, which stops it
        )
    ctx.procs.running.append(proc)
    wait_healthz(port, proc, log)
    up = time.monotonic()
    failures, reasons = (
        asyncio.run(load(port, case, count, ctx.connections, ctx.keyed)) if count else (0, [])
    )
    loaded = time.monotonic()
    stop_gateway(ctx.procs, proc, log)
    if redis is not None:
        ctx.procs.stop(redis)
    total = callgrind_total(folder, log)
    if ctx.profiles is not None:
        for path in folder.glob("cg.*"):
            shutil.copy(path, ctx.profiles / f"callgrind.out.{tree.key}-{case}")
    result = {
        "requests": count,
        "instructions": total,
        "failures": failures,
        "start_seconds": round(up - began, 1),
        "load_seconds": round(loaded - up, 1),
        "seconds": round(time.monotonic() - began, 1),
    }
    if failures:
        raise BenchError(
            f"{tree.label} {case}: {failures} of {count} requests failed, e.g.:\n  "
            + "\n  ".join(reasons)
            + f"\ngateway stderr:\n{run.tail(log)}"
        )
    return result


def measure(ctx: Context, tree: Tree) -> None:
    prepare(tree, ctx.tmp)
    progress_tree = f"{tree.label} (gateway from {tree.path / 'gateway'})"
    run.progress(f"measuring {progress_tree}")
    cases = ["baseline", *KINDS, LIMITED]
    if ctx.curves:
        cases += [CURVE_BASELINE, *CURVES]
    elif ctx.paced:
        cases += [CURVE_BASELINE, *PACED.values()]
    if ctx.curves and not (tree.path / "gateway" / "state" / "redis.py").exists():
        # older than Redis
        cases = [c for c in cases if c not in CURVES or CURVES[c].state != "redis"]
    for case in cases:
        got = run_case(ctx, tree, case)
        tree.cases[case] = got
        if case in ("baseline", CURVE_BASELINE):
            what = f"{got['instructions'] / 1e6:,.1f} M instructions for start-up and shutdown"
        else:
            base = CURVE_BASELINE if case in CURVES else "baseline"
            extra = got["instructions"] - tree.cases[base]["instructions"]
            got["per_request"] = round(extra / got["requests"], 1)
            what = (
                f"{got['requests']} requests, {got['per_request'] / 1000:,.1f} k instructions"
                f" per request ({got['load_seconds']:.0f} s of requests)"
            )
        run.progress(f"{tree.label} · {case:8}: {what}; {got['seconds']:.0f} s")


def run_nginx_case(ctx: Context, ports: dict[str, int], case: str) -> dict[str, Any]:
    """nginx proxy_pass under callgrind, one process: start, one answered request
    (as the gateway's /healthz), N requests of one kind, SIGTERM. (Not SIGQUIT: a single
    process's graceful quit waits on its idle upstream keep-alive connections for good.)"""
    kind = {"baseline": None, "json": NGINX["json"], "stream": NGINX["stream"]}[case]
    count = ctx.counts.get(case, 0) if kind else 0
    folder = ctx.tmp / f"nginx-{case}"
    folder.mkdir()
    folder.chmod(0o755)
    listen = run.free_ports(4)
    values = {
        "PREFIX": folder,
        "JSON_PORT": listen[0],
        "SSE_PORT": listen[1],
        "PACED_PORT": listen[2],
        "FLOOR_PORT": listen[3],
        "JSON_BODY": run.nginx_string(run.completion_body()),
        "UP_JSON_PORT": ports["json"],
        "UP_SSE_PORT": ports["stream"],
        "UP_PACED_PORT": ports["json"],  # unused here; nginx wants an address
    }
    text = (run.BENCH / "nginx_proxy.conf.in").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", str(value))
    conf = folder / "nginx.conf"
    conf.write_text(text)
    log = folder / "stderr.log"
    argv = [ctx.tools["valgrind"], "--tool=callgrind",
            f"--callgrind-out-file={folder / CALLGRIND_FILE}", ctx.tools["nginx"],
            "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf),
            "-g", "daemon off; master_process off;"]  # fmt: skip
    began = time.monotonic()
    proc = ctx.procs.start(argv, "proxy", log=log)
    deadline = time.monotonic() + HEALTH_SECONDS
    while True:  # one JSON request answered: up (its cost is in every case alike)
        if proc.poll() is not None:
            raise BenchError(f"nginx under valgrind exited {proc.returncode}:\n{run.tail(log)}")
        try:
            status, _, body = run.post(listen[0], run.JSON_BODY, timeout=REQUEST_SECONDS)
            if status == 200:
                break
            raise BenchError(f"nginx proxy answered {status}: {body[:200]!r}")
        except (ConnectionError, OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise BenchError(f"nginx under valgrind did not answer:\n{run.tail(log)}") from None
            time.sleep(0.1)
    up = time.monotonic()
    port = listen[0] if case == "json" else listen[1]
    failures, reasons = asyncio.run(load(port, kind, count, ctx.connections)) if kind else (0, [])
    loaded = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_SECONDS)
    except subprocess.TimeoutExpired:
        ctx.procs.stop(proc)
        raise BenchError(f"nginx did not exit within {STOP_SECONDS:.0f} s of SIGTERM") from None
    ctx.procs.stop(proc)
    if failures:
        raise BenchError(f"nginx {case}: {failures} of {count} failed, e.g.: {reasons[:3]}")
    total = callgrind_total(folder, log)
    if ctx.profiles is not None:
        for path in folder.glob("cg.*"):
            shutil.copy(path, ctx.profiles / f"callgrind.out.nginx-{case}")
    return {
        "requests": count,
        "instructions": total,
        "load_seconds": round(loaded - up, 1),
        "seconds": round(time.monotonic() - began, 1),
    }


def measure_nginx(ctx: Context, ports: dict[str, int]) -> dict[str, dict[str, Any]]:
    """The baseline, JSON and stream cases for nginx proxy_pass, per request as above."""
    cases: dict[str, dict[str, Any]] = {}
    for case in ("baseline", *KINDS):
        got = run_nginx_case(ctx, ports, case)
        cases[case] = got
        if case == "baseline":
            what = f"{got['instructions'] / 1e6:,.1f} M instructions for start-up and shutdown"
        else:
            got["per_request"] = round(
                (got["instructions"] - cases["baseline"]["instructions"]) / got["requests"], 1
            )
            what = f"{got['requests']} requests, {got['per_request'] / 1000:,.1f} k per request"
        run.progress(f"nginx proxy_pass · {case:8}: {what}; {got['seconds']:.0f} s")
    return cases


# ---------------------------------------------------------------- table and results


def table(
    trees: list[Tree], counts: dict[str, int], nginx: dict[str, dict[str, Any]] | None = None
) -> list[list[str]]:
    rows = [["case", *(tree.label for tree in trees)]]
    if len(trees) == 2:
        rows[0].append("new/old")
    labels = {
        "json": f"JSON, k instr/request (n={counts['json']})",
        "stream": f"stream {run.SSE_EVENT_COUNT} events, k instr/request (n={counts['stream']})",
        LIMITED: f"same, token-limited key, k instr/request (n={counts['stream']})",
        "baseline": "start-up + shutdown, M instr",
    }
    for case, label in labels.items():
        if case == "baseline":
            values = [tree.cases[case]["instructions"] / 1e6 for tree in trees]
        else:
            values = [tree.cases[case]["per_request"] / 1000 for tree in trees]
        row = [label, *(f"{value:,.1f}" for value in values)]
        if len(values) == 2:
            row.append(f"{values[0] / values[1]:.3f}" if values[1] else "-")
        rows.append(row)
    ratios = [
        tree.cases[LIMITED]["per_request"] / tree.cases["stream"]["per_request"] for tree in trees
    ]
    row = ["token-limited / plain stream", *(f"{r:.3f}" for r in ratios)]
    if len(ratios) == 2:
        row.append("-")
    rows.append(row)
    if nginx:
        for kind in KINDS:
            base = nginx[kind]["per_request"]
            row = [f"nginx proxy_pass {kind}, k instr/request", f"{base / 1000:,.1f}"]
            row += ["" for _ in trees[1:]] + ([""] if len(trees) == 2 else [])
            rows.append(row)
            per = [tree.cases[kind]["per_request"] / base for tree in trees]
            row = [f"gateway {kind} / nginx (x nginx)", *(f"{p:.2f}" for p in per)]
            if len(per) == 2:
                row.append("-")
            rows.append(row)
    if CURVE_BASELINE in trees[0].cases:
        for name, curve in CURVES.items():
            if name not in trees[0].cases:  # --paced: the paced streams alone
                continue
            per = [tree.cases[name]["per_request"] for tree in trees]
            unit = (
                ""
                if curve.per == "request"
                else f" ({per[0] / curve.units / 1000:,.2f} k/{curve.per})"
            )
            row = [f"{name}, k instr/request{unit}", *(f"{v / 1000:,.1f}" for v in per)]
            if len(per) == 2:
                row.append(f"{per[0] / per[1]:.3f}" if per[1] else "-")
            rows.append(row)
        if all(name in trees[0].cases for name in PACED.values()):
            short, long = PACED[PACED_SHORT], PACED[PACED_LONG]
            per = [
                (tree.cases[long]["per_request"] - tree.cases[short]["per_request"])
                / (PACED_LONG - PACED_SHORT)
                for tree in trees
            ]
            row = ["paced stream, k instr per relayed event", *(f"{v / 1000:,.2f}" for v in per)]
            if len(per) == 2:
                row.append(f"{per[0] / per[1]:.3f}" if per[1] else "-")
            rows.append(row)
    return rows


def versions(tools: dict[str, str]) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "kernel": platform.release(),
        "os": run.os_name(),
        "python": platform.python_version(),
        "valgrind": run.command_output([tools["valgrind"], "--version"]),
        "nginx": run.command_output([tools["nginx"], "-v"]).replace("nginx version: ", ""),
    }


def write_results(document: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"instructions-{stamp}.json"
    text = json.dumps(document, indent=2) + "\n"
    path.write_text(text)
    (RESULTS / "instructions-latest.json").write_text(text)
    return path


# ---------------------------------------------------------------- main


def bench(args: argparse.Namespace, procs: run.Processes, tmp: Path) -> dict[str, Any]:
    tools = ensure_tools()
    info = versions(tools)
    counts = dict(QUICK_COUNTS if args.quick else DEFAULT_COUNTS)
    if args.requests is not None:
        counts["json"] = args.requests
    if args.streams is not None:
        counts["stream"] = args.streams
    counts[LIMITED] = counts["stream"]
    if args.curves or args.paced:
        counts.update({n: c.quick if args.quick else c.count for n, c in CURVES.items()})
    trees = [working_tree()]
    if args.against:
        trees.append(revision_tree(args.against, tmp))
    run.progress(
        f"{info['cpu']}, Python {info['python']}, {info['valgrind']}, nginx {info['nginx']}; "
        f"{counts['json']} JSON requests and {counts['stream']} streams per tree over "
        f"{args.connections} connections"
    )
    ports = start_upstream(procs, tools, tmp)
    run.progress("upstream up: nginx with the fixed JSON and SSE bodies of bench/run.py")
    routes, keys = write_gateway_files(tmp, ports)
    profiles = None
    if args.profiles:
        profiles = Path(args.profiles).resolve()
        profiles.mkdir(parents=True, exist_ok=True)
    ctx = Context(
        procs,
        tools,
        tmp,
        routes,
        keys,
        counts,
        args.connections,
        profiles,
        args.curves,
        args.keyed,
        args.paced,
    )
    for tree in trees:
        measure(ctx, tree)
    nginx = None if args.no_nginx else measure_nginx(ctx, ports)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": info,
        "settings": {
            "requests": counts,
            "connections": args.connections,
            "sse_events": run.SSE_EVENT_COUNT,
            "pythonhashseed": HASH_SEED,
            "pinning": {"gateway_core": procs.cores[0], "load_core": procs.cores[1]}
            if procs.cores
            else None,
        },
        "trees": [
            {"label": t.label, "commit": t.commit, "path": str(t.path), "cases": t.cases}
            for t in trees
        ],
        "nginx": nginx,
        "table": table(trees, counts, nginx),
        "seconds": round(time.monotonic() - run.STARTED, 1),
    }


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(
        description="user-space instructions per relayed request, counted by callgrind"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_COUNTS['json']} JSON requests and {QUICK_COUNTS['stream']} streams "
        f"(default {DEFAULT_COUNTS['json']} and {DEFAULT_COUNTS['stream']})",
    )
    parser.add_argument(
        "--against", metavar="REV", help="also measure the gateway of this git revision"
    )
    parser.add_argument("--requests", type=positive, metavar="N", help="JSON requests per tree")
    parser.add_argument("--streams", type=positive, metavar="N", help="streams per tree")
    parser.add_argument(
        "--connections", type=positive, default=8, help="keep-alive connections (default 8)"
    )
    parser.add_argument(
        "--curves",
        action="store_true",
        help="also the costs that should grow only with the work: bodies of 1 KiB to 8 MiB, "
        f"longer streams, larger events, a slug among {WILDCARDS:,} wildcard patterns",
    )
    parser.add_argument(
        "--paced",
        action="store_true",
        help=f"of the curves only the paced streams ({PACED_SHORT} and {PACED_LONG} content "
        "events, one per upstream read): the instructions per relayed event",
    )
    parser.add_argument(
        "--keyed",
        action="store_true",
        help="the JSON and stream cases with a key that has no limits (default: no keys)",
    )
    parser.add_argument(
        "--no-nginx", action="store_true", help="skip nginx proxy_pass's cases (the x nginx rows)"
    )
    parser.add_argument(
        "--profiles",
        metavar="DIR",
        help="keep the callgrind outputs there (for callgrind_annotate or kcachegrind)",
    )
    args = parser.parse_args()
    cores = run.pick_cores()
    if cores is not None:
        os.sched_setaffinity(0, {cores[1]})  # the client stays off the gateway's core
    procs = run.Processes(cores)
    try:
        with (
            run.interrupt_on_sigterm(),
            tempfile.TemporaryDirectory(prefix="gateway-instructions-") as tmp,
        ):
            Path(tmp).chmod(0o755)  # for nginx workers running as nobody
            try:
                document = bench(args, procs, Path(tmp))
            finally:
                procs.stop_all()
    except BenchError as exc:
        print(f"bench-instructions: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "bench-instructions: interrupted; every process it started is stopped", file=sys.stderr
        )
        return 130
    print()
    print(
        f"{document['machine']['cpu']} · Python {document['machine']['python']} · "
        f"{document['date']} · callgrind Ir of the gateway process"
        + (" · QUICK run" if document["quick"] else "")
    )
    run.print_table(document["table"])
    print(
        "per request = (case total - start-up and shutdown total) / n; "
        "new/old = first column / second"
    )
    path = write_results(document)
    print(f"\nresults: {path.relative_to(ROOT)} (also bench/results/instructions-latest.json)")
    print(f"done in {document['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
