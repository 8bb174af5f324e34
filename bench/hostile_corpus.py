"""The hostile-client corpus of tests/server/test_hostile_clients.py, sent byte for byte to the
gateway and to nginx; prints what each did, as markdown tables.

The tests hold the gateway to its expected answers; this only records nginx next to it
(nginx is the reference, not the contract). Both run on 127.0.0.1 from a temp dir:
- the gateway: `python -m gateway serve` on the built-in echo provider, with
  `--header-timeout 0.5 --body-timeout 0.5` as in the tests;
- nginx (Debian's /usr/sbin/nginx, default limits): `location / { return 200 }`, with
  `client_header_timeout` and `client_body_timeout` of 500 ms to match.
A second table fills each server's connection cap with idle keep-alive connections,
slowloris heads, or requests held by a hanging upstream, then sends GET /healthz on a
fresh connection: the gateway with `--max-connections 6`, nginx with
`worker_connections 8`, which leaves it room for 6 clients (5 slowloris heads leave a
fresh connection served, 6 do not); nginx spends two connections on a proxied request,
so 3 of those fill it.
A third table is a client that pipelines four requests with 256 KiB answers, then a
malformed one and 256 KiB more, and reads slowly (16 KiB receive buffer): do the
answers survive the close? (The gateway: chat POSTs to the echo provider, which
repeats a 256 KiB message; nginx: GET of a 256 KiB static file.)

Usage: .venv/bin/python bench/hostile_corpus.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.server.test_hostile_clients import (  # noqa: E402 (after the path is set)
    CORPUS,
    ECHO_ROUTES,
    TIMEOUT,
    get,
    normal,
    observe,
    parse_answers,
    request,
    slow_reader,
)

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
QUIET = 1.0  # seconds of silence after which a connection counts as left open
CAP = 6  # client connections either server may hold in the cap scenarios
WAIT = 8.0  # how long the fresh connection waits in a cap scenario


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"exited {proc.returncode}: {log.read_text()[-800:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                message = f"not listening on {port} in 10 s: {log.read_text()[-800:]}"
                raise SystemExit(message) from None
            time.sleep(0.05)


@contextlib.contextmanager
def running(argv: list[str], port: int, log: Path, cwd: Path) -> Iterator[int]:
    """A server process, listening on `port`; stopped by its pid when done."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_listening(port, proc, log)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def gateway(
    tmp: Path, name: str, hang_port: int, *flags: str
) -> contextlib.AbstractContextManager[int]:
    """The gateway on the echo routes; with `hang_port`, also a model `hang` on a
    provider there."""
    folder = tmp / name
    folder.mkdir()
    routes = ECHO_ROUTES
    if hang_port:
        routes = routes.replace(
            "models:\n", f"  hang:\n    base_url: http://127.0.0.1:{hang_port}/v1\nmodels:\n"
        )
        routes += "  hang:\n    providers:\n      - provider: hang\n"
    (folder / "routes.yaml").write_text(routes)
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "serve", "--routes", "routes.yaml"]
    argv += ["--port", str(port), "--log-level", "warning", *flags]
    return running(argv, port, folder / "serve.log", folder)


