"""`make bench-credentials`: OAuth2 token refresh under load (SPEC §10).

A loopback token endpoint issues tokens that live `--life` seconds (each fetch takes
50 ms, as a real one does); a loopback upstream answers 200 only to a token that is
still valid and 401 otherwise; a real `gateway serve` between them gets chat requests
from `--clients` keep-alive connections for `--seconds`. Reports the requests, the
failures, the token fetches, and the requests answered while a refresh was running.
Everything on 127.0.0.1; the gateway is stopped by its pid.

Usage: bench/credentials.py [--seconds S] [--life S] [--clients N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # bench/run.py: processes, ports, progress
from scale import Client, read_request  # keep-alive client; one request read whole

ANSWER = json.dumps(
    {"id": "x", "object": "chat.completion", "created": 1, "model": "up", "choices": [],
     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
).encode()  # fmt: skip


class World:
    """The token endpoint's and the upstream's shared view: which tokens are valid."""

    def __init__(self, life: float) -> None:
        self.life = life
        self.valid: dict[str, float] = {}  # token -> monotonic expiry
        self.fetches = 0
        self.refreshing = 0  # fetches in progress
        self.during_refresh = 0  # upstream requests answered while a fetch ran
        self.rejected = 0

    async def token_endpoint(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while True:
                await read_request(reader)
                self.fetches += 1
                self.refreshing += 1
                await asyncio.sleep(0.05)
                token = f"tok-{self.fetches}"
                self.valid[token] = time.monotonic() + self.life
                self.refreshing -= 1
                body = json.dumps({"access_token": token, "expires_in": self.life}).encode()
                writer.write(_answer(body))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    async def upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await read_request(reader)
                token = ""
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"authorization: bearer "):
                        token = line[22:].decode()
                ok = self.valid.get(token, 0.0) > time.monotonic()
                if self.refreshing:
                    self.during_refresh += 1
                if not ok:
                    self.rejected += 1
                writer.write(_answer(ANSWER, 200 if ok else 401))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()


def _answer(body: bytes, status: int = 200) -> bytes:
    reason = b"OK" if status == 200 else b"Unauthorized"
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
            % (status, reason, len(body))) + body  # fmt: skip


async def bench(seconds: float, life: float, clients: int) -> dict[str, float]:
    world = World(life)
    tokens = await asyncio.start_server(world.token_endpoint, "127.0.0.1", 0)
    upstream = await asyncio.start_server(world.upstream, "127.0.0.1", 0)
    token_port = tokens.sockets[0].getsockname()[1]
    up_port = upstream.sockets[0].getsockname()[1]
    procs = run.Processes(run.pick_cores())
    statuses: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="gateway-credentials-") as name:
        tmp = Path(name)
        (tmp / "routes.yaml").write_text(
            f"providers:\n  p:\n    base_url: http://127.0.0.1:{up_port}/v1\n"
            f"    auth:\n      oauth2: {{token_url: 'http://127.0.0.1:{token_port}/token',"
            " client_id: bench, client_secret: bench-secret}\n"
            "models:\n  m:\n    providers: [{provider: p}]\n"
        )
        (tmp / "keys.yaml").write_text("")
        port = run.free_ports(1)[0]
        argv = [*run.gateway_command(), "serve", "--routes", str(tmp / "routes.yaml")]
        argv += ["--keys", str(tmp / "keys.yaml"), "--port", str(port), "--log-level", "warning"]
        proc = procs.start(argv, "proxy", log=tmp / "gateway.log")
        try:
            body = b'{"model":"m","messages":[{"role":"user","content":"hi"}]}'
            end = time.monotonic() + seconds
            run.progress(f"{clients} clients for {seconds:.0f} s, tokens living {life:.1f} s")

            async def one() -> None:
                client = await Client.connect(port, 30)
                try:
                    while time.monotonic() < end:
                        answer = await client.request("POST", "/v1/chat/completions", body)
                        ok = b'"error"' not in answer and b'"m"' in answer
                        status = 200 if ok else 0
                        statuses[status] = statuses.get(status, 0) + 1
                finally:
                    client.close()

            await asyncio.gather(*(one() for _ in range(clients)))
        finally:
            procs.stop(proc)
            tokens.close()
            upstream.close()
    done = sum(statuses.values())
    result = {
        "requests": done,
        "failures": done - statuses.get(200, 0),
        "token_fetches": world.fetches,
        "answered_during_a_refresh": world.during_refresh,
        "rejected_by_upstream": world.rejected,
    }
    run.progress(
        f"{done:,} requests, {result['failures']} failed; {world.fetches} token fetches; "
        f"{world.during_refresh:,} requests reached the upstream while a refresh ran; "
        f"{world.rejected} carried an expired token"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--life", type=float, default=2.0, help="token life in seconds")
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    result = asyncio.run(bench(args.seconds, args.life, args.clients))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
