"""Stream client for `make bench` (scenarios 4 and 5): per-event relay delay.

Opens `--streams` streaming chat completions against 127.0.0.1:PORT, at most
`--concurrency` at a time, spread over `--ramp-seconds`. The paced upstream stamps each
event with `"t"` (time.time_ns() at its write); this client records arrival minus that
stamp for every event. Raw asyncio protocols (uvloop when installed) and a minimal
HTTP/1.1 parser keep the client cheap enough for 1,000 streams on one core. Prints one
JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

STAMP = re.compile(rb'"t":(\d+)')
CONNECT_TIMEOUT = 10.0


class Stream(asyncio.Protocol):
    """One streaming request; parses the response head, chunked framing and SSE events."""

    def __init__(self, request: bytes, done: asyncio.Future[None]) -> None:
        self.request = request
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()
        self.sse = bytearray()
        self.head_seen = False
        self.chunked = False
        self.left: int | None = None  # content-length bytes still to come
        self.chunk_left = 0
        self.ended = False
        self.done_seen = False
        self.error: str | None = None
        self.sent_ns = 0
        self.first_ns = 0
        self.stamps: list[tuple[int, int]] = []  # (upstream send, client arrival) in ns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.sent_ns = time.time_ns()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        self.raw += data
        if not self.head_seen and not self._head():
            return
        if self.chunked:
            self._dechunk()
        else:
            take = len(self.raw) if self.left is None else min(self.left, len(self.raw))
            self.sse += self.raw[:take]
            del self.raw[:take]
            if self.left is not None:
                self.left -= take
                self.ended = self.left == 0
        self._events(now)
        if self.ended or self.error:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.chunked and self.left is None and self.head_seen:
            self.ended = True  # body delimited by the close
        elif not self.ended and not self.error:
            self.error = "closed early"
        self._finish()

    def _head(self) -> bool:
        end = self.raw.find(b"\r\n\r\n")
        if end < 0:
            return False
        lines = bytes(self.raw[:end]).split(b"\r\n")
        del self.raw[: end + 4]
        self.head_seen = True
        status = lines[0].split(b" ", 2)[1].decode()
        if status != "200":
            self.error = f"status {status}"
            self._finish()
            return False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif name == b"content-length":
                self.left = int(value)
        return True

    def _dechunk(self) -> None:
        raw, pos = self.raw, 0
        while True:
            if self.chunk_left == 0:
                end = raw.find(b"\r\n", pos)
                if end < 0:
                    break
                line, pos = raw[pos:end], end + 2
                if not line:
                    continue  # the CRLF after a chunk's data
                size = int(bytes(line).split(b";")[0], 16)
                if size == 0:
                    self.ended = True
                    break
                self.chunk_left = size
            else:
                take = min(self.chunk_left, len(raw) - pos)
                if take == 0:
                    break
                self.sse += raw[pos : pos + take]
                pos += take
                self.chunk_left -= take
        del raw[:pos]

    def _events(self, now: int) -> None:
        buf, start = self.sse, 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            event = bytes(buf[start:end])
            start = end + 2
            if b"[DONE]" in event:
                self.done_seen = True
            elif b'"error"' in event:
                self.error = "error event"
            elif match := STAMP.search(event):
                if not self.stamps:
                    self.first_ns = now
                self.stamps.append((int(match.group(1)), now))
        del buf[:start]

    def _finish(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if not self.done.done():
            self.done.set_result(None)


@dataclass
class Plan:
    port: int
    model: str
    streams: int
    concurrency: int
    interval_ms: float
    events: int
    ramp_seconds: float

    def request(self) -> bytes:
        body = json.dumps(
            {
                "model": self.model,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
                "bench_interval_ms": self.interval_ms,
                "bench_events": self.events,
            },
            separators=(",", ":"),
        ).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{self.port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


async def one(plan: Plan, gate: asyncio.Semaphore) -> Stream | str:
    loop = asyncio.get_running_loop()
    timeout = plan.events * plan.interval_ms / 1000 + 30
    async with gate:
        done: asyncio.Future[None] = loop.create_future()
        try:
            _, stream = await asyncio.wait_for(
                loop.create_connection(
                    lambda: Stream(plan.request(), done), "127.0.0.1", plan.port
                ),
                CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            return f"connect: {type(exc).__name__}"
        try:
            await asyncio.wait_for(asyncio.shield(done), timeout)
        except TimeoutError:
            stream.error = stream.error or "timeout"
            if stream.transport is not None:
                stream.transport.abort()
        if not stream.error and not stream.done_seen:
            stream.error = "no [DONE]"
        if not stream.error and len(stream.stamps) != plan.events:
            stream.error = "missing events"
        return stream


async def run(plan: Plan) -> list[Stream | str]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(plan.concurrency)
    start = loop.time()
    tasks = []
    for i in range(plan.streams):
        tasks.append(asyncio.create_task(one(plan, gate)))
        wait = start + plan.ramp_seconds * (i + 1) / plan.streams - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
    return list(await asyncio.gather(*tasks))


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q / 100 * len(sorted_values)))]


def summarize(plan: Plan, outcomes: list[Stream | str], wall: float) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    delays: list[float] = []
    firsts: list[float] = []
    bursts = 0
    for outcome in outcomes:
        if isinstance(outcome, str):
            errors[outcome] += 1
            continue
        if outcome.error:
            errors[outcome.error] += 1
        if outcome.first_ns:
            firsts.append((outcome.first_ns - outcome.sent_ns) / 1e6)
        previous: tuple[int, int] | None = None
        for sent, arrived in outcome.stamps:
            delays.append((arrived - sent) / 1e6)
            if previous is not None:
                sent_gap, arrival_gap = sent - previous[0], arrived - previous[1]
                if arrival_gap < 2_000_000 and sent_gap >= plan.interval_ms * 500_000:
                    bursts += 1
            previous = (sent, arrived)
    delays.sort()
    firsts.sort()

    def pct(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else round(value, 3)

    return {
        "streams": plan.streams,
        "ok": plan.streams - sum(errors.values()),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "events": len(delays),
        "expected_events": plan.streams * plan.events,
        "delay_ms": {
            "p50": pct(delays, 50),
            "p90": pct(delays, 90),
            "p99": pct(delays, 99),
            "p999": pct(delays, 99.9),
            "max": round(delays[-1], 3) if delays else None,
        },
        "first_event_ms": {"p50": pct(firsts, 50), "p99": pct(firsts, 99)},
        "bursts": bursts,
        "wall_seconds": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="bench-paced")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--interval-ms", type=float, default=20)
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--ramp-seconds", type=float, default=0.0)
    args = parser.parse_args()
    plan = Plan(
        args.port,
        args.model,
        args.streams,
        args.concurrency,
        args.interval_ms,
        args.events,
        args.ramp_seconds,
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 4 * plan.concurrency + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    started = time.perf_counter()
    outcomes = runner(run(plan))
    print(json.dumps(summarize(plan, outcomes, time.perf_counter() - started)))


if __name__ == "__main__":
    main()
