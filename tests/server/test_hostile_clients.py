"""Hostile clients (SPEC §7, client side) against the gateway's own HTTP/1.1 server.

Three layers:
- CORPUS: raw byte cases sent over loopback to a real gateway (in-process, uvicorn with
  ServerProtocol, a recording upstream behind it); each case states what the gateway
  must answer. bench/hostile_corpus.py sends the same bytes to nginx and prints both.
- Scenarios the corpus cannot state as bytes alone: reads counted, memory of a
  subprocess fed 200 MiB of header, the connection cap (idle, slowloris, in flight,
  a lowered open-file limit), what the upstream sees.
- ServerProtocol on an in-memory transport with a clock advanced by hand: the
  head byte count across reads, the field cap, a refusal queued behind pipelined
  answers, and the head and body deadlines (also while the gateway paused reading).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from uvicorn.server import ServerState

from gateway.server.admission import ServerLimits
from gateway.server.protocol import ServerProtocol
from tests.conftest import GatewayFactory, RunningGateway, one_provider
from tests.helpers import MemoryTransport, assert_envelope, free_port, stop
from tests.scripted_upstream import Hang, Json, Upstream, chat_completion

WAIT = 5.0  # the longest any single step may take before the test fails instead of hanging
SLUG = "echo"  # the model every case asks for (bench/hostile_corpus.py: the built-in echo)
TIMEOUT = 0.5  # header_timeout and body_timeout of the gateway the corpus runs against
LIMIT = 65536  # the default max_header_bytes
CHAT = b"/v1/chat/completions"
BODY = json.dumps(
    {"model": SLUG, "messages": [{"role": "user", "content": "hello from a hostile client"}]}
).encode()


# --------------------------------------------------------------------------- the corpus


def request(
    *headers: str,
    method: str = "POST",
    target: bytes = CHAT,
    body: bytes | None = BODY,
    eol: bytes = b"\r\n",
) -> bytes:
    """One request's bytes: request line, `host`, the given header lines, then (when a
    body is given) `content-type` (the keyless sidecar serves JSON only, SPEC §13),
    `content-length` and the body."""
    lines = [method.encode() + b" " + target + b" HTTP/1.1", b"host: 127.0.0.1"]
    lines += [h.encode() for h in headers]
    if body is not None:
        lines.append(b"content-type: application/json")
        lines.append(b"content-length: %d" % len(body))
    return eol.join(lines) + eol + eol + (body or b"")


def get(path: str, *headers: str) -> bytes:
    return request(*headers, method="GET", target=path.encode(), body=None)


def padded(total: int) -> bytes:
    """A chat POST whose head (request line through the blank line) is exactly `total`
    bytes on the wire, the padding in one cookie (which is not forwarded: the recording
    upstream reads heads of at most 64 KiB)."""
    bare = len(request("cookie: c=")) - len(BODY)
    whole = request("cookie: c=" + "a" * (total - bare))
    assert len(whole) - len(BODY) == total
    return whole


def head_of(data: bytes) -> bytes:
    """A request without its body (BODY)."""
    assert data.endswith(BODY)
    return data[: -len(BODY)]


def fields(count: int) -> bytes:
    """A POST with exactly `count` header fields (host, content-type and content-length
    included)."""
    return request(*(f"x-f{i}: v" for i in range(count - 3)))


def pieces(data: bytes, size: int) -> tuple[bytes, ...]:
    return tuple(data[i : i + size] for i in range(0, len(data), size))


def chunked(data: bytes, *sizes: bytes) -> bytes:
    """A chunked body; `sizes` overrides the size lines (to break them)."""
    half = len(data) // 2
    parts = [data[:half], data[half:]]
    lines = sizes or tuple(b"%x" % len(p) for p in parts)
    return b"".join(s + b"\r\n" + p + b"\r\n" for s, p in zip(lines, parts, strict=True)) + (
        b"0\r\n\r\n"
    )


@dataclass(frozen=True)
class Case:
    """Bytes a hostile client sends: `parts` written in order, `gap` seconds apart.
    `expect` is what the gateway must answer, as Seen prints it; `upstream` how many
    requests reach the upstream."""

    name: str
    what: str
    parts: tuple[bytes, ...]
    expect: str
    upstream: int = 0
    gap: float = 0.0


TRICKLE = 0.2  # seconds between trickled pieces: under TIMEOUT, yet they add up past it
H2C = (
    "connection: Upgrade, HTTP2-Settings",
    "upgrade: h2c",
    "http2-settings: AAMAAABkAAQAAP__",
)
WEBSOCKET = (
    "connection: Upgrade",
    "upgrade: websocket",
    "sec-websocket-version: 13",
    "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
)
TE = "transfer-encoding: chunked"

CORPUS: tuple[Case, ...] = (
    # sizes
    Case(
        "head-over-limit-one-write",
        "a 70 KiB head (one field) in one write",
        (padded(70_000),),
        "431 header_too_large, close",
    ),
    Case(
        "head-over-limit-1k-writes",
        "the same head in 1 KiB writes, 2 ms apart",
        pieces(padded(70_000), 1024),
        "431 header_too_large, close",
        gap=0.002,
    ),
    Case(
        "head-just-under-limit",
        "a head of exactly 65,536 bytes",
        (padded(LIMIT),),
        "200, open",
        upstream=1,
    ),
    Case("fields-256", "256 header fields", (fields(256),), "200, open", upstream=1),
    Case("fields-257", "257 header fields", (fields(257),), "431 header_too_large, close"),
    Case(
        "url-1mib",
        "a 1 MiB request target",
        (request(target=CHAT + b"?q=" + b"a" * (1 << 20)),),
        "414 uri_too_long, close",
    ),
    # deadlines
    Case(
        "head-one-byte",
        "one byte of a head, then silence",
        (b"P",),
        "408 request_timeout, close",
    ),
    Case(
        "head-trickle",
        "a head 10 bytes per 0.2 s, never finished",
        pieces(request("x-slow: " + "s" * 200, body=None), 10)[:20],
        "408 request_timeout, close",
        gap=TRICKLE,
    ),
    Case(
        "body-stall",
        "a body half sent, then silence",
        (request()[: -len(BODY) // 2],),
        "408 request_timeout, close",
    ),
    Case(
        "body-trickle",
        "a body in pieces 0.2 s apart, 1.4 s in all",
        (head_of(request()), *pieces(BODY, len(BODY) // 6 + 1)),
        "200, open",
        upstream=1,
        gap=TRICKLE,
    ),
    # expect, upgrades
    Case(
        "expect-100",
        "`Expect: 100-continue`, the body 0.2 s after the head",
        (head_of(request("expect: 100-continue")), BODY),
        "100, 200, open",
        upstream=1,
        gap=TRICKLE,
    ),
    Case(
        "h2c-upgrade",
        "POST with `Upgrade: h2c` and a JSON body",
        (request(*H2C),),
        "200, close",
        upstream=1,
    ),
    Case(
        "websocket-upgrade",
        "GET /v1/chat/completions with `Upgrade: websocket`, then a frame",
        (get("/v1/chat/completions", *WEBSOCKET) + b"\x81\x05hello",),
        "404 not_found, close",
    ),
    # pipelining
    Case(
        "pipelined-then-malformed",
        "GET /healthz, a chat POST, then `GARBAGE`, in one write",
        (get("/healthz") + request() + b"GARBAGE\r\n\r\n",),
        "200 x2, 400 bad_request, close",
        upstream=1,
    ),
    Case(
        "pipelined-300-small",
        "300 pipelined GET /healthz of 1 KiB each (308 KiB) in one write",
        (b"".join(get("/healthz", "x-pad: " + "p" * 1000) for _ in range(300)),),
        "200 x300, open",
    ),
    # framing and smuggling
    Case(
        "cl-and-te",
        "Content-Length and Transfer-Encoding: chunked",
        (
            request(TE, body=None).removesuffix(b"\r\n")
            + b"content-length: 4\r\n\r\n"
            + chunked(BODY),
        ),
        "400 bad_request, close",
    ),
    Case(
        "two-content-lengths",
        "two differing Content-Length fields",
        (
            request(f"content-length: {len(BODY) - 1}", body=None).removesuffix(b"\r\n")
            + b"content-length: %d\r\n\r\n" % len(BODY)
            + BODY,
        ),
        "400 bad_request, close",
    ),
    Case(
        "bad-chunk-size",
        "a chunk size line `zz`",
        (request(TE, body=None) + chunked(BODY, b"zz", b"10"),),
        "400 bad_request, close",
    ),
    Case(
        "bare-lf",
        "every line ending a bare LF",
        (request(eol=b"\n"),),
        "400 bad_request, close",
    ),
    Case(
        "obs-fold",
        "a header line starting with a space (obs-fold)",
        (request("x-folded: first", " second"),),
        "400 bad_request, close",
    ),
    # framing nginx refuses (SPEC §13)
    Case(
        "http-2.0",
        "a request line saying HTTP/2.0",
        (request().replace(b"HTTP/1.1", b"HTTP/2.0", 1),),
        "505 http_version_not_supported, close",
    ),
    Case(
        "http-3.0",
        "a request line saying HTTP/3.0",
        (request().replace(b"HTTP/1.1", b"HTTP/3.0", 1),),
        "505 http_version_not_supported, close",
    ),
    Case(
        "te-identity-chunked",
        "`Transfer-Encoding: identity, chunked`",
        (request("transfer-encoding: identity, chunked", body=None) + chunked(BODY),),
        "501 not_implemented, close",
    ),
    Case(
        "te-gzip-chunked",
        "`Transfer-Encoding: gzip, chunked`",
        (request("transfer-encoding: gzip, chunked", body=None) + chunked(BODY),),
        "501 not_implemented, close",
    ),
    Case(
        "te-on-http-1.0",
        "HTTP/1.0 with `Transfer-Encoding: chunked`",
        (request(TE, body=None).replace(b"HTTP/1.1", b"HTTP/1.0", 1) + chunked(BODY),),
        "400 bad_request, close",
    ),
    Case(
        "no-host",
        "an HTTP/1.1 request without Host",
        (request().replace(b"host: 127.0.0.1\r\n", b"", 1),),
        "400 bad_request, close",
    ),
    Case(
        "two-hosts",
        "an HTTP/1.1 request with two Host fields",
        (request("host: 127.0.0.1"),),
        "400 bad_request, close",
    ),
    Case(
        "encoded-slash",
        "`%2F` in the path: /v1/chat%2Fcompletions",
        (request(target=b"/v1/chat%2Fcompletions"),),
        "404 not_found, close",
    ),
    Case(
        "pipelined-then-http-2.0",
        "GET /healthz, a chat POST, then an HTTP/2.0 request, in one write",
        (get("/healthz") + request() + request().replace(b"HTTP/1.1", b"HTTP/2.0", 1),),
        "200 x2, 505 http_version_not_supported, close",
        upstream=1,
    ),
    # bytes that begin no request (SPEC §13): closed at the head deadline, unanswered
    Case("crlf", "a lone CRLF, then silence", (b"\r\n",), "no answer, close"),
    Case(
        "crlf-trickle",
        "a CRLF every 0.2 s, past the head deadline",
        (b"\r\n",) * 8,
        "no answer, close",
        gap=TRICKLE,
    ),
    Case(
        "crlf-then-head",
        "a CRLF, then 0.3 s later a head that never ends",
        (b"\r\n", b"\r\n", b"POST /v1/chat"),
        "408 request_timeout, close",
        gap=0.15,
    ),
)


# --------------------------------------------------------------------------- raw client


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    @property
    def code(self) -> str | None:
        """The envelope's `code`, when the answer is one."""
        if not (self.header(b"content-type") or b"").startswith(b"application/json"):
            return None
        try:
            error = json.loads(self.body)["error"]
        except (ValueError, KeyError, TypeError):
            return None
        return error.get("code") if isinstance(error, dict) else None

    def as_httpx(self) -> httpx.Response:
        return httpx.Response(self.status, headers=self.headers, content=self.body)


