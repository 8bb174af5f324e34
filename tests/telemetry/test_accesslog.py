"""gateway/telemetry/accesslog.py's BatchedHandler: lines wait, then leave in one write;
a stdout that cannot be written costs the lines, never the request that logged one."""

from __future__ import annotations

import io

import pytest

from gateway.telemetry.accesslog import BatchedHandler


class Broken(io.StringIO):
    """A stdout whose reader is gone: every write fails as a closed pipe's does."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_lines_leave_in_one_write_at_the_batch_size() -> None:
    out = io.StringIO()
    handler = BatchedHandler(out)
    for i in range(511):
        handler.add(f"line {i}")  # no running loop: each line is written at once
    assert out.getvalue().count("\n") == 511
    assert handler.lines == []


def test_a_broken_stdout_drops_lines_and_says_so_once(capsys: pytest.CaptureFixture[str]) -> None:
    handler = BatchedHandler(Broken())
    handler.lines = [f"line {i}" for i in range(511)]
    handler.add("the 512th line")  # the batch is full: flushed inline, as served() does
    handler.add("and another")
    handler.flush()
    assert handler.lines == []
    err = capsys.readouterr().err
    assert err.count("access log cannot be written") == 1
    assert "Broken pipe" in err


def test_a_closed_stdout_drops_lines(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    handler = BatchedHandler(out)
    out.close()
    handler.add("a line")
    assert handler.lines == []
    assert "access log cannot be written" in capsys.readouterr().err
