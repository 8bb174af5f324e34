"""SPEC §13 "Connections", server side: bytes that begin no request run on the head
deadline and give way at the connection cap; nginx's framing refusals (505, 501, 400,
404 for `%2F`).

Three layers, as tests/server/test_hostile_clients.py: the pure policy from values
(admission.give_way, admission.framing_refusal); ServerProtocol on an in-memory
transport with its timer driven by hand (exact deadlines, a hypothesis property); and a
real gateway over loopback sockets (2,000 CRLF-only connections at a cap of 256, each
framing case with a recording upstream behind it). The byte cases also sit in that
module's CORPUS, so bench/hostile_corpus.py prints nginx's answers beside them.
"""

from __future__ import annotations

import asyncio
import json
import resource
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.server.admission import SLOW_HEAD_SECONDS, ServerLimits, framing_refusal, give_way
from tests.conftest import GatewayFactory, one_provider
from tests.helpers import until
from tests.scripted_upstream import Upstream
from tests.server.test_hostile_clients import (
    App,
    Case,
    get,
    observe,
    ok,
    parse_answers,
    request,
    settle,
    status_of,
    wired,
)

HEAD = 2.0  # header_timeout of the in-memory protocol (keep-alive is uvicorn's 5 s)
LIMITS = ServerLimits(header_timeout=HEAD, body_timeout=3)
GET_A = b"GET /a HTTP/1.1\r\nhost: t\r\n\r\n"


# --------------------------------------------------------------------------- policy, from values


@dataclass
class Conn:
    cycle: object | None = None
    head_since: float = 0.0
    idle_since: float = 0.0


def test_give_way_counts_a_crlf_only_connection_as_idle() -> None:
    """CRLFs 1 ms ago: not yet a slow head, but the connection is still idle since its
    last answer, so it goes first, closed as idle (no answer)."""
    now = 100.0
    stray = Conn(idle_since=90.0, head_since=now - 0.001)
    slow = Conn(head_since=now - 5)  # a head stalled long past SLOW_HEAD_SECONDS
    busy = Conn(cycle=object(), idle_since=0.0)
    newcomer = Conn(idle_since=now)
    assert give_way([busy, slow, stray, newcomer], newcomer, now) == (stray, True)


def test_give_way_orders_idle_and_crlf_only_connections_by_idle_time() -> None:
    now = 100.0
    idle = Conn(idle_since=95.0)
    stray = Conn(idle_since=96.0, head_since=99.0)
    assert give_way([stray, idle], Conn(), now) == (idle, True)
    older = Conn(idle_since=94.0, head_since=99.9)
    assert give_way([stray, idle, older], Conn(), now) == (older, True)


def test_give_way_still_spares_a_fresh_head_and_takes_a_slow_one() -> None:
    now = 100.0
    fresh = Conn(head_since=now - SLOW_HEAD_SECONDS / 2)
    assert give_way([fresh], Conn(), now) == (None, False)
    slow = Conn(head_since=now - 2 * SLOW_HEAD_SECONDS)
    assert give_way([fresh, slow], Conn(), now) == (slow, False)


HOST = (b"host", b"t")


@pytest.mark.parametrize(
    ("version", "headers", "status", "code"),
    [
        ("2.0", [HOST], 505, "http_version_not_supported"),
        ("3.0", [HOST], 505, "http_version_not_supported"),
        ("0.9", [], 505, "http_version_not_supported"),
        ("2.0", [], 505, "http_version_not_supported"),  # the version is judged first
        ("1.1", [], 400, "bad_request"),
        ("1.1", [HOST, HOST], 400, "bad_request"),
        ("1.0", [HOST, (b"host", b"u")], 400, "bad_request"),
        ("1.1", [HOST, (b"transfer-encoding", b"identity, chunked")], 501, "not_implemented"),
        ("1.1", [HOST, (b"transfer-encoding", b"gzip, chunked")], 501, "not_implemented"),
        ("1.1", [HOST, (b"transfer-encoding", b"gzip")], 501, "not_implemented"),
        (
            "1.1",
            [HOST, (b"transfer-encoding", b"gzip"), (b"transfer-encoding", b"chunked")],
            400,
            "bad_request",
        ),
        ("1.0", [HOST, (b"transfer-encoding", b"chunked")], 400, "bad_request"),
        ("1.0", [(b"transfer-encoding", b"chunked")], 400, "bad_request"),
    ],
)
def test_framing_refusal(
    version: str, headers: list[tuple[bytes, bytes]], status: int, code: str
) -> None:
    answer = framing_refusal(version, headers)
    assert answer is not None
    [parsed], stray = parse_answers(answer)
    assert stray == b""
    assert (parsed.status, parsed.code) == (status, code)
    assert parsed.header(b"connection") == b"close"