def parse_answers(data: bytes) -> tuple[list[Answer], bytes]:
    """Every whole response in `data` (1xx, content-length, chunked, or to the end), and
    what is left over."""
    answers = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0 or not data.startswith(b"HTTP/1."):
            break
        lines = data[:end].split(b"\r\n")
        rest = data[end + 4 :]
        status = int(lines[0].split(b" ")[1])
        headers = [(n.strip(), v.strip()) for n, _, v in (x.partition(b":") for x in lines[1:])]
        answer = Answer(status, headers, b"")
        if status < 200 or status in (204, 304):
            pass
        elif (answer.header(b"transfer-encoding") or b"").lower() == b"chunked":
            parts = []
            while True:
                size_end = rest.find(b"\r\n")
                if size_end < 0:
                    return answers, data
                size = int(rest[:size_end].split(b";")[0], 16)
                if len(rest) < size_end + 2 + size + 2:
                    return answers, data
                parts.append(rest[size_end + 2 : size_end + 2 + size])
                rest = rest[size_end + 2 + size + 2 :]
                if size == 0:
                    rest = rest[rest.find(b"\r\n") + 2 :] if not rest.startswith(b"\r\n") else rest
                    break
            answer.body = b"".join(parts)
        elif (length := answer.header(b"content-length")) is not None:
            if len(rest) < int(length):
                return answers, data
            answer.body, rest = rest[: int(length)], rest[int(length) :]
        else:
            answer.body, rest = rest, b""
        answers.append(answer)
        data = rest
    return answers, data


