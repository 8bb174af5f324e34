"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn

# free_port() hands out ports below Linux's ephemeral range (32768-60999), a band of its
# own to each pytest-xdist worker: no other worker, and no socket bound to port 0 or
# connecting out, can be given a port between the moment it is found free and the
# moment a server (often another process) binds it. A random start in the band keeps
# two suites run at once apart too.
_BAND = 1000
_FIRST = 20000


def _port_band() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ... or unset
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    start = _FIRST + (index % 12) * _BAND
    return range(start, start + _BAND)


_ports = _port_band()
_next_port = random.randrange(len(_ports))


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound, read, released), from
    this worker's own band (see above)."""
    global _next_port
    for _ in range(len(_ports)):
        port = _ports[_next_port % len(_ports)]
        _next_port += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_ports}")


def loopback_socket() -> socket.socket:
    """A listening-to-be socket on 127.0.0.1, port chosen by the OS."""
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only then.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


class PromptServer(uvicorn.Server):
    """uvicorn's Server with its stop's fixed waits taken out, nothing else changed.

    uvicorn notices `should_exit` on a 0.1 s tick, sleeps 0.1 s after asking the
    connections to shut down, then polls them and its tasks every 0.1 s: about 0.25 s
    per stop, which was most of the suite's wall time (it starts and stops ~1,500
    servers). Here setting `should_exit` wakes the main loop at once and the shutdown
    polls every 5 ms; the steps, their order and the graceful timeout are uvicorn's.
    """

    POLL = 0.005

    def __init__(self, config: uvicorn.Config) -> None:
        self._wake: asyncio.Event | None = None
        super().__init__(config)

    @property  # type: ignore[override]
    def should_exit(self) -> bool:
        return self._should_exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._should_exit = value
        if value and self._wake is not None:
            self._wake.set()

    async def main_loop(self) -> None:
        self._wake = asyncio.Event()
        if self._should_exit:
            self._wake.set()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.1)  # uvicorn's tick
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                while self.server_state.connections and not self.force_exit:  # noqa: ASYNC110 (uvicorn's sets, no event)
                    await asyncio.sleep(self.POLL)
                while self.server_state.tasks and not self.force_exit:  # noqa: ASYNC110
                    await asyncio.sleep(self.POLL)
                for server in self.servers:
                    await server.wait_closed()
        except TimeoutError:
            logging.getLogger("uvicorn.error").error(
                "Cancel %s running task(s), timeout graceful shutdown exceeded",
                len(self.server_state.tasks),
            )
            for t in self.server_state.tasks:
                t.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        if not self.force_exit:
            await self.lifespan.shutdown()


async def start_uvicorn(
    config: uvicorn.Config, sock: socket.socket
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """uvicorn serving on `sock` in this loop, started (bounded wait: 5 s)."""
    server = PromptServer(config)
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
