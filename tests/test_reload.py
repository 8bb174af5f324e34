"""Hot reload (file watch, SIGHUP) and graceful drain (SIGTERM), over real sockets.

In-process gateways cover the file watcher; `gateway serve` subprocesses cover the
signals. Files are replaced atomically (write + rename), as a careful operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.helpers import free_port, until
from tests.scripted_upstream import DONE, Sse, Upstream, chunk

MESSAGES = [{"role": "user", "content": "hi"}]


def routes(upstream: Upstream, *extra_models: str) -> str:
    """Model `m` plus any extra slugs, all on one provider at the upstream."""
    models = {
        slug: {"providers": [{"provider": "p", "model": "upstream-model"}]}
        for slug in ("m", *extra_models)
    }
    return yaml.safe_dump(
        {
            "providers": {"p": {"base_url": upstream.url, "api_key": "sk-up"}},
            "models": models,
        },
        sort_keys=False,
    )


def keys(**entries: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {"keys": [{"name": n, "key": f"sk-{n}", **extra} for n, extra in entries.items()]},
        sort_keys=False,
    )


def replace_file(path: Path, text: str) -> None:
    """Write atomically and move the mtime on, so the watcher sees the change."""
    old = path.stat().st_mtime_ns if path.exists() else 0
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    st = path.stat()
    if st.st_mtime_ns <= old:
        os.utime(path, ns=(st.st_atime_ns, old + 1_000_000_000))


def replace_file_keeping_stat(path: Path, text: str) -> os.stat_result:
    """Same size, same mtime: only SIGHUP can tell the file changed."""
    before = path.stat()
    data = text.encode()
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    return after


async def model_ids(client: httpx.AsyncClient, base: str, headers: Any = None) -> set[str]:
    r = await client.get(f"{base}/v1/models", headers=headers)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


async def version(client: httpx.AsyncClient, base: str) -> str:
    r = await client.get(f"{base}/healthz")
    assert r.status_code == 200, r.text
    return r.json()["config_version"]


async def chat(
    client: httpx.AsyncClient, base: str, model: str = "m", secret: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}"} if secret else None
    return await client.post(
        f"{base}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES},
        headers=headers,
    )


def paths(gw: RunningGateway) -> tuple[Path, Path]:
    s = gw.runtime.settings
    return Path(s.routes_path), Path(s.keys_path)


# --- the file watcher, in process -------------------------------------------------------


async def test_routes_change_is_served_and_version_changes(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream))
    v1 = await version(client, gw.url)
    assert await model_ids(client, gw.url) == {"m"}
    assert (await chat(client, gw.url, "m2")).status_code == 400
    routes_path, _ = paths(gw)
    replace_file(routes_path, routes(upstream, "m2"))
    await until(lambda: _has(client, gw.url, "m2"))
    v2 = await version(client, gw.url)
    assert v2 != v1
    r = await chat(client, gw.url, "m2")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "m2"


async def _has(client: httpx.AsyncClient, base: str, slug: str) -> bool:
    return slug in await model_ids(client, base)


async def test_broken_routes_keeps_old_config(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    gw = await gateway(routes(upstream))
    v1 = await version(client, gw.url)
    routes_path, _ = paths(gw)
    broken = routes(upstream, "m2").replace("models:", "models:\n  bad:\n    strategy: nope\n")
    broken = broken.replace("  m2:\n", "  m2:\n    typo_field: 1\n", 1)
    replace_file(routes_path, broken)

    def refused() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "reload refused" in r.getMessage()]

    await until(refused)
    messages = [r.getMessage() for r in refused()]
    # Every problem, as `file:line: message`.
    for field in ("strategy", "typo_field"):
        assert any(
            re.search(rf"{re.escape(str(routes_path))}:\d+: .*{field}", m) for m in messages
        ), messages
    assert await version(client, gw.url) == v1
    assert await model_ids(client, gw.url) == {"m"}
    r = await chat(client, gw.url)
    assert r.status_code == 200, r.text
    # Fixing the file is picked up again.
    replace_file(routes_path, routes(upstream, "m3"))
    await until(lambda: _has(client, gw.url, "m3"))
    assert await version(client, gw.url) != v1


async def test_keys_change_revokes_a_key(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={}, b={}))
    assert (await chat(client, gw.url, secret="sk-a")).status_code == 200
    assert (await chat(client, gw.url, secret="sk-b")).status_code == 200
    _, keys_path = paths(gw)
    replace_file(keys_path, keys(b={}))

    async def revoked() -> bool:
        return (await chat(client, gw.url, secret="sk-a")).status_code == 401

    await until(revoked)
    r = await chat(client, gw.url, secret="sk-a")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert (await chat(client, gw.url, secret="sk-b")).status_code == 200


async def test_limit_counters_carry_over_a_reload(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"rpm": 3}))
    gw.runtime.limiter.clock = lambda: 1000.0
    for _ in range(2):
        assert (await chat(client, gw.url, secret="sk-a")).status_code == 200
    v1 = await version(client, gw.url)
    _, keys_path = paths(gw)
    replace_file(keys_path, keys(a={"rpm": 3}, b={}))
    await until(lambda: _version_differs(client, gw.url, v1))
    assert (await chat(client, gw.url, secret="sk-b")).status_code == 200  # the new key works
    r = await chat(client, gw.url, secret="sk-a")  # the third of three: not a fresh minute
    assert r.status_code == 200, r.text
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    r = await chat(client, gw.url, secret="sk-a")
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limited"
    state = gw.runtime.limiter.usage["a"].requests
    assert state is not None and state.level < 1


async def _version_differs(client: httpx.AsyncClient, base: str, old: str) -> bool:
    return await version(client, base) != old


async def test_removed_key_state_is_freed_and_a_key_added_back_starts_afresh(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream), keys(a={"rpm": 3, "tpm": 100000}, b={"rpm": 3}))
    gw.runtime.limiter.clock = lambda: 1000.0
    for secret in ("sk-a", "sk-b", "sk-a"):
        assert (await chat(client, gw.url, secret=secret)).status_code == 200
    metrics = gw.runtime.metrics
    assert "a" in gw.runtime.limiter.usage
    assert any(v[0] == "a" for v in metrics.tokens.children)
    _, keys_path = paths(gw)
    v1 = await version(client, gw.url)
    replace_file(keys_path, keys(b={"rpm": 3}))
    await until(lambda: _version_differs(client, gw.url, v1))
    assert set(gw.runtime.limiter.usage) == {"b"}  # a's buckets are gone, b's kept
    assert not any(v[0] == "a" for v in metrics.tokens.children)
    b_level = gw.runtime.limiter.usage["b"].requests
    assert b_level is not None and b_level.level == 2  # b's counters carried over
    v2 = await version(client, gw.url)
    replace_file(keys_path, keys(a={"rpm": 3, "tpm": 100000}, b={"rpm": 3}))
    await until(lambda: _version_differs(client, gw.url, v2))
    r = await chat(client, gw.url, secret="sk-a")
    assert r.headers["x-ratelimit-remaining-requests"] == "2"  # afresh: 3 - this one


async def test_reload_parses_in_a_thread_off_the_event_loop(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import gateway.reload as reload_module

    gw = await gateway(routes(upstream))
    threads: list[str] = []
    real = reload_module.load_config

    def recording(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        assert kwargs.get("stepwise") is True
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(reload_module, "load_config", recording)
    routes_path, _ = paths(gw)
    v1 = await version(client, gw.url)
    replace_file(routes_path, routes(upstream, "extra"))
    await until(lambda: _version_differs(client, gw.url, v1))
    assert threads and all(name != threading.main_thread().name for name in threads)


# --- `gateway serve` subprocesses: SIGHUP, reload under load, drain ---------------------


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def spawn(tmp_path: Path, routes_path: Path, keys_path: Path, *extra: str) -> Served:
    port = free_port()
    log = tmp_path / f"gateway-{port}.log"
    cmd = [sys.executable, "-m", "gateway", "serve", "--routes", str(routes_path)]
    cmd += ["--keys", str(keys_path), "--port", str(port), *extra]
    with log.open("wb") as err:
        # cwd: its own directory, so the default ./gateway.state (and its lock) is this
        # test's, not the checkout's shared with every other run.
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    return Served(proc, port, log)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """serve(routes_text, keys_text="keys: []\\n", *args) -> a running `gateway serve`."""
    started: list[Served] = []

    def make(routes_text: str, keys_text: str = "keys: []\n", *args: str) -> Served:
        routes_path, keys_path = tmp_path / "routes.yaml", tmp_path / "keys.yaml"
        routes_path.write_text(routes_text)
        keys_path.write_text(keys_text)
        served = spawn(tmp_path, routes_path, keys_path, *args)
        started.append(served)
        return served

    try:
        yield make
    finally:
        for served in started:
            stop(served.proc)


async def ready(served: Served, client: httpx.AsyncClient) -> None:
    async def up() -> bool:
        assert served.proc.poll() is None, f"gateway exited: {served.stderr()}"
        try:
            return (await client.get(f"{served.url}/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    await until(up, within=15, every=0.05)


async def exited(served: Served, within: float) -> int:
    await until(lambda: served.proc.poll() is not None, within, 0.05)
    code = served.proc.poll()
    assert code is not None
    return code


async def test_sighup_reloads_a_change_only_a_signal_can_see(
    serve: Callable[..., Served], upstream: Upstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    served = serve(routes(upstream, "aa"))
    await ready(served, client)
    v1 = await version(client, served.url)
    assert await model_ids(client, served.url) == {"m", "aa"}
    routes_path = tmp_path / "routes.yaml"
    replace_file_keeping_stat(routes_path, routes(upstream, "bb"))
    os.kill(served.proc.pid, signal.SIGHUP)
    await until(lambda: _has(client, served.url, "bb"))
    assert await model_ids(client, served.url) == {"m", "bb"}
    assert await version(client, served.url) != v1
    r = await chat(client, served.url, "bb")
    assert r.status_code == 200, r.text
    assert served.proc.poll() is None


async def test_fifty_reloads_under_load_fail_no_request(
    serve: Callable[..., Served], upstream: Upstream, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    texts = [routes(upstream, "a1"), routes(upstream, "b22", "b333")]
    served = serve(texts[0])
    await ready(served, client)
    routes_path = tmp_path / "routes.yaml"
    sent = failed = 0
    failures: list[str] = []
    done = asyncio.Event()

    async def client_loop() -> None:
        nonlocal sent, failed
        while not done.is_set():
            sent += 1
            try:
                r = await chat(client, served.url)
                ok = r.status_code == 200 and r.json()["model"] == "m"
                if not ok:
                    failures.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                ok = False
                failures.append(repr(exc))
            failed += not ok

    loops = [asyncio.ensure_future(client_loop()) for _ in range(4)]
    versions = [await version(client, served.url)]
    try:
        for i in range(50):
            replace_file(routes_path, texts[(i + 1) % 2])
            os.kill(served.proc.pid, signal.SIGHUP)
            versions.append(
                await until(lambda: _new_version(client, served.url, versions[-1]), within=5)
            )
            await asyncio.sleep(0.01)  # let requests run on this config too
    finally:
        done.set()
        await asyncio.gather(*loops)
    print(f"reload under load: 50 reloads, {sent} requests sent, {failed} failed")
    assert len(versions) == 51
    assert len(set(versions)) == 2  # the two files alternate
    assert sent >= 50
    assert failed == 0, failures[:5]
    assert served.proc.poll() is None


async def _new_version(client: httpx.AsyncClient, base: str, old: str) -> str | None:
    v = await version(client, base)
    return v if v != old else None


async def refused_while_running(served: Served, within: float = 5.0) -> bool:
    """Poll new connections until one is refused; whether the process was alive then."""

    async def refused() -> bool | None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", served.port)
        except ConnectionRefusedError:
            return True
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        return None

    await until(refused, within, 0.02)
    return served.proc.poll() is None


async def test_sigterm_drains_an_open_stream_then_exits_zero(
    serve: Callable[..., Served], upstream: Upstream, client: httpx.AsyncClient
) -> None:
    events = [chunk(f"e{i}") for i in range(10)]
    upstream.script(Sse([*events, DONE], delay=0.2))
    served = serve(routes(upstream))
    await ready(served, client)
    body = {"model": "m", "stream": True, "messages": MESSAGES}
    async with httpx.AsyncClient(timeout=10) as c:
        url = f"{served.url}/v1/chat/completions"
        async with c.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            parts = r.aiter_raw()
            got = await anext(parts)
            os.kill(served.proc.pid, signal.SIGTERM)
            alive_when_refused = await refused_while_running(served)
            async for part in parts:
                got += part
    expected = b"".join(events) + DONE
    assert got == expected.replace(b'"model": "upstream-model"', b'"model": "m"')
    assert alive_when_refused, "new connections were accepted for as long as the process ran"
    code = await exited(served, within=10)
    assert code == 0, served.stderr()


async def test_drain_seconds_bounds_the_drain(
    serve: Callable[..., Served], upstream: Upstream, client: httpx.AsyncClient
) -> None:
    # The stream stalls after its first event: only the drain bound can end it.
    upstream.script(Sse([chunk("a"), chunk("b"), DONE], hang_after=1))
    served = serve(routes(upstream), "keys: []\n", "--drain-seconds", "1")
    await ready(served, client)
    body = {"model": "m", "stream": True, "messages": MESSAGES}
    async with httpx.AsyncClient(timeout=10) as c:
        url = f"{served.url}/v1/chat/completions"
        async with c.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            parts = r.aiter_raw()  # held: the client stays connected throughout
            first = await anext(parts)
            os.kill(served.proc.pid, signal.SIGTERM)
            code = await exited(served, within=10)
            # The gateway, not the client, ended the stream: it was cut short.
            with pytest.raises(httpx.RemoteProtocolError):
                async for part in parts:
                    first += part
    assert b'"b"' not in first
    assert code == 0, served.stderr()
    await upstream.wait_closed(5)  # the upstream stream was closed, not leaked
