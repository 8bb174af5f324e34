"""The walk of one request through the gateway: modules entered, gateway functions called
and module boundaries crossed (a gateway function calling one in another module), for one
keyed JSON chat completion and one Responses stream, after three warm-up rounds.

Run from a checkout's root (it works on any revision's tree): .venv/bin/python bench/walk.py
Everything listens on 127.0.0.1; the upstream is a few lines of asyncio below.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import tempfile
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path.cwd()))

import httpx
import uvicorn

from gateway.app import create_app
from gateway.config import load_config
from gateway.server.protocol import ServerProtocol

try:
    from gateway.config.settings import Settings
except ImportError:  # the flat tree before the layers
    from gateway.settings import Settings  # type: ignore[import-not-found,no-redef]

JSON = (
    b'{"id":"c1","object":"chat.completion","created":1,"model":"up","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)
EVENTS = (
    b'event: response.created\ndata: {"type":"response.created","response":{"id":"resp_1",'
    b'"model":"up"}}\n\n'
    b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
    b'"delta":"hi"}\n\n'
    b'event: response.completed\ndata: {"type":"response.completed","response":{"id":"resp_1",'
    b'"model":"up","usage":{"input_tokens":1,"output_tokens":1}}}\n\n'
)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
STREAM = {"model": "m", "input": "hi", "stream": True}


class Walk:
    """A sys.setprofile hook: every call of a gateway function, and whether it crossed
    from one gateway module into another."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.calls = 0
        self.crossings = 0

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call":
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith("gateway"):
            return
        self.seen.add(module)
        self.calls += 1
        back = frame.f_back
        caller = back.f_globals.get("__name__", "") if back is not None else ""
        if caller.startswith("gateway") and caller != module:
            self.crossings += 1


async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            length = next(
                int(v.split(b":")[1]) for v in lines if v.lower().startswith(b"content-length")
            )
            await reader.readexactly(length)
            sse = b"/responses" in lines[0]
            body, kind = (EVENTS, b"text/event-stream") if sse else (JSON, b"application/json")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                         % (kind, len(body), body))  # fmt: skip
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main() -> None:
    up = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = up.sockets[0].getsockname()[1]
    tmp = Path(tempfile.mkdtemp())
    (tmp / "routes.yaml").write_text(
        f"providers:\n  p:\n    base_url: http://127.0.0.1:{port}/v1\n"
        "models:\n  m:\n    providers: [{provider: p, model: up}]\n"
    )
    (tmp / "keys.yaml").write_text("keys: [{name: k, key: sk-walk}]\n")
    settings = Settings(routes_path=str(tmp / "routes.yaml"), keys_path=str(tmp / "keys.yaml"))
    app = create_app(settings, load_config(settings.routes_path, settings.keys_path))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, lifespan="on", log_level="warning", access_log=False,
                            http=ServerProtocol, interface="asgi3")  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    for _ in range(500):  # up to 5 s
        if server.started:
            break
        await asyncio.sleep(0.01)
    assert server.started, "the gateway did not start within 5 s"
    base = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    async with httpx.AsyncClient(base_url=base, headers={"authorization": "Bearer sk-walk"}) as c:
        for _ in range(3):
            await c.post("/chat/completions", json=CHAT)
            await c.post("/responses", json=STREAM)
        for name, path, body in (("JSON chat", "/chat/completions", CHAT),
                                 ("Responses stream", "/responses", STREAM)):  # fmt: skip
            walk = Walk()
            sys.setprofile(walk)
            r = await c.post(path, json=body)
            await asyncio.sleep(0.05)  # the request's own end (its finally) runs too
            sys.setprofile(None)
            assert r.status_code == 200, r.text
            print(f"{name}: {len(walk.seen)} modules entered, {walk.calls} gateway calls, "
                  f"{walk.crossings} module crossings")  # fmt: skip
            print("   ", " ".join(sorted(m.removeprefix("gateway.") for m in walk.seen)))
    server.should_exit = True
    await task
    up.close()


if __name__ == "__main__":
    asyncio.run(main())