@dataclass
class Seen:
    """What a server did with a case: its answers in order, then how the connection
    ended: `close` (FIN), `reset` (RST), or `open` (still open when the client stopped
    waiting)."""

    answers: list[Answer]
    ending: str
    stray: bytes = b""  # bytes that parse as no response

    def __str__(self) -> str:
        said: list[str] = []
        runs: list[int] = []
        for a in self.answers:  # a run of the same answer as `200 x300`
            label = f"{a.status} {a.code}" if a.code else str(a.status)
            if said and said[-1] == label:
                runs[-1] += 1
            else:
                said.append(label)
                runs.append(1)
        said = [f"{label} x{n}" if n > 1 else label for label, n in zip(said, runs, strict=True)]
        if self.stray:
            said.append(f"unparsed {self.stray[:20]!r}")
        return ", ".join([*(said or ["no answer"]), self.ending])

    @property
    def closed(self) -> bool:
        return self.ending in ("close", "reset")


async def observe(port: int, case: Case, quiet: float) -> Seen:
    """Send `case` to 127.0.0.1:port and read until the server closes, or until it has
    sent nothing for `quiet` seconds after the client's last byte. Sending stops as soon
    as the server has closed."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    received = bytearray()
    ending = "open"

    async def read_all() -> None:
        nonlocal ending
        try:
            while data := await reader.read(1 << 16):
                received.extend(data)
            ending = "close"
        except ConnectionResetError:
            ending = "reset"

    reading = asyncio.create_task(read_all())
    try:
        with suppress(ConnectionError):
            for i, part in enumerate(case.parts):
                if i and case.gap:
                    await asyncio.wait({reading}, timeout=case.gap)
                if reading.done():
                    break
                writer.write(part)
                await writer.drain()
        while not reading.done():
            before = len(received)
            await asyncio.wait({reading}, timeout=quiet)
            if len(received) == before:
                break
    finally:
        reading.cancel()
        with suppress(asyncio.CancelledError):
            await reading
        writer.close()
        with suppress(ConnectionError):
            await asyncio.wait_for(writer.wait_closed(), WAIT)
    answers, stray = parse_answers(bytes(received))
    return Seen(answers, ending, stray)


def normal(outcome: str) -> str:
    """A reset after the answer is a close for what the client can tell (the server
    closed with the rest of the request unread)."""
    return outcome.removesuffix(", reset") + ", close" if outcome.endswith(", reset") else outcome


# --------------------------------------------------------------------------- the corpus against the gateway


@pytest.fixture
async def hostile(gateway: GatewayFactory, upstream: Upstream) -> RunningGateway:
    return await gateway(
        one_provider(upstream, slug=SLUG), header_timeout=TIMEOUT, body_timeout=TIMEOUT
    )


@pytest.mark.parametrize(
    "case",
    CORPUS,
    ids=[c.name for c in CORPUS],
)
async def test_corpus_case(case: Case, hostile: RunningGateway, upstream: Upstream) -> None:
    # A case that must end open is done once quiet for a moment; one that must close
    # gets a bounded wait for the close.
    quiet = 0.3 if case.expect.endswith("open") else WAIT
    seen = await observe(hostile.port, case, quiet)
    assert normal(str(seen)) == case.expect, seen
    for answer in seen.answers:
        if answer.status >= 400:
            assert_envelope(answer.as_httpx(), answer.status, answer.code or "?")
    if seen.closed and seen.answers and seen.answers[-1].status >= 400:
        assert seen.answers[-1].header(b"connection") == b"close"
    assert len(upstream.requests) == case.upstream, upstream.requests
    for sent in upstream.requests:
        assert sent.json()["messages"] == json.loads(BODY)["messages"]
    # And the gateway is none the worse for it.
    after = Case("after", "", (get("/healthz", "connection: close"),), "")
    assert str(await observe(hostile.port, after, WAIT)) == "200, close"


def named(name: str) -> Case:
    return next(c for c in CORPUS if c.name == name)


# --------------------------------------------------------------------------- head sizes


async def test_head_over_limit_431_details_and_the_spanning_reads(
    hostile: RunningGateway, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    data_received = ServerProtocol.data_received

    def counting(self: ServerProtocol, data: bytes) -> None:
        reads.append(len(data))
        data_received(self, data)

    monkeypatch.setattr(ServerProtocol, "data_received", counting)
    seen = await observe(hostile.port, named("head-over-limit-1k-writes"), WAIT)
    assert normal(str(seen)) == "431 header_too_large, close"
    err = assert_envelope(seen.answers[0].as_httpx(), 431, "header_too_large")
    assert err["details"] == {"max_bytes": LIMIT, "max_fields": 256}
    # The head really arrived over many reads, and no more than the limit of it (plus
    # the read that passed it) was taken in.
    assert len(reads) > 10, reads
    assert sum(reads) <= LIMIT + 2048, reads
    assert upstream.requests == []


async def test_head_limits_follow_max_header_bytes(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway(one_provider(upstream, slug=SLUG), max_header_bytes=4096)
    seen = await observe(gw.port, Case("", "", (padded(4000),), ""), 0.3)
    assert str(seen) == "200, open"
    seen = await observe(gw.port, Case("", "", pieces(padded(5000), 100), ""), WAIT)
    assert normal(str(seen)) == "431 header_too_large, close"
    assert json.loads(seen.answers[0].body)["error"]["details"]["max_bytes"] == 4096
    seen = await observe(gw.port, Case("", "", (get("/healthz?" + "q" * 5000),), ""), WAIT)
    assert normal(str(seen)) == "414 uri_too_long, close"
    assert len(upstream.requests) == 1


# --------------------------------------------------------------------------- memory (a subprocess)

ECHO_ROUTES = f"""\
providers:
  echo:
    base_url: builtin:echo