@pytest.mark.parametrize(
    ("version", "headers"),
    [
        ("1.1", [HOST]),
        ("1.1", [HOST, (b"transfer-encoding", b"chunked")]),
        ("1.1", [HOST, (b"transfer-encoding", b"CHUNKED")]),  # nginx: case-insensitive
        ("1.0", []),  # HTTP/1.0 needs no Host
        ("1.0", [HOST]),
        ("1.2", [HOST]),  # major version 1: served, as by nginx
    ],
)
def test_framing_served(version: str, headers: list[tuple[bytes, bytes]]) -> None:
    assert framing_refusal(version, headers) is None


# --------------------------------------------------------------------------- the protocol in memory


async def test_unit_a_lone_crlf_is_closed_at_the_head_deadline_unanswered() -> None:
    async with wired(App(LIMITS)) as (protocol, transport, clock):
        clock.advance(1.0)  # idle a while first: the deadline runs from the CRLF
        protocol.data_received(b"\r\n")
        clock.advance(HEAD - 0.01)
        assert not transport.closing
        clock.advance(0.02)
        assert transport.closing
        assert transport.writes == []


@pytest.mark.parametrize("piece", [b"\r\n", b"\n", b"\r\n" * 500], ids=["crlf", "lf", "run"])
async def test_unit_trickled_crlfs_do_not_move_the_deadline(piece: bytes) -> None:
    app = App(LIMITS)
    async with wired(app) as (protocol, transport, clock):
        protocol.data_received(piece)
        for _ in range(19):
            clock.advance(HEAD / 20)
            assert not transport.closing
            protocol.data_received(piece)
        clock.advance(HEAD / 20)
        assert transport.closing
        assert transport.writes == []
        assert app.started == []


async def test_unit_crlfs_after_an_answer_run_on_the_head_deadline_not_keep_alive() -> None:
    """Idle after an answer, a connection is closed at keep-alive (5 s); CRLFs make it a
    head's: HEAD (2 s) from them, however the keep-alive timer stood."""
    app = App(LIMITS)
    async with wired(app) as (protocol, transport, clock):
        protocol.data_received(GET_A)
        await settle()
        assert transport.wire == ok(b"/a:")
        clock.advance(0.5)
        protocol.data_received(b"\r\n\r\n")
        clock.advance(HEAD - 0.01)
        assert not transport.closing
        clock.advance(0.02)
        assert transport.closing
        assert transport.wire == ok(b"/a:")  # nothing more was written


async def test_unit_a_head_after_crlfs_is_timed_from_the_first_crlf() -> None:
    """As nginx: the CRLFs began the head. 408 at HEAD after the first CRLF, not HEAD
    after the head's first byte."""
    async with wired(App(LIMITS)) as (protocol, transport, clock):
        protocol.data_received(b"\r\n")
        clock.advance(1.5)
        protocol.data_received(b"GET /slow HT")
        clock.advance(HEAD - 1.5 - 0.01)
        assert transport.writes == []
        clock.advance(0.02)
        assert status_of(transport.wire) == [408]
        assert transport.closing


async def test_unit_crlfs_then_a_request_in_time_are_served_and_kept_alive() -> None:
    app = App(LIMITS)
    async with wired(app) as (protocol, transport, clock):
        protocol.data_received(b"\r\n")
        clock.advance(1.0)
        protocol.data_received(b"\r\nGET /a HTTP/1.1\r\n")
        clock.advance(0.5)
        protocol.data_received(b"host: t\r\n\r\n")
        await settle()
        assert transport.wire == ok(b"/a:")
        clock.advance(4.9)  # idle again: keep-alive (5 s) from the answer, no 408 left
        assert not transport.closing
        protocol.data_received(GET_A)
        await settle()
        assert transport.wire == ok(b"/a:") * 2


async def test_unit_a_crlf_sent_with_a_request_leaves_the_connection_idle() -> None:
    """Clients that end a POST body with an extra CRLF (RFC 9112 §2.2 asks servers to
    ignore it) read it with the request: after the answer the connection is idle, on
    keep-alive's 5 s, not the head's 2 s."""
    async with wired(App(LIMITS)) as (protocol, transport, clock):
        protocol.data_received(b"POST /p HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\n\r\nhi\r\n")
        await settle()
        assert transport.wire == ok(b"/p:hi")
        clock.advance(4.9)
        assert not transport.closing
        assert protocol.idle_since and not protocol.head_since
        clock.advance(0.2)
        assert transport.closing
        assert transport.wire == ok(b"/p:hi")