def nginx(
    tmp: Path, name: str, events: str, http: str, server: str
) -> contextlib.AbstractContextManager[int]:
    """nginx with this events block, these http directives and this server body."""
    prefix = tmp / name
    prefix.mkdir()
    prefix.chmod(0o755)
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    temp = "".join(
        f"    {kind}_temp_path {prefix}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (prefix / "nginx.conf").write_text(
        f"""{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ {events} }}
http {{
    access_log off;
{temp}    {http}
    server {{
        listen 127.0.0.1:{port};
        {server}
    }}
}}
"""
    )
    argv = [NGINX, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c"]
    argv += [str(prefix / "nginx.conf"), "-g", "daemon off;"]
    return running(argv, port, prefix / "stderr.log", prefix)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


# ---------------------------------------------------------------- the byte corpus


async def corpus_rows(gateway_port: int, nginx_port: int) -> list[str]:
    rows = [
        "| case | bytes | gateway | nginx |",
        "|---|---|---|---|",
    ]
    for case in CORPUS:
        seen_gateway = normal(str(await observe(gateway_port, case, QUIET)))
        seen_nginx = str(await observe(nginx_port, case, QUIET))
        mark = "" if seen_gateway == case.expect else f" (expected: {case.expect})"
        rows.append(
            f"| {case.name} | {cell(case.what)} | {cell(seen_gateway)}{mark} | {cell(seen_nginx)} |"
        )
    return rows


# ---------------------------------------------------------------- the connection cap


class HangingUpstream:
    """Accepts, reads, never answers; counts the requests that arrived."""

    def __init__(self) -> None:
        self.requests = 0
        self.arrived = asyncio.Event()  # set at each arrival
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def wait_requests(self, count: int, seconds: float) -> None:
        """Until `count` requests have arrived in all, or `seconds` passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while self.requests < count:
                    self.arrived.clear()
                    await self.arrived.wait()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            if await reader.read(1 << 16):
                self.requests += 1
                self.arrived.set()
            while await reader.read(1 << 16):
                pass
        except ConnectionError:
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self.writers):
                writer.close()
            await self.server.wait_closed()


Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def read_one(reader: asyncio.StreamReader, seconds: float) -> str:
    """The first answer on a connection, or how it ended without one."""
    data = b""
    try:
        async with asyncio.timeout(seconds):
            while True:
                answers, _ = parse_answers(data)
                if answers:
                    a = answers[0]
                    return f"{a.status} {a.code}" if a.code else str(a.status)
                chunk = await reader.read(1 << 16)
                if not chunk:
                    return "closed, no answer"
                data += chunk
    except TimeoutError:
        return f"no answer in {seconds:.0f} s"
    except ConnectionResetError:
        return "reset, no answer"


async def connection_ended(reader: asyncio.StreamReader) -> bool:
    """The server closed it (whatever it said first), within a short wait."""
    try:
        async with asyncio.timeout(0.2):
            await reader.read()
            return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def fill(port: int, how: str, count: int, hang: HangingUpstream) -> list[Conn]:
    conns: list[Conn] = []
    for _ in range(count):
        conns.append(await asyncio.open_connection("127.0.0.1", port))
    if how == "idle":
        for reader, writer in conns:
            writer.write(get("/healthz"))
            await read_one(reader, 5)
    elif how == "slowloris":
        for _, writer in conns:
            writer.write(b"G")
        await asyncio.sleep(1.2)  # past the gateway's 1 s after which a slow head may go
    else:
        body = json.dumps({"model": "hang", "messages": [{"role": "user", "content": "x"}]})
        before = hang.requests
        for _, writer in conns:
            writer.write(request(body=body.encode()))
        await hang.wait_requests(before + count, 5)
    return conns


async def cap_cell(port: int, how: str, count: int, hang: HangingUpstream) -> str:
    conns = await fill(port, how, count, hang)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        began = time.monotonic()
        try:
            writer.write(get("/healthz", "connection: close"))
            said = await read_one(reader, WAIT)
            took = time.monotonic() - began
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        closed = [await connection_ended(r) for r, _ in conns]
        return (
            f"fresh GET /healthz: {said} after {took:.1f} s; "
            f"{sum(closed)} of {count} filling connections closed"
        )
    finally:
        for _, w in conns:
            w.close()
        for _, w in conns:
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()


async def cap_rows(gateway_port: int, nginx_port: int, hang: HangingUpstream) -> list[str]:
    rows = [
        "| at the cap, filled with | gateway (--max-connections 6) | nginx (worker_connections 8) |",
        "|---|---|---|",
    ]
    what = {
        "idle": "idle keep-alive connections (each made one request)",
        "slowloris": "one byte of a head each, then 1.2 s",
        "in-flight": "requests held by a hanging upstream",
    }
    for how in ("idle", "slowloris", "in-flight"):
        g = await cap_cell(gateway_port, how, CAP, hang)
        n = await cap_cell(nginx_port, how, CAP // 2 if how == "in-flight" else CAP, hang)
        await asyncio.sleep(0.5)  # let both servers notice the filling clients left
        rows.append(f"| {what[how]} | {cell(g)} | {cell(n)} |")
    return rows


# ---------------------------------------------------------------- a slow reader

BIG = 256 * 1024
SLOW_TAIL = b"GARBAGE\r\n\r\n" + b"j" * BIG


async def slow_rows(gateway_port: int, nginx_port: int) -> list[str]:
    message = {"model": "echo", "messages": [{"role": "user", "content": "z" * BIG}]}
    to_gateway = request(body=json.dumps(message).encode()) * 4 + SLOW_TAIL
    to_nginx = get("/big.bin") * 4 + SLOW_TAIL
    said_gateway = await slow_reader(gateway_port, to_gateway)
    said_nginx = await slow_reader(nginx_port, to_nginx)
    return [
        "| slow reader | gateway | nginx |",
        "|---|---|---|",
        "| 4 pipelined requests with 256 KiB answers, `GARBAGE`, 256 KiB more; "
        f"16 KiB receive buffer | {cell(str(said_gateway))} | {cell(str(said_nginx))} |",
    ]


# ---------------------------------------------------------------- main


async def main_async(tmp: Path) -> None:
    ms = int(TIMEOUT * 1000)
    timeouts = f"client_header_timeout {ms}ms; client_body_timeout {ms}ms;"
    plain_server = (
        "location / { default_type text/plain; return 200 'ok'; }\n"
        f"        location = /big.bin {{ root {tmp}; }}"
    )
    hang = HangingUpstream()
    hang_port = await hang.start()
    try:
        with (
            gateway(
                tmp, "gateway", 0, "--header-timeout", str(TIMEOUT), "--body-timeout", str(TIMEOUT)
            ) as gw,
            nginx(tmp, "nginx", "worker_connections 1024;", timeouts, plain_server) as ng,
        ):
            rows = await corpus_rows(gw, ng)
            print("\n".join(rows))
            print()
            print("\n".join(await slow_rows(gw, ng)))
            print()
        capped_server = (
            "location = /healthz { default_type text/plain; return 200 'ok'; }\n"
            f"        location / {{ proxy_pass http://127.0.0.1:{hang_port}; }}"
        )
        with (
            gateway(
                tmp,
                "gateway-cap",
                hang_port,
                "--max-connections",
                str(CAP),
                "--header-timeout",
                "5",
            ) as gw,
            nginx(
                tmp,
                "nginx-cap",
                f"worker_connections {CAP + 2};",
                "client_header_timeout 5s;",
                capped_server,
            ) as ng,
        ):
            rows = await cap_rows(gw, ng, hang)
        print("\n".join(rows))
    finally:
        await hang.stop()


def main() -> None:
    if not Path(NGINX).exists():
        raise SystemExit("nginx is not installed (apt-get install nginx)")
    with tempfile.TemporaryDirectory(prefix="hostile-corpus-") as name:
        tmp = Path(name)
        tmp.chmod(0o755)  # nginx workers read big.bin from here
        (tmp / "big.bin").write_bytes(b"z" * BIG)
        (tmp / "big.bin").chmod(0o644)
        asyncio.run(main_async(tmp))


if __name__ == "__main__":
    main()
