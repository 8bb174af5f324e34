"""Spend that survives restarts (SPEC §11), with real `gateway serve` processes: written
at least once a second and on drain, loaded at start, a SIGKILL loses at most the last
second; a corrupt file is kept aside and reported; --state none writes nothing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gateway.limits import KeyUsage, Limiter, Period
from gateway.state.file import StateFile
from tests.helpers import free_port, until
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
    assert sorted(os.listdir(tmp_path)) == ["keys.yaml", "routes.yaml", "serve.log"]


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

    from gateway.config.keys import Key

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


# --------------------------------------------------------------- wrong shapes, failed syncs

GOOD = {"version": 1, "keys": {"team": {"spent": 5, "periods": {"day": ["2026-11-25", 1, 5, 0.5]}}}}
WRONG_SHAPES = {
    "keys-list": {"keys": []},
    "v1-keys-list": {"version": 1, "keys": []},
    "top-list": [],
    "entry-string": {"version": 1, "keys": {"a": "x"}},
    "number-as-string": {"version": 1, "keys": {"a": {"spent": "5", "periods": {}}}},
    "negative-spend": {"version": 1, "keys": {"a": {"spent": -1, "periods": {}}}},
    "bool-count": {"version": 1, "keys": {"a": {"spent": True, "periods": {}}}},
    "short-period": {"version": 1, "keys": {"a": {"spent": 0, "periods": {"day": ["d", 1]}}}},
    "negative-usd": {"version": 1,
                     "keys": {"a": {"spent": 0, "periods": {"day": ["d", 1, 1, -0.5]}}}},
    "unknown-period": {"version": 1,
                       "keys": {"a": {"spent": 0, "periods": {"week": ["w", 1, 1, 0]}}}},
    "extra-field": {"version": 1, "keys": {}, "owner": "someone"},
    "version-2": {"version": 2, "keys": {}},
}  # fmt: skip


@pytest.mark.parametrize("shape", WRONG_SHAPES.values(), ids=WRONG_SHAPES.keys())
def test_a_state_file_of_the_wrong_shape_is_set_aside_at_start(
    tmp_path: Path, shape: object, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s"
    raw = json.dumps(shape).encode()
    path.write_bytes(raw)
    state = StateFile(str(path), Limiter())
    assert state.load() == 0
    assert state.set_aside is not None and state.set_aside.read_bytes() == raw
    assert state.set_aside.name.startswith("s.corrupt-") and not path.exists()
    (record,) = [r for r in caplog.records if "is not gateway state" in r.getMessage()]
    assert record.levelno == logging.ERROR and state.set_aside.name in record.getMessage()


def test_the_testers_list_of_keys_no_longer_stops_the_start(tmp_path: Path) -> None:
    args = setup(tmp_path)
    state = tmp_path / "spend.state"
    state.write_bytes(b'{"keys": []}')
    port = free_port()
    with (
        serving(tmp_path, [*args, "--port", str(port), "--state", str(state)], clean_env(),
                port) as (_, url),
        httpx.Client(timeout=10) as client,
    ):  # fmt: skip
        ask(client, url)
        until_written(state, 1)
    (aside,) = tmp_path.glob("spend.state.corrupt-*")
    assert aside.read_bytes() == b'{"keys": []}'


async def test_a_sync_finding_the_file_replaced_sets_it_aside_and_writes_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Driven directly: the file turns into `{"keys": []}` between two syncs; the next one
    (with nothing spent, then with spend) sets it aside, reports it, and writes the
    totals this process last synced; syncing goes on."""
    from datetime import UTC, datetime

    from gateway.config.keys import Key

    path = tmp_path / "s"
    path.write_bytes(json.dumps(GOOD).encode())
    limiter = Limiter(wall=lambda: datetime(2026, 11, 25, 12, tzinfo=UTC))
    state = StateFile(str(path), limiter)
    assert state.load() == 1
    key = Key(name="team", digest=b"x" * 32, token_quota=10**9, quota_period="day")
    for replaced, spend in ((b'{"keys": []}', 0), (b"[]", 3)):
        path.write_bytes(replaced)
        if spend:
            limiter.admit(key)
            limiter.charge(key, spend)
        await state.save(pull=True)
        assert json.loads(path.read_bytes())["keys"]["team"]["periods"]["day"][2] == 5 + spend
    asides = sorted(n for n in os.listdir(tmp_path) if n.startswith("s.corrupt-"))
    assert [(tmp_path / a).read_bytes() for a in asides] == [b'{"keys": []}', b"[]"]
    assert sum("is not gateway state" in r.getMessage() for r in caplog.records) == 2
    assert limiter.usage["team"].periods["day"].tokens == 8