def crlf_runs() -> st.SearchStrategy[list[tuple[bytes, float]]]:
    """Reads of CR/LF bytes only, each with the pause before the next (seconds)."""
    piece = st.lists(st.sampled_from([b"\r\n", b"\n", b"\r"]), min_size=1, max_size=40)
    return st.lists(
        st.tuples(piece.map(b"".join), st.floats(0, 0.6, allow_nan=False)), min_size=1, max_size=8
    )


@settings(max_examples=60, deadline=None)
@given(runs=crlf_runs(), split=st.integers(0, len(GET_A)), then_request=st.booleans())
def test_property_crlfs_never_hold_past_the_head_deadline(
    runs: list[tuple[bytes, float]], split: int, then_request: bool
) -> None:
    """Any CRLF reads: a request whose head is whole within HEAD of the first CRLF is
    served and the connection stays; CRLFs alone (or a head not whole in time) never
    hold the connection past HEAD after the first one."""

    async def run() -> None:
        app = App(LIMITS)
        async with wired(app) as (protocol, transport, clock):
            began = clock.now
            for data, pause in runs:
                if transport.closing:
                    break
                protocol.data_received(data)
                clock.advance(pause)
            in_time = clock.now - began < HEAD
            if then_request and not transport.closing:
                # A \r left at the end of the CRLFs with GET_A after it is still CRLF
                # then a request line: llhttp skips CR and LF alike.
                protocol.data_received(GET_A[:split])
                if split < len(GET_A):
                    protocol.data_received(GET_A[split:])
                await settle()
            if then_request and in_time:
                assert transport.wire == ok(b"/a:")
                assert not transport.closing
                assert app.started == ["/a"]
                return
            assert transport.closing == (not in_time)  # closed at the deadline, not before
            clock.advance(max(0.0, began + HEAD - clock.now))
            await settle()
            assert transport.closing, "held past the head deadline"
            assert app.started == []
            assert transport.writes == []  # CRLFs alone are never answered

    asyncio.run(run())


# --------------------------------------------------------------------------- real sockets

CONNECTIONS = 2000
CAP = 256
SOCKET_HEAD = 1.0  # header_timeout of the gateway in the lockout test
TRICKLE = 0.25  # seconds between CRLFs of a trickling connection