models:
  {SLUG}:
    providers:
      - provider: echo
"""


@contextmanager
def serve(
    tmp_path: Path, *flags: str, preexec_fn: Callable[[], None] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`python -m gateway serve` on the echo routes, ready (its /healthz answered);
    stopped by its pid when done."""
    (tmp_path / "routes.yaml").write_text(ECHO_ROUTES)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "gateway", "serve", "--routes", "routes.yaml"),
                *("--port", str(port), "--log-level", "warning", *flags),
            ],
            cwd=tmp_path,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,  # only setrlimit, before exec
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, log_path.read_text()
            with suppress(OSError):
                if healthz(port, 1.0) == 200:
                    break
            assert time.monotonic() < deadline, "gateway not ready in 10 s: " + log_path.read_text()
            time.sleep(0.05)
        yield proc, port
    finally:
        stop(proc)


def answer_to(data: bytes, port: int, timeout: float = WAIT) -> Answer:
    """Send `data` on a fresh connection (blocking, each step bounded by `timeout`); the
    one answer, read until the server closes (a reset after it counts as a close)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        with suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    answers, _ = parse_answers(received)
    assert len(answers) == 1, received
    return answers[0]


def healthz(port: int, timeout: float) -> int:
    """GET /healthz on a fresh connection: its status."""
    return answer_to(get("/healthz", "connection: close"), port, timeout).status


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_200_mib_header_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    with serve(tmp_path) as (proc, port):
        before = vm_hwm_kib(proc.pid)
        sent = 0
        total = 200 << 20
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nx-huge: ")
            piece = b"a" * (1 << 20)
            with suppress(BrokenPipeError, ConnectionResetError):
                while sent < total:
                    # Stop as soon as the server has answered or closed.
                    readable, writable, _ = select.select([sock], [sock], [], WAIT)
                    if readable:
                        break
                    assert writable, "the gateway neither reads nor answers"
                    sent += sock.send(piece)
            data = b""
            with suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    data += chunk
        answers, _ = parse_answers(data)
        assert [a.status for a in answers] == [431], data[:300]
        assert answers[0].code == "header_too_large"
        assert sent < 64 << 20  # it was cut off early, not read to the end
        after = vm_hwm_kib(proc.pid)
        assert after < 150 * 1024, (before, after)
        assert after - before < 32 * 1024, (before, after)
        assert healthz(port, WAIT) == 200


# --------------------------------------------------------------------------- connection cap


@asynccontextmanager
async def opened(
    port: int, count: int
) -> AsyncIterator[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(count):
            conns.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT))
        yield conns
    finally:
        for _, writer in conns:
            writer.close()
        for _, writer in conns:
            with suppress(ConnectionError):
                await asyncio.wait_for(writer.wait_closed(), WAIT)


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One whole answer from the connection (bounded wait)."""
    data = b""

    async def read() -> Answer:
        nonlocal data
        while True:
            answers, _ = parse_answers(data)
            if answers:
                return answers[0]
            chunk = await reader.read(1 << 16)
            assert chunk, f"closed before a whole answer: {data!r}"
            data += chunk

    return await asyncio.wait_for(read(), WAIT)


async def ended(reader: asyncio.StreamReader, seconds: float = WAIT) -> bytes:
    """Everything the server sends until it closes (bounded wait)."""
    try:
        return await asyncio.wait_for(reader.read(), seconds)
    except ConnectionResetError:
        return b""


