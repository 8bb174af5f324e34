"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_socket() -> socket.socket:
    """A listening-to-be socket on 127.0.0.1, port chosen by the OS."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


async def start_uvicorn(
    config: uvicorn.Config, sock: socket.socket
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """uvicorn serving on `sock` in this loop, started (bounded wait: 5 s)."""
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.01)
    if task.done():
        task.result()
    return server, task


def assert_envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The SPEC's error envelope, exactly; returns the inner error object."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers.get("x-request-id")
    body = r.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param", "details"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["code"] == code
    assert err["param"] is None
    assert isinstance(err["details"], dict)
    assert "Traceback" not in r.text
    return err


async def until(check: Callable[[], Any], within: float = 5.0, every: float = 0.02) -> Any:
    """Poll `check()` (sync or async) until truthy; its value. Bounded by `within`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(every)


class MemoryTransport(asyncio.Transport):
    """A server connection's transport in memory: what the protocol wrote and did."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closing, "write after close"
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        info = {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}
        return info.get(name, default)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def can_write_eof(self) -> bool:
        return False  # refusals then close at once (the lingering close is tested on sockets)

    @property
    def wire(self) -> bytes:
        return b"".join(self.writes)


def stop(proc: subprocess.Popen[Any], grace: float = 10) -> None:
    """Stop a process the test started, by its own pid: terminate, then kill."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def start_redis(port: int, folder: Path, *extra: str) -> subprocess.Popen[Any]:
    """Debian's redis-server on 127.0.0.1:`port`, persisting nothing, its log in
    `folder`; returns once it answers PING (bounded: 10 s). Stop it with stop()."""
    if not Path(REDIS_SERVER).exists():
        raise RuntimeError("redis-server is not installed: `make test-tools` installs it")
    log = (folder / f"redis-{port}.log").open("wb")
    proc = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(folder), *extra],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                    return proc
        except OSError:
            pass
        time.sleep(0.02)
    stop(proc)
    raise RuntimeError(f"redis-server did not answer on port {port}; see {folder}")