@contextmanager
def open_files_at_least(needed: int) -> Iterator[None]:
    """This process's open-file limit raised to `needed` for the block, if it is lower
    (the client's sockets and the gateway's share it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        yield
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.fail(f"the open-file limit's hard cap {hard} is below {needed}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def healthz_status(port: int) -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(get("/healthz", "connection: close"))
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with suppress(ConnectionError):
            await writer.wait_closed()
    [answer], _ = parse_answers(data)
    return answer.status


async def test_2000_crlf_only_connections_never_lock_out_healthz(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    """At --max-connections 256, 2,000 connections that send only CRLFs (once, a run of
    them, or one every 0.25 s): each check of /healthz on a fresh connection during the
    flood answers 200 (at most 3 attempts; before the fix, 503 from the 257th on), and
    once the flood stops the last ones are closed by the head deadline, trickling or
    not, without a byte of answer."""
    gw = await gateway(
        one_provider(upstream, slug="m"), max_connections=CAP, header_timeout=SOCKET_HEAD
    )
    connections = gw.server.server_state.connections
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    tricklers: list[asyncio.Task[None]] = []
    attempts: list[int] = []

    async def trickle(sock: socket.socket) -> None:
        with suppress(OSError):  # ends once the gateway has closed it
            while True:
                await asyncio.sleep(TRICKLE)
                await loop.sock_sendall(sock, b"\r\n")

    async def healthz_answers() -> None:
        for attempt in range(1, 4):
            if await healthz_status(gw.port) == 200:
                attempts.append(attempt)
                return
        raise AssertionError(f"/healthz locked out after {len(socks)} CRLF connections")

    with open_files_at_least(CONNECTIONS + CAP + 256):
        try:
            for i in range(CONNECTIONS):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setblocking(False)
                await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", gw.port)), 5)
                kind = i % 3  # a lone CRLF; a run of 2 to 98; one now and every TRICKLE
                with suppress(OSError):  # already made to give way
                    await loop.sock_sendall(sock, b"\r\n" * (2 + i % 97 if kind == 1 else 1))
                if kind == 2:
                    tricklers.append(asyncio.create_task(trickle(sock)))
                if i % 100 == 99:
                    await healthz_answers()
            flood_ended = loop.time()
            assert len(connections) <= CAP + 1
            await until(lambda: not connections, within=SOCKET_HEAD + 5)
            assert loop.time() - flood_ended < SOCKET_HEAD + 2
            await healthz_answers()
            # Every CRLF connection was closed (given way, or timed out) with nothing sent.
            for sock in socks:
                try:
                    data = sock.recv(1024)
                except ConnectionResetError:
                    data = b""
                except BlockingIOError:
                    raise AssertionError("a CRLF connection is still open") from None
                assert data == b"", data[:200]
        finally:
            for task in tricklers:
                task.cancel()
            await asyncio.gather(*tricklers, return_exceptions=True)
            for sock in socks:
                sock.close()
    assert len(attempts) == CONNECTIONS // 100 + 1
    assert max(attempts) <= 3, attempts
    assert upstream.requests == []


FRAMING = (
    ("HTTP/2.0", request().replace(b"HTTP/1.1", b"HTTP/2.0", 1), 505),
    ("HTTP/3.0", request().replace(b"HTTP/1.1", b"HTTP/3.0", 1), 505),
    ("HTTP/0.9", request().replace(b"HTTP/1.1", b"HTTP/0.9", 1), 505),
    ("te-identity-chunked", request("transfer-encoding: identity, chunked", body=None), 501),
    ("te-gzip-chunked", request("transfer-encoding: gzip, chunked", body=None), 501),
    (
        "te-on-http-1.0",
        request("transfer-encoding: chunked", body=None).replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        400,
    ),
    ("no-host", request().replace(b"host: 127.0.0.1\r\n", b"", 1), 400),
    ("two-hosts", request("host: 127.0.0.1"), 400),
    ("two-hosts-differing", request("host: localhost"), 400),
    ("encoded-slash", request(target=b"/v1/chat%2Fcompletions"), 404),
    ("encoded-slash-lower", request(target=b"/v1/chat%2fcompletions"), 404),
)
CODES = {505: "http_version_not_supported", 501: "not_implemented", 400: "bad_request"}


@pytest.mark.parametrize(
    ("data", "status"), [(d, s) for _, d, s in FRAMING], ids=[n for n, _, _ in FRAMING]
)
async def test_framing_is_refused_closed_and_never_relayed(
    data: bytes, status: int, gateway: GatewayFactory, upstream: Upstream
) -> None:
    """Each after a good request on the same connection, pipelined in one write: that
    one is answered first, then the refusal, then the close; the upstream sees only the
    good one."""
    gw = await gateway(one_provider(upstream, slug="echo"), header_timeout=2)
    if data.endswith(b"\r\n\r\n") and b"chunked" in data:
        data += b"5\r\nhello\r\n0\r\n\r\n"
    seen = await observe(gw.port, Case("f", "", (request() + data,), ""), 5.0)
    assert seen.closed, seen
    assert seen.stray == b"", seen
    assert [a.status for a in seen.answers] == [200, status], seen
    refusal = seen.answers[1]
    assert refusal.code == CODES.get(status, "not_found")
    assert refusal.header(b"connection") == b"close"
    assert refusal.header(b"x-request-id")
    assert set(json.loads(refusal.body)["error"]) == {"message", "type", "code", "param", "details"}
    assert len(upstream.requests) == 1


async def test_an_encoded_slash_is_never_a_separator(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    """`team/special` is a model: /v1/models/team/special finds it; the same path with the
    slash encoded matches no route (404, closed), in either case of the escape."""
    gw = await gateway(one_provider(upstream, slug="team/special"))
    plain = await observe(
        gw.port, Case("p", "", (get("/v1/models/team/special", "connection: close"),), ""), 5.0
    )
    assert [a.status for a in plain.answers] == [200], plain
    assert json.loads(plain.answers[0].body)["id"] == "team/special"
    for path in ("/v1/models/team%2Fspecial", "/v1/models/team%2fspecial"):
        seen = await observe(gw.port, Case("e", "", (get(path),), ""), 5.0)
        assert [(a.status, a.code) for a in seen.answers] == [(404, "not_found")], seen
        assert seen.closed
    # Other escapes still decode: %74 is `t`.
    other = await observe(
        gw.port, Case("o", "", (get("/v1/models/%74eam/special", "connection: close"),), ""), 5.0
    )
    assert [a.status for a in other.answers] == [200], other
    assert upstream.requests == []
