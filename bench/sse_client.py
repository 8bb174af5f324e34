"""Stream client for `make bench` (scenarios 4 and 5): per-event relay delay.

Opens `--streams` streaming chat completions against 127.0.0.1:PORT, at most
`--concurrency` at a time, spread over `--ramp-seconds`. The paced upstream stamps each
event with `"t"` (time.time_ns() at its write); this client records arrival minus that
stamp for every event. Raw asyncio protocols (uvloop when installed) and a minimal
HTTP/1.1 parser keep the client cheap enough for 1,000 streams on one core. Prints one
JSON object on stdout.

SPEC §15's figures: `--role` asks for a role event before the content (the first content
comes one interval after it); time to first token is the first stamped (content) event's
arrival minus the request's write; a gap is the time between two events' arrivals; a
frame is late when it arrives more than LATE_MS after the upstream wrote it. With
`--keep-alive` the streams run one after another on one connection.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

STAMP = re.compile(rb'"t":(\d+)')
READ = re.compile(rb'"r":(\d+)')  # when the upstream read the request (--role streams)
CONNECT_TIMEOUT = 10.0
LATE_MS = 100.0  # SPEC §15: a held stream has no frame later than this
GAP_MS = 200.0  # ... and no gap between frames longer than this


class Stream(asyncio.Protocol):
    """One streaming request; parses the response head, chunked framing and SSE events."""

    def __init__(self, request: bytes, done: asyncio.Future[None], reuse: bool = False) -> None:
        self.request = request
        self.done = done
        self.reuse = reuse  # keep the connection open after a clean end (--keep-alive)
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
        self.read_ns = 0  # the upstream's "r": when it had read the request
        self.stamps: list[tuple[int, int]] = []  # (upstream send, client arrival) in ns

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.sent_ns = time.time_ns()
        self.transport.write(self.request)

    def again(self, done: asyncio.Future[None]) -> Stream:
        """The next request on this open connection; returns the finished one's record
        (a copy), this object starting over."""
        record = copy.copy(self)
        self.done = done
        self.raw, self.sse = bytearray(), bytearray()
        self.head_seen = self.chunked = self.ended = self.done_seen = False
        self.left, self.chunk_left, self.error = None, 0, None
        self.first_ns, self.read_ns, self.stamps = 0, 0, []
        assert self.transport is not None
        if self.transport.is_closing():
            self.error = "connection closed"
            done.set_result(None)
        else:
            self.sent_ns = time.time_ns()
            self.transport.write(self.request)
        return record

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
                    if read := READ.search(event):
                        self.read_ns = int(read.group(1))
                self.stamps.append((int(match.group(1)), now))
        del buf[:start]

    def _finish(self) -> None:
        clean = self.reuse and self.ended and not self.error and not self.raw
        if self.transport is not None and not self.transport.is_closing() and not clean:
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
    role: bool = False
    keep_alive: bool = False

    def request(self) -> bytes:
        fields: dict[str, Any] = {
            "model": self.model,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
            "bench_interval_ms": self.interval_ms,
            "bench_events": self.events,
        }
        if self.role:
            fields["bench_role"] = True
        body = json.dumps(fields, separators=(",", ":")).encode()
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


async def sequential(plan: Plan) -> list[Stream | str]:
    """`plan.streams` streams one after another on one keep-alive connection (a new one
    only when the server closed it)."""
    loop = asyncio.get_running_loop()
    timeout = plan.events * plan.interval_ms / 1000 + 30
    outcomes: list[Stream | str] = []
    stream: Stream | None = None
    for _ in range(plan.streams):
        done: asyncio.Future[None] = loop.create_future()
        if (
            stream is not None
            and stream.transport is not None
            and not stream.transport.is_closing()
        ):
            outcomes.append(stream.again(done))
        else:
            if stream is not None:
                outcomes.append(copy.copy(stream))
            try:
                _, stream = await asyncio.wait_for(
                    loop.create_connection(
                        lambda d=done: Stream(plan.request(), d, reuse=True),  # type: ignore[misc]
                        "127.0.0.1",
                        plan.port,
                    ),
                    CONNECT_TIMEOUT,
                )
            except (OSError, TimeoutError) as exc:
                outcomes.append(f"connect: {type(exc).__name__}")
                stream = None
                continue
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
    if stream is not None:
        outcomes.append(copy.copy(stream))
        if stream.transport is not None:
            stream.transport.close()
    return outcomes


async def run(plan: Plan) -> list[Stream | str]:
    if plan.keep_alive:
        return await sequential(plan)
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
    first_frames: list[float] = []  # the first content's relay delay: no upstream timer in it
    # Time to first token less the upstream's own time between reading the request and
    # writing the first content (its pacing timer): the request's way there plus the
    # first content's way back, what a proxy adds to, without the timer's jitter.
    nets: list[float] = []
    gaps: list[float] = []
    bursts = late = long_gaps = 0
    for outcome in outcomes:
        if isinstance(outcome, str):
            errors[outcome] += 1
            continue
        if outcome.error:
            errors[outcome.error] += 1
        if outcome.first_ns:
            firsts.append((outcome.first_ns - outcome.sent_ns) / 1e6)
        if outcome.stamps:
            first_frames.append((outcome.stamps[0][1] - outcome.stamps[0][0]) / 1e6)
            if outcome.read_ns:
                upstream_own = outcome.stamps[0][0] - outcome.read_ns
                nets.append((outcome.first_ns - outcome.sent_ns - upstream_own) / 1e6)
        previous: tuple[int, int] | None = None
        for sent, arrived in outcome.stamps:
            delay = (arrived - sent) / 1e6
            delays.append(delay)
            late += delay > LATE_MS
            if previous is not None:
                sent_gap, arrival_gap = sent - previous[0], arrived - previous[1]
                if arrival_gap < 2_000_000 and sent_gap >= plan.interval_ms * 500_000:
                    bursts += 1
                gaps.append(arrival_gap / 1e6)
                long_gaps += arrival_gap / 1e6 > GAP_MS
            previous = (sent, arrived)
    delays.sort()
    firsts.sort()
    first_frames.sort()
    nets.sort()

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
        "ttft_ms": {
            "p50": pct(firsts, 50),
            "p99": pct(firsts, 99),
            "max": round(firsts[-1], 3) if firsts else None,
        },
        "ttft_net_ms": {"p50": pct(nets, 50), "p99": pct(nets, 99)},
        "first_frame_delay_ms": {"p50": pct(first_frames, 50), "p99": pct(first_frames, 99)},
        "gap_ms": {"max": round(max(gaps), 3) if gaps else None},
        "late_frames": late,
        "long_gaps": long_gaps,
        "held": not errors and late == 0 and long_gaps == 0,
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
    parser.add_argument("--role", action="store_true", help="a role event before the content")
    parser.add_argument(
        "--keep-alive", action="store_true", help="the streams one after another on one connection"
    )
    args = parser.parse_args()
    plan = Plan(
        args.port,
        args.model,
        args.streams,
        args.concurrency,
        args.interval_ms,
        args.events,
        args.ramp_seconds,
        args.role,
        args.keep_alive,
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
