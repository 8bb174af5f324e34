"""gateway/incoming.py: the request headers the gateway reads, from values."""

from __future__ import annotations

import itertools

import pytest

from gateway.incoming import SESSION_HEADERS, Incoming


def test_session_headers_count_in_their_order_whatever_order_they_come_in() -> None:
    """SPEC §14: x-session-id, x-claude-code-session-id, session-id, session_id, thread-id."""
    for present in range(1, len(SESSION_HEADERS) + 1):
        for chosen in itertools.combinations(SESSION_HEADERS, present):
            for arrival in itertools.permutations(chosen):
                headers = [(b"host", b"x"), *((name, name + b"-value") for name in arrival)]
                assert Incoming(headers).session_id == chosen[0] + b"-value"


@pytest.mark.parametrize("name", SESSION_HEADERS)
def test_each_agents_session_header_is_read(name: bytes) -> None:
    assert Incoming([(name, b"s-1")]).session_id == b"s-1"


def test_an_empty_session_header_gives_way_to_the_next() -> None:
    headers = [(b"x-session-id", b""), (b"thread-id", b"t-1")]
    assert Incoming(headers).session_id == b"t-1"
    assert Incoming([(b"x-session-id", b"")]).session_id is None
    assert Incoming([(b"content-type", b"application/json")]).session_id is None
