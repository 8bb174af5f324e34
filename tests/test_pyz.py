"""The one-file build: `make pyz` output runs a real request where only Python is installed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent
SHIV = Path(sys.executable).parent / "shiv"


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SHIV.exists():
        pytest.fail("shiv is missing from the venv: run `make install`")
    out = tmp_path_factory.mktemp("pyz") / "gateway.pyz"
    subprocess.run(
        [
            str(SHIV),
            "-q",
            "-c",
            "gateway",
            "-o",
            str(out),
            "--reproducible",
            "-p",
            "/usr/bin/env python3",
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=240,
    )
    return out


def test_pyz_serves_a_chat_completion_in_a_bare_venv(pyz: Path, tmp_path: Path) -> None:
    # A venv with nothing installed: only the pyz brings the gateway and its dependencies.
    bare = tmp_path / "bare"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=60
    )
    python = bare / "bin" / "python"
    assert subprocess.run([str(python), "-c", "import yaml"], capture_output=True).returncode != 0
    shutil.copy(ROOT / "routes.yaml", tmp_path / "routes.yaml")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GATEWAY_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["SHIV_ROOT"] = str(tmp_path / "shiv")
    check = subprocess.run(
        [str(python), str(pyz), "check"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    port = _free_port()
    err = (tmp_path / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [str(python), str(pyz), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "stderr.log").read_text()
                assert time.monotonic() < deadline, "pyz gateway not ready within 30 s"
                time.sleep(0.05)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "echo", "messages": [{"role": "user", "content": "from a pyz"}]},
            timeout=10,
        )
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "echo: from a pyz"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        err.close()
