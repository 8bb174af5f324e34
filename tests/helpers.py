"""Small helpers shared by the test modules."""

from __future__ import annotations

import socket
from typing import Any

import httpx


def free_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (bound, read, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The SPEC's error envelope, exactly; returns the inner error object."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers.get("x-request-id")
    body = r.json()
    assert list(body) == ["error"]
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param", "details"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    assert err["code"] == code
    assert err["param"] is None
    assert isinstance(err["details"], dict)
    assert "Traceback" not in r.text
    return err