def test_a_file_replaced_while_serving_is_set_aside_and_syncing_goes_on(tmp_path: Path) -> None:
    args = setup(tmp_path)
    state = tmp_path / "spend.state"
    port = free_port()
    with (
        serving(tmp_path, [*args, "--port", str(port), "--state", str(state)], clean_env(),
                port) as (_, url),
        httpx.Client(timeout=10) as client,
    ):  # fmt: skip
        ask(client, url)
        until_written(state, 1)
        state.write_bytes(b'{"keys": []}')  # what stopped every sync before
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not list(tmp_path.glob("spend.state.corrupt-*")):
            time.sleep(0.05)
        until_written(state, 1)  # the totals written back
        ask(client, url)
        until_written(state, 2)  # and later spend still reaches the file
    log = (tmp_path / "serve.log").read_text()
    assert "is not gateway state" in log and "Traceback" not in log


async def test_a_sync_that_raises_is_logged_and_the_timer_tries_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.state import file

    monkeypatch.setattr(file, "EVERY", 0.01)
    limiter = Limiter()
    limiter.usage["a"] = KeyUsage(spent=7)
    limiter.dirty.add("a")
    state = StateFile(str(tmp_path / "s"), limiter)
    merge, calls = state._merge, []

    def once(delta: file.Counts, base: file.Counts) -> object:
        calls.append(delta)
        if len(calls) == 1:
            raise RuntimeError("a fault the sync did not expect")
        return merge(delta, base)

    state._merge = once  # type: ignore[method-assign,assignment]
    state.start()
    try:
        await until(lambda: (tmp_path / "s").exists())
    finally:
        await state.close()
    assert json.loads((tmp_path / "s").read_bytes())["keys"]["a"]["spent"] == 7
    assert calls[0] == calls[1]  # the same spend went out again
    (failed,) = [r for r in caplog.records if "cannot sync" in r.getMessage()]
    assert failed.exc_info is not None and "trying again" in failed.getMessage()


async def test_a_failed_write_leaves_no_temp_file_and_is_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = Limiter()
    limiter.usage["a"] = KeyUsage(spent=7)
    limiter.dirty.add("a")
    state = StateFile(str(tmp_path / "s"), limiter)
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    await state.save()
    assert sorted(os.listdir(tmp_path)) == ["s.lock"]
    assert any("No space left on device; trying again" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(os, "fsync", real_fsync)
    await state.save()
    assert json.loads((tmp_path / "s").read_bytes())["keys"]["a"]["spent"] == 7
    assert sorted(os.listdir(tmp_path)) == ["s", "s.lock"]


async def test_a_symlink_at_a_temp_path_is_never_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the old fixed temp path it is simply not used; at the very name a sync picks
    (the random part forced), the exclusive create refuses it and the sync fails."""
    from gateway.state import file

    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    (tmp_path / "s.tmp").symlink_to(outside)
    limiter = Limiter()
    limiter.usage["a"] = KeyUsage(spent=7)
    limiter.dirty.add("a")
    state = StateFile(str(tmp_path / "s"), limiter)
    await state.save()
    assert json.loads((tmp_path / "s").read_bytes())["keys"]["a"]["spent"] == 7
    assert outside.read_bytes() == b"precious"

    monkeypatch.setattr(file.secrets, "token_hex", lambda n: "f" * 2 * n)
    planted = tmp_path / f".s.{os.getpid()}.{'f' * 16}.tmp"
    planted.symlink_to(outside)
    limiter.usage["a"].spent = 9
    limiter.dirty.add("a")
    await state.save()
    assert outside.read_bytes() == b"precious" and planted.is_symlink()
    assert json.loads((tmp_path / "s").read_bytes())["keys"]["a"]["spent"] == 7
    assert "a" in limiter.dirty  # kept for the next sync


def _read_only(folder: Path) -> list[str]:
    """A prefix running a command with `folder` read-only: a read-only bind mount in a
    user namespace (root ignores permission bits), or plain permissions otherwise."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        pytest.skip("running as root without unshare: no way to make a folder read-only")
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        pytest.skip("user namespaces are not available")
    script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, str(folder)]


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("where", ["read-only", "missing"])
def test_a_state_path_that_cannot_be_written_refuses_before_serving(
    tmp_path: Path, workers: str, where: str
) -> None:
    args = setup(tmp_path)
    folder = tmp_path / "var"
    prefix: list[str] = []
    if where == "read-only":
        folder.mkdir()
        prefix = _read_only(folder)
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "gateway", "serve", *args, "--port", str(free_port()),
         "--state", "var/gateway.state", "--workers", workers],
        cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.splitlines()
    reason = "Read-only file system" if prefix else "Permission denied"
    if where == "missing":
        reason = "the directory var does not exist"
    assert line.startswith("gateway: cannot write the state file var/gateway.state: ")
    assert reason in line
    assert line.endswith(
        "pass --state with a path in a writable directory "
        "(e.g. --state /var/lib/gateway/gateway.state) or --state none"
    )
    assert not list(tmp_path.glob("var/*"))
