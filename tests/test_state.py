"""Spend that survives restarts (SPEC §11), with real `gateway serve` processes: written
at least once a second and on drain, loaded at start, a SIGKILL loses at most the last
second; a corrupt file is kept aside and reported; --state none writes nothing."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx
import pytest

from gateway.limits import KeyUsage, Limiter, Period
from gateway.state.file import StateFile
from tests.helpers import free_port
from tests.test_cli import clean_env, serving

ROUTES = """\
providers:
  echo: {base_url: "builtin:echo"}
models:
  echo:
    providers:
      - provider: echo
        price: {input: 1000, output: 1000}
"""
KEYS = """\
keys:
  - name: team
    key: sk-team
    budget: {usd: 1000, period: month}
    token_quota: {tokens: 100000, period: day}
"""
AUTH = {"authorization": "Bearer sk-team"}


def setup(tmp_path: Path) -> list[str]:
    (tmp_path / "routes.yaml").write_text(ROUTES)
    (tmp_path / "keys.yaml").write_text(KEYS)
    return ["--routes", "routes.yaml", "--keys", "keys.yaml"]


def spend(client: httpx.Client, url: str) -> dict[str, object]:
    usage = client.get(f"{url}/v1/key", headers=AUTH).json()["usage"]
    assert isinstance(usage, dict)
    return usage


def ask(client: httpx.Client, url: str) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}
    r = client.post(f"{url}/v1/chat/completions", json=body, headers=AUTH)
    assert r.status_code == 200, r.text


def until_written(path: Path, requests: int, within: float = 5.0) -> None:
    """Bounded: until the file holds `requests` for the key's day."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists():
            day = json.loads(path.read_bytes())["keys"].get("team", {}).get("periods", {})
            if day.get("day", [None, 0])[1] == requests:
                return
        time.sleep(0.05)
    raise AssertionError(f"{path} never held {requests} requests")


def test_spend_survives_sigkill_and_a_restart(tmp_path: Path) -> None:
    args = setup(tmp_path)
    state = tmp_path / "spend.state"
    port = free_port()
    with httpx.Client(timeout=10) as client:
        with serving(tmp_path, [*args, "--port", str(port), "--state", str(state)],
                     clean_env(), port) as (proc, url):  # fmt: skip
            for _ in range(3):
                ask(client, url)
            before = spend(client, url)
            until_written(state, 3, within=3.0)  # at least once a second
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        with serving(tmp_path, [*args, "--port", str(port), "--state", str(state)],
                     clean_env(), port) as (proc, url):  # fmt: skip
            after = spend(client, url)
            assert after == before
            assert after["day"]["requests"] == 3 and after["month"]["cost_usd"] > 0  # type: ignore[index]
            ask(client, url)
            # On drain the last request is written at once.
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    assert json.loads(state.read_bytes())["keys"]["team"]["periods"]["day"][1] == 4


def test_a_corrupt_file_is_kept_aside_and_reported(tmp_path: Path) -> None:
    args = setup(tmp_path)
    state = tmp_path / "spend.state"
    state.write_bytes(b'{"version": 1, "keys": {"team": {"spent": "lots"')
    port = free_port()
    command = [*args, "--port", str(port), "--state", str(state)]
    with (
        httpx.Client(timeout=10) as client,
        serving(tmp_path, command, clean_env(), port) as (
            _,
            url,
        ),
    ):
        assert spend(client, url)["day"]["requests"] == 0  # type: ignore[index]
    aside = list(tmp_path.glob("spend.state.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes().startswith(b'{"version": 1, "keys"')
    log = (tmp_path / "serve.log").read_text()
    assert "is not gateway state" in log and aside[0].name in log


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_directory_as_state_refuses_before_serving(tmp_path: Path, workers: str) -> None:
    import subprocess
    import sys

    args = setup(tmp_path)
    (tmp_path / "spend.state").mkdir()  # a directory: neither readable nor writable as state
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", *args, "--port", str(free_port()),
         "--state", "spend.state", "--workers", workers],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "gateway: the state path spend.state is a directory; pass a file in it "
        "(--state spend.state/gateway.state) or --state none"
    ]


def test_state_none_writes_nothing(tmp_path: Path) -> None:
    args = setup(tmp_path)
    port = free_port()
    command = [*args, "--port", str(port), "--state", "none"]
    with (
        httpx.Client(timeout=10) as client,
        serving(tmp_path, command, clean_env(), port) as (
            proc,
            url,
        ),
    ):
        ask(client, url)
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml", "routes.yaml", "serve.log"]


