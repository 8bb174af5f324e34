"""The one-file build: `make pyz` output runs a real request where only Python is installed,
and any other CPython than the one it was built with refuses in one line."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import httpx
import pytest

from tests.helpers import free_port as _free_port

ROOT = Path(__file__).resolve().parent.parent.parent
SHIV = Path(sys.executable).parent / "shiv"
PREAMBLE = ROOT / "pyz" / "preamble.py"
HERE = f"{sys.version_info[0]}.{sys.version_info[1]}"


def load_preamble() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pyz_preamble", PREAMBLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def other_cpython() -> str | None:
    """Another CPython minor version on this machine (pyenv's or the system's), if any."""
    roots = [Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"]
    candidates = [shutil.which(f"python3.{minor}") for minor in (10, 12, 13)]
    for root in roots:
        candidates += [str(p) for p in sorted(root.glob("3.1[0-9]*/bin/python3"))]
    for path in candidates:
        if path is None or not Path(path).exists():
            continue
        done = subprocess.run(
            [path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if done.returncode == 0 and done.stdout.strip() not in (HERE, ""):
            return path
    return None


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
            "--preamble",
            str(PREAMBLE),
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


def test_make_pyz_uses_the_preamble() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = makefile.split("\npyz:", 1)[1].split("\n\n", 1)[0]
    assert "--preamble pyz/preamble.py" in target


def test_preamble_refuses_another_abi_in_one_line() -> None:
    pre = load_preamble()
    names = [
        "orjson.cpython-311-x86_64-linux-gnu.so",
        "_rust.abi3.so",  # the stable ABI loads anywhere: no verdict
        "speedups.so",
        "README.txt",
    ]
    tags = pre.abi_tags(names)
    assert tags == {"cpython-311-x86_64-linux-gnu"}
    suffixes_311 = [".cpython-311-x86_64-linux-gnu.so", ".abi3.so", ".so"]
    suffixes_312 = [".cpython-312-x86_64-linux-gnu.so", ".abi3.so", ".so"]
    assert pre.refusal(tags, suffixes_311, "CPython 3.11 (python3)") is None
    line = pre.refusal(tags, suffixes_312, "CPython 3.12 (/usr/bin/python3.12)")
    assert line is not None and "\n" not in line
    assert "CPython 3.11 on x86_64-linux-gnu" in line and "this is CPython 3.12" in line
    assert pre.refusal(set(), suffixes_312, "CPython 3.12") is None  # pure Python: any
    musl = pre.refusal(tags, [".cpython-311-x86_64-linux-musl.so", ".so"], "CPython 3.11")
    assert musl is not None and "x86_64-linux-gnu" in musl
    assert pre.describe("pypy310-pp73-x86_64-linux-gnu") == "pypy310-pp73-x86_64-linux-gnu"


def test_preamble_passes_this_python() -> None:
    from importlib.machinery import EXTENSION_SUFFIXES

    pre = load_preamble()
    here = [f"orjson{EXTENSION_SUFFIXES[0]}"]
    assert pre.refusal(pre.abi_tags(here), EXTENSION_SUFFIXES, pre.running_python()) is None


def test_pyz_on_another_cpython_refuses_in_one_line(pyz: Path, tmp_path: Path) -> None:
    python = other_cpython()
    if python is None:
        pytest.skip("no other CPython minor version on this machine")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["SHIV_ROOT"] = str(tmp_path / "shiv")
    done = subprocess.run(
        [python, str(pyz), "check"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert re.search(rf"built for CPython {re.escape(HERE)} on ", lines[0]), lines[0]
    assert "Traceback" not in done.stderr
