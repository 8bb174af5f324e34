"""The upstream client against a real nginx on loopback (installed by .ci/run)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config.routes import Provider
from gateway.upstream.client import Upstream
from gateway.upstream.connection import State
from tests.helpers import free_port as _free_port
from tests.helpers import stop

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
BODY = b'{"id":"x","object":"chat.completion","model":"upstream-model","choices":[]}'


@pytest.fixture(scope="module")
def nginx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if not Path(NGINX).exists():
        pytest.fail("nginx is not installed: `apt-get install nginx` (.ci/run does it)")
    prefix = tmp_path_factory.mktemp("nginx")
    prefix.chmod(0o755)
    (prefix / "big.bin").write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    (prefix / "big.bin").chmod(0o644)
    port = _free_port()
    conf = prefix / "nginx.conf"
    # Workers read the body file; as root they would run as nobody, who may not read here.
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(
        f"""
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port};
        root {prefix};
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{BODY.decode()}';
        }}
        location = /v1/big.bin {{
            # Static files refuse POST (405); this serves the file anyway.
            error_page 405 =200 $uri;
            alias {prefix}/big.bin;
        }}
        location = /v1/close {{
            keepalive_timeout 0;
            default_type application/json;
            return 200 '{BODY.decode()}';
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [
            NGINX,
            "-p",
            str(prefix),
            "-e",
            str(prefix / "error.log"),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, (prefix / "error.log").read_text()
                assert time.monotonic() < deadline, "nginx did not listen within 10 s"
                time.sleep(0.05)
        yield port
    finally:
        stop(proc)


def _provider(port: int) -> Provider:
    return Provider(name="nginx", base_url=f"http://127.0.0.1:{port}/v1")


async def test_keep_alive_against_nginx(nginx: int) -> None:
    up = Upstream()
    try:
        for _ in range(50):
            resp = await up.send(_provider(nginx), "/chat/completions", b"{}", [])
            assert resp.status == 200
            assert await resp.read() == BODY
            resp.close()
        # Every request went over the one pooled connection.
        idle = [c for conns in up.pool._idle.values() for c in conns]
        assert len(idle) == 1
    finally:
        await up.close()


async def test_large_body_and_connection_close_against_nginx(nginx: int) -> None:
    up = Upstream()
    try:
        resp = await up.send(_provider(nginx), "/big.bin", b"{}", [])
        assert resp.status == 200
        assert await resp.read() == bytes(range(256)) * 8192
        resp.close()
        for _ in range(3):
            resp = await up.send(_provider(nginx), "/close", b"{}", [])
            assert await resp.read() == BODY
            resp.close()
        # `Connection: close` answers are never pooled.
        assert all(
            c.state in (State.IDLE, State.CLOSED) for conns in up.pool._idle.values() for c in conns
        )
    finally:
        await up.close()