async def test_snapshot_round_trips(tmp_path: Path) -> None:
    limiter = Limiter()
    limiter.usage["a"] = KeyUsage(spent=7, periods={"day": Period("2026-11-25", 2, 7, 0.5)})
    limiter.dirty.add("a")
    first = StateFile(str(tmp_path / "s"), limiter)
    await first.save()
    again = Limiter()
    assert StateFile(str(tmp_path / "s"), again).load() == 1
    assert again.usage["a"].periods["day"] == Period("2026-11-25", 2, 7, 0.5)
    assert again.usage["a"].spent == 7


def test_with_two_workers_the_spend_of_both_counts(tmp_path: Path) -> None:
    """Each worker adds its own spend to the file and reads the others'; every answer to
    /v1/key, whichever worker gives it, soon says the total."""
    args = setup(tmp_path)
    state = tmp_path / "spend.state"
    port = free_port()
    command = [*args, "--port", str(port), "--state", str(state), "--workers", "2"]
    with serving(tmp_path, command, clean_env(), port) as (proc, url):
        for _ in range(12):  # a fresh connection each: the kernel spreads them
            with httpx.Client(timeout=10) as client:
                ask(client, url)
        until_written(state, 12, within=5.0)
        deadline = time.monotonic() + 5.0
        answers: list[int] = []
        while time.monotonic() < deadline:
            answers = []
            for _ in range(6):
                with httpx.Client(timeout=10) as client:
                    r = client.get(f"{url}/v1/key", headers=AUTH)
                    answers.append(r.json()["usage"]["day"]["requests"])
            if answers == [12] * 6:
                break
            time.sleep(0.1)
        assert answers == [12] * 6
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert json.loads(state.read_bytes())["keys"]["team"]["periods"]["day"][1] == 12


def test_merging_adds_deltas_and_newer_periods_win() -> None:
    from gateway.state.file import _minus, _plus

    base = {("a", "day"): ("2026-11-25", 2, 20, 0.2)}
    mine = {("a", "day"): ("2026-11-25", 5, 50, 0.5), ("a", ""): ("", 0, 50, 0.0)}
    delta = _minus(mine, base)
    assert delta == {("a", "day"): ("2026-11-25", 3, 30, pytest.approx(0.3)),
                     ("a", ""): ("", 0, 50, 0.0)}  # fmt: skip
    others = {("a", "day"): ("2026-11-25", 10, 100, 1.0)}
    merged = _plus(others, delta)
    assert merged[("a", "day")][:3] == ("2026-11-25", 13, 130)
    # A new day in the delta replaces yesterday's totals; yesterday's delta is dropped.
    assert _plus(others, {("a", "day"): ("2026-11-26", 1, 5, 0.1)})[("a", "day")] == (
        "2026-11-26", 1, 5, 0.1)  # fmt: skip
    newer = {("a", "day"): ("2026-11-26", 4, 4, 0.0)}
    assert _plus(newer, {("a", "day"): ("2026-11-25", 9, 9, 9.0)}) == newer


async def test_spend_during_a_sync_is_neither_lost_nor_counted_twice(tmp_path: Path) -> None:
    import asyncio
    import threading
    from datetime import UTC, datetime

    from gateway.keys import Key

    limiter = Limiter(wall=lambda: datetime(2026, 11, 25, 12, tzinfo=UTC))
    key = Key(name="k", digest=b"x" * 32, token_quota=10**9, quota_period="day")
    state = StateFile(str(tmp_path / "s"), limiter)
    limiter.admit(key)
    limiter.charge(key, 5)
    gate = threading.Event()
    merge = state._merge

    def slow(delta: object, base: object) -> object:
        assert gate.wait(5)
        return merge(delta, base)  # type: ignore[arg-type]

    state._merge = slow  # type: ignore[method-assign,assignment]
    sync = asyncio.ensure_future(state.save())
    await asyncio.sleep(0.05)
    limiter.charge(key, 7)  # while the thread holds the file
    gate.set()
    await sync

    def on_file() -> int:
        return int(json.loads((tmp_path / "s").read_bytes())["keys"]["k"]["periods"]["day"][2])

    assert limiter.usage["k"].periods["day"].tokens == 12 and on_file() == 5
    state._merge = merge  # type: ignore[method-assign]
    await state.save()
    assert limiter.usage["k"].periods["day"].tokens == 12 and on_file() == 12
    await state.save(pull=True)  # nothing new: nothing doubles
    assert limiter.usage["k"].periods["day"].tokens == 12 and on_file() == 12