async def until(check: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"not within {WAIT} s: {what}"
        await asyncio.sleep(0.01)


CAP = 6


async def test_at_the_cap_the_longest_idle_keep_alive_connection_makes_room(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway(one_provider(upstream, slug=SLUG), max_connections=CAP)
    loop = asyncio.get_running_loop()
    async with opened(gw.port, CAP) as idle:
        # The last one opened is the first to go idle: idle time counts, not age.
        for reader, writer in reversed(idle):
            writer.write(get("/healthz"))
            assert (await read_answer(reader)).status == 200
            since = loop.time()  # uvloop's clock moves in milliseconds: no ties
            await until(lambda since=since: loop.time() > since + 0.001, "a clock tick")
        async with opened(gw.port, 1) as [(reader, writer)]:
            writer.write(request())
            assert (await read_answer(reader)).status == 200
            # The connection idle the longest was closed, with no answer.
            assert await ended(idle[-1][0]) == b""
            for other_reader, other_writer in idle[:-1]:
                other_writer.write(get("/healthz"))
                assert (await read_answer(other_reader)).status == 200


async def test_at_the_cap_a_slow_head_makes_room_for_healthz(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway(one_provider(upstream, slug=SLUG), max_connections=CAP, header_timeout=5)
    async with opened(gw.port, CAP) as slow:
        connections = gw.server.server_state.connections
        for i, (_, writer) in enumerate(slow):
            writer.write(b"G")
            # One at a time, so the first one's head is the oldest.
            await until(
                lambda i=i: sum(1 for c in connections if c.head_since) == i + 1,
                "the gateway saw the head begin",
            )
        await asyncio.sleep(1.2)  # the heads have been arriving for over a second now
        async with opened(gw.port, 1) as [(reader, writer)]:
            writer.write(get("/healthz"))
            answer = await read_answer(reader)
            assert answer.status == 200
            assert json.loads(answer.body)["status"] == "ok"
        # One slowloris connection went, told why; the others were left alone.
        evicted = await ended(slow[0][0])
        answers, _ = parse_answers(evicted)
        assert [a.status for a in answers] == [503], evicted
        assert_envelope(answers[0].as_httpx(), 503, "overloaded")
        assert answers[0].header(b"retry-after") == b"1"
        for reader, writer in slow[1:]:
            assert not reader.at_eof()
            writer.write(b"ET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            assert (await read_answer(reader)).status == 200


async def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    upstream.default = Hang()
    gw = await gateway(one_provider(upstream, slug=SLUG), max_connections=CAP)
    async with opened(gw.port, CAP) as busy:
        for _, writer in busy:
            writer.write(request())
        await until(lambda: len(upstream.requests) == CAP, "every request at the upstream")
        async with opened(gw.port, 1) as [(reader, writer)]:
            writer.write(get("/healthz"))
            rest = await ended(reader)
        answers, stray = parse_answers(rest)
        assert [a.status for a in answers] == [503], rest
        assert stray == b""
        assert_envelope(answers[0].as_httpx(), 503, "overloaded")
        assert answers[0].header(b"retry-after") == b"1"
        assert answers[0].header(b"connection") == b"close"
        assert not any(reader.at_eof() for reader, _ in busy)  # the busy ones untouched
    # With them gone, there is room again.
    connections = gw.server.server_state.connections
    await until(lambda: not connections, "the gateway saw the clients leave")
    upstream.default = Json()
    async with opened(gw.port, 1) as [(reader, writer)]:
        writer.write(get("/healthz"))
        assert (await read_answer(reader)).status == 200


def test_with_a_low_open_file_limit_300_slow_heads_do_not_take_it_down(tmp_path: Path) -> None:
    """Open-file limit 256: the cap is (256 - 64) // 2 = 96 connections. 300 slowloris
    connections: past the cap each new one gets 503 until the slow heads may be closed
    (over 1 s) or time out (--header-timeout 1); /healthz on a fresh connection answers
    200 by then at the latest, and never gets a silent close."""

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with serve(tmp_path, "--header-timeout", "1", preexec_fn=low_nofile) as (proc, port):
        socks: list[socket.socket] = []
        try:
            for _ in range(300):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.settimeout(WAIT)
                sock.connect(("127.0.0.1", port))
                with suppress(OSError):  # the gateway may have refused it already
                    sock.send(b"G")
            statuses = []
            deadline = time.monotonic() + 1 + WAIT  # the header timeout, then a bound
            while not statuses or statuses[-1] != 200:
                assert time.monotonic() < deadline, statuses
                answer = answer_to(get("/healthz", "connection: close"), port)
                statuses.append(answer.status)
                if answer.status != 200:
                    assert_envelope(answer.as_httpx(), 503, "overloaded")
                    assert answer.header(b"retry-after") == b"1"
                    time.sleep(0.05)  # the polling interval
            assert proc.poll() is None
        finally:
            for sock in socks:
                sock.close()
        assert healthz(port, WAIT) == 200
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        assert fds < 256, fds
        assert proc.poll() is None
    log = (tmp_path / "serve.log").read_text()
    assert "Too many open files" not in log, log
    assert "Traceback" not in log, log


# --------------------------------------------------------------------------- what the upstream sees

KEYS = "keys:\n  - name: tenant\n    key: sk-gw-tenant-secret\n"


async def test_expect_100_continue_is_answered_here_and_not_forwarded(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway(one_provider(upstream, slug=SLUG), KEYS)
    async with opened(gw.port, 1) as [(reader, writer)]:
        writer.write(
            head_of(request("authorization: Bearer sk-gw-tenant-secret", "expect: 100-continue"))
        )
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        assert await asyncio.wait_for(reader.readexactly(len(interim)), WAIT) == interim
        assert upstream.requests == []  # nothing goes upstream before the body
        writer.write(BODY)
        answer = await read_answer(reader)
        assert answer.status == 200, answer
    [sent] = upstream.requests
    assert sent.header("expect") is None
    assert sent.json()["messages"] == json.loads(BODY)["messages"]


async def test_client_credential_headers_never_reach_the_upstream(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway(one_provider(upstream, slug=SLUG), KEYS)
    secrets = {
        "authorization": "Bearer sk-gw-tenant-secret",
        "x-api-key": "client-secret-1",
        "api-key": "client-secret-2",
        "proxy-authorization": "Basic client-secret-3",
        "cookie": "session=client-secret-4",
        "X-API-Key": "client-secret-5",
    }
    async with opened(gw.port, 1) as [(reader, writer)]:
        writer.write(request(*(f"{k}: {v}" for k, v in secrets.items()), "x-kept: yes"))
        assert (await read_answer(reader)).status == 200
    [sent] = upstream.requests
    names = [name for name, _ in sent.headers]
    for name in ("x-api-key", "api-key", "proxy-authorization", "cookie"):
        assert name not in names, sent.headers
    assert sent.header("authorization") == "Bearer sk-upstream-secret"
    assert names.count("authorization") == 1
    assert sent.header("x-kept") == "yes"
    everything = repr(sent.headers)
    for value in secrets.values():
        assert value not in everything
    assert "sk-gw-tenant-secret" not in sent.body.decode()


async def test_h2c_upgrade_is_served_as_http_with_its_body(
    hostile: RunningGateway, upstream: Upstream
) -> None:
    async with opened(hostile.port, 1) as [(reader, writer)]:
        writer.write(request(*H2C))
        answer = await read_answer(reader)
        assert answer.status == 200
        assert json.loads(answer.body)["model"] == SLUG
        assert await ended(reader) == b""  # an upgrade request is the connection's last
    [sent] = upstream.requests
    assert sent.json() == {**json.loads(BODY), "model": "upstream-model"}
    names = {name for name, _ in sent.headers}
    assert not names & {"upgrade", "http2-settings", "connection"}, sent.headers


async def test_websocket_upgrade_off_responses_is_404_at_once(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    # Default deadlines (10 s head, 30 s body), longer than the wait: nothing is waited for.
    # (The handshake reaches the app, which serves WebSocket on /v1/responses only.)
    gw = await gateway(one_provider(upstream, slug=SLUG))
    async with opened(gw.port, 1) as [(reader, writer)]:
        writer.write(get("/v1/chat/completions", *WEBSOCKET))  # and the client waits
        rest = await ended(reader)
    answers, stray = parse_answers(rest)
    assert ([a.status for a in answers], stray) == ([404], b"")
    assert_envelope(answers[0].as_httpx(), 404, "not_found")
    assert answers[0].header(b"upgrade") is None
    assert upstream.requests == []


async def test_pipelined_answers_come_in_order_before_the_400(
    hostile: RunningGateway, upstream: Upstream
) -> None:
    seen = await observe(hostile.port, named("pipelined-then-malformed"), WAIT)
    health, chat, refusal = seen.answers
    assert json.loads(health.body)["status"] == "ok"
    assert json.loads(chat.body)["choices"][0]["message"]["content"] == "hi"
    assert_envelope(refusal.as_httpx(), 400, "bad_request")
    assert seen.closed
    assert len(upstream.requests) == 1


async def slow_reader(port: int, data: bytes) -> Seen:
    """Send `data` at once from a client with a 16 KiB receive buffer, then read
    everything: answers the server wrote but the client has not taken in yet wait in the
    server's socket."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    received = b""
    ending = "open"
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)  # before connecting
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), WAIT)
        with suppress(ConnectionError):
            await asyncio.wait_for(loop.sock_sendall(sock, data), WAIT)
        try:
            while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), WAIT):
                received += chunk
            ending = "close"
        except ConnectionResetError:
            ending = "reset"
    finally:
        sock.close()
    answers, stray = parse_answers(received)
    return Seen(answers, ending, stray)


BIG = 256 * 1024


async def test_answers_before_a_refusal_reach_a_slow_reader(
    hostile: RunningGateway, upstream: Upstream
) -> None:
    """Four pipelined requests with large answers, a malformed one, and more bytes after
    it; the client reads slowly. Every answer and the 400 must reach it (RFC 9112 §9.6:
    close in stages, or the reset may destroy the last responses)."""
    upstream.default = Json(chat_completion(content="z" * BIG))
    data = request() * 4 + b"GARBAGE\r\n\r\n" + b"j" * BIG
    seen = await slow_reader(hostile.port, data)
    assert normal(str(seen)) == "200 x4, 400 bad_request, close"
    assert all(len(a.body) > BIG for a in seen.answers[:4])


# --------------------------------------------------------------------------- the protocol in memory


class Timer:
    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The loop as ServerProtocol sees it, with time that moves only when told; tasks
    and futures are the running loop's."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.now = 1000.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(when, callback)
        self.timers.append(timer)
        return timer

    def create_task(self, coro: Any) -> asyncio.Task[Any]:
        return self.loop.create_task(coro)

    def create_future(self) -> asyncio.Future[Any]:
        return self.loop.create_future()

    def advance(self, seconds: float) -> None:
        """Move time on, firing each timer due on the way at its own time, in order."""
        end = self.now + seconds
        while due := [t for t in self.timers if not t.cancelled and t.when <= end]:
            timer = min(due, key=lambda t: t.when)
            self.timers.remove(timer)
            self.now = max(self.now, timer.when)
            timer.callback()
        self.now = end


@dataclass
class App:
    """Answers `path:body` once the path's gate (if any) opens; notes what it got."""

    server_limits: ServerLimits
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    started: list[str] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        self.started.append(path)
        if path in self.gates:
            await self.gates[path].wait()
        data = b""
        while True:
            message = await receive()
            self.received.append(message)
            data += message.get("body", b"")
            if message["type"] != "http.request" or not message["more_body"]:
                break
        answer = path.encode() + b":" + data
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(answer))],
            }
        )
        await send({"type": "http.response.body", "body": answer})


def ok(answer: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer)


@asynccontextmanager
async def wired(app: App) -> AsyncIterator[tuple[ServerProtocol, MemoryTransport, Clock]]:
    loop = asyncio.get_running_loop()
    clock = Clock(loop)
    config = uvicorn.Config(
        app, http=ServerProtocol, lifespan="off", log_level="warning", interface="asgi3"
    )
    state = ServerState()
    protocol = ServerProtocol(config, state, {}, _loop=clock)  # type: ignore[arg-type]
    transport = MemoryTransport()
    protocol.connection_made(transport)
    assert protocol.limits is app.server_limits
    try:
        yield protocol, transport, clock
    finally:
        protocol.connection_lost(None)
        for gate in app.gates.values():
            gate.set()
        await asyncio.wait_for(asyncio.gather(*state.tasks, return_exceptions=True), WAIT)


async def settle() -> None:
    """Let the app's tasks run until they wait on something."""
    for _ in range(20):
        await asyncio.sleep(0)


def status_of(wire: bytes) -> list[int]:
    answers, stray = parse_answers(wire)
    assert stray == b"", wire
    return [a.status for a in answers]


SMALL = ServerLimits(max_header_bytes=1000, max_header_fields=8, header_timeout=2, body_timeout=3)


async def test_unit_head_spanning_reads_is_cut_at_the_limit() -> None:
    """After the head's first read, the bytes of every read that starts inside it count:
    up to the limit nothing happens; the read that passes it is fed only up to one byte
    past the limit, then 431."""
    app = App(SMALL)
    async with wired(app) as (protocol, transport, _):
        fed: list[bytes] = []
        feed = protocol._feed

        def recording(data: bytes) -> None:
            fed.append(bytes(data))
            feed(data)

        protocol._feed = recording  # type: ignore[method-assign]
        protocol.data_received(b"GET / HTTP/1.1\r\nhost: t\r\nx-long: ")
        for _ in range(10):
            protocol.data_received(b"a" * 100)
        await settle()
        assert sum(len(x) for x in fed[1:]) == SMALL.max_header_bytes
        assert transport.writes == []
        assert not transport.closing
        protocol.data_received(b"a" + b"b" * 500)
        await settle()
        assert sum(len(x) for x in fed[1:]) == SMALL.max_header_bytes + 1
        assert fed[-1] == b"a"  # the cut: nothing past the limit's next byte
        assert status_of(transport.wire) == [431]
        assert transport.closing
        protocol.data_received(b"more")  # nothing is read after a refusal
        assert fed[-1] == b"a"
        assert app.started == []


async def test_unit_head_ending_inside_the_cut_read_is_served_with_its_body() -> None:
    """The read that passes the limit carries the head's end and the body: the head is
    within the limit, so the rest of the read is the request's, not a refusal."""
    app = App(SMALL)
    async with wired(app) as (protocol, transport, _):
        protocol.data_received(b"POST /p HTTP/1.1\r\nhost: t\r\n")
        head_rest = b"x-pad: " + b"a" * 900 + b"\r\ncontent-length: 600\r\n\r\n"
        protocol.data_received(head_rest + b"z" * 600)  # 1,541 bytes in one read
        await settle()
        assert transport.wire == ok(b"/p:" + b"z" * 600)
        assert not transport.closing


async def test_unit_pipelined_small_heads_in_a_read_over_the_limit_are_served() -> None:
    app = App(SMALL)
    requests = [
        b"GET /r%d HTTP/1.1\r\nhost: t\r\nx-pad: %s\r\n\r\n" % (i, b"p" * 80) for i in range(30)
    ]
    data = b"".join(requests)
    split = len(requests[0]) + 10  # the first read ends inside the second head
    async with wired(app) as (protocol, transport, _):
        protocol.data_received(data[:split])
        protocol.data_received(data[split:])  # 3 KB of small whole heads
        for _ in range(30):
            await settle()
        assert status_of(transport.wire) == [200] * 30
        assert not transport.closing


async def test_unit_field_count_limit() -> None:
    for count, expected in ((8, [200]), (9, [431])):
        app = App(SMALL)
        async with wired(app) as (protocol, transport, _):
            # `count` fields, Host among them
            head = b"GET /f HTTP/1.1\r\nhost: t\r\n" + b"".join(
                b"x-%d: v\r\n" % i for i in range(count - 1)
            )
            protocol.data_received(head + b"\r\n")
            await settle()
            assert status_of(transport.wire) == expected, count
            assert app.started == (["/f"] if expected == [200] else [])


async def test_unit_field_count_limit_default_is_256() -> None:
    for count, expected in ((256, [200]), (257, [431])):
        app = App(ServerLimits())
        async with wired(app) as (protocol, transport, _):
            # `count` fields, Host among them
            head = b"GET /f HTTP/1.1\r\nhost: t\r\n" + b"".join(
                b"x-%d: v\r\n" % i for i in range(count - 1)
            )
            # One field per read: the count holds across reads too.
            for line in head.split(b"\r\n")[:-1]:
                protocol.data_received(line + b"\r\n")
            protocol.data_received(b"\r\n")  # the blank line: the head is whole
            await settle()
            assert status_of(transport.wire) == expected, count


@pytest.mark.parametrize(
    ("last", "status"),
    [
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /big HTTP/1.1\r\nhost: t\r\nx-pad: " + b"a" * 1000 + b"\r\n\r\n", 431),
        (b"GET /" + b"u" * 1100 + b" HTTP/1.1\r\nhost: t\r\n\r\n", 414),
    ],
    ids=["malformed", "too-large", "uri-too-long"],
)
async def test_unit_refusal_is_written_after_the_pipelined_answers(
    last: bytes, status: int
) -> None:
    app = App(SMALL, gates={"/a": asyncio.Event()})
    async with wired(app) as (protocol, transport, _):
        protocol.data_received(
            b"GET /a HTTP/1.1\r\nhost: t\r\n\r\nPOST /b HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nhi"
            + last
        )
        await settle()
        assert transport.writes == []  # /a is held: nothing may overtake it
        assert not transport.closing
        app.gates["/a"].set()
        await settle()
        answers, stray = parse_answers(transport.wire)
        assert stray == b""
        assert [a.status for a in answers] == [200, 200, status]
        assert [a.body for a in answers[:2]] == [b"/a:", b"/b:hi"]
        assert answers[2].header(b"connection") == b"close"
        assert transport.closing
        assert app.started == ["/a", "/b"]


async def test_unit_header_timeout_counts_from_the_first_byte() -> None:
    app = App(SMALL)
    async with wired(app) as (protocol, transport, clock):
        protocol.data_received(b"G")
        clock.advance(1.0)
        protocol.data_received(b"ET / HTTP/1.1\r\nhost: t\r\n")  # bytes keep coming...
        clock.advance(0.9)
        assert transport.writes == []
        clock.advance(0.2)  # ...but the head is not whole 2 s after its first byte
        assert status_of(transport.wire) == [408]
        assert json.loads(parse_answers(transport.wire)[0][0].body)["error"]["code"] == (
            "request_timeout"
        )
        assert transport.closing


async def test_unit_head_within_the_timeout_is_served() -> None:
    app = App(SMALL)
    async with wired(app) as (protocol, transport, clock):
        protocol.data_received(b"GET /late HTTP/1.1\r\nhost: t\r\n")
        clock.advance(1.9)
        protocol.data_received(b"\r\n")
        await settle()
        clock.advance(4)  # past the head's deadline: none is left over from it
        assert transport.wire == ok(b"/late:")
        assert not transport.closing


async def test_unit_body_timeout_is_per_pause() -> None:
    app = App(SMALL)
    async with wired(app) as (protocol, transport, clock):
        protocol.data_received(b"POST /b HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n")
        await settle()
        for piece in (b"ab", b"cd", b"ef"):  # 2.9 s apart, 8.7 s in all: fine
            clock.advance(2.9)
            protocol.data_received(piece)
            await settle()
        assert transport.writes == []
        clock.advance(3.1)  # then a pause past body_timeout
        await settle()
        assert status_of(transport.wire) == [408]
        assert transport.closing
        assert app.received[-1] == {"type": "http.disconnect"}


async def test_unit_head_timeout_does_not_run_while_the_gateway_paused_reading() -> None:
    """A pipelined request waits its turn with reading paused: the bytes of the head
    behind it that were already read are not the client's delay."""
    app = App(SMALL, gates={"/a": asyncio.Event()})
    async with wired(app) as (protocol, transport, clock):
        protocol.data_received(
            b"GET /a HTTP/1.1\r\nhost: t\r\n\r\nGET /b HTTP/1.1\r\nhost: t\r\n\r\nGET /c HTTP/1.1\r\nhost: t\r\nx-c: "
        )
        await settle()
        assert not transport.reading
        clock.advance(5)  # past header_timeout, with the gateway not reading
        await settle()
        assert transport.writes == []
        app.gates["/a"].set()
        await settle()
        assert transport.reading
        assert status_of(transport.wire) == [200, 200]
        protocol.data_received(b"1\r\n\r\n")  # the client finishes /c
        await settle()
        assert status_of(transport.wire) == [200, 200, 200]
        assert not transport.closing


async def test_unit_body_timeout_does_not_run_while_the_gateway_paused_reading() -> None:
    """Over HIGH_WATER of body buffered while the app does not read: reading pauses, and
    the pause is the gateway's, however long. Once it reads again, what the client sent
    meanwhile arrives, and from then on a pause past body_timeout is the client's: 408."""
    app = App(SMALL, gates={"/big": asyncio.Event()})
    size = 200 * 1024
    async with wired(app) as (protocol, transport, clock):
        protocol.data_received(
            b"POST /big HTTP/1.1\r\nhost: t\r\ncontent-length: %d\r\n\r\n" % size
        )
        protocol.data_received(b"x" * (100 * 1024))
        await settle()
        assert not transport.reading
        clock.advance(30)  # ten times body_timeout
        await settle()
        assert transport.writes == []
        assert not transport.closing
        app.gates["/big"].set()
        await settle()
        assert transport.reading
        protocol.data_received(b"y" * 1024)  # what waited in the socket
        await settle()
        clock.advance(2.9)
        await settle()
        assert transport.writes == []
        clock.advance(0.2)
        await settle()
        assert status_of(transport.wire) == [408]
        assert transport.closing
        assert app.received[-1] == {"type": "http.disconnect"}


@pytest.mark.parametrize("queued", [False, True], ids=["in-flight", "queued"])
async def test_unit_head_begun_behind_a_request_is_not_idle(queued: bool) -> None:
    """A head that began while an earlier request was being answered: once that answer
    is out, the connection is not idle (a head is arriving); its deadline is the head's,
    and it ends in 408, not in a silent keep-alive close (5 s here, before 10 s)."""
    app = App(ServerLimits(header_timeout=10, body_timeout=30), gates={"/a": asyncio.Event()})
    async with wired(app) as (protocol, transport, clock):
        protocol.data_received(b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n")
        if queued:  # a whole request queued behind it (reading paused), then the head
            protocol.data_received(b"GET /b HTTP/1.1\r\nhost: t\r\n\r\nGET /c HT")
        else:
            protocol.data_received(b"GET /c HT")
        await settle()
        app.gates["/a"].set()
        await settle()
        assert status_of(transport.wire) == [200] * (1 + queued)
        clock.advance(6)  # past the keep-alive timeout (5 s), within the head's 10 s
        await settle()
        assert not transport.closing
        clock.advance(5)
        await settle()
        assert status_of(transport.wire) == [200] * (1 + queued) + [408]
        assert transport.closing
