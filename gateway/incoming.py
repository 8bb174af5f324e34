"""The few request headers the gateway reads, found in one pass (every endpoint)."""

from __future__ import annotations

import os
import re

from gateway.auth import bearer_token
from gateway.errors import BadRequest

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")


class Incoming:
    """The few request headers the gateway reads, found in one pass."""

    __slots__ = (
        "api_key",
        "authorization",
        "content_length",
        "content_type",
        "request_id",
        "session_id",
    )

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.authorization: bytes | None = None
        self.api_key: bytes | None = None  # x-api-key (Anthropic) or api-key (Azure)
        self.content_length: bytes | None = None
        self.content_type: bytes | None = None
        self.session_id: bytes | None = None
        request_id: bytes | None = None
        for name, value in headers:
            if name == b"authorization":
                self.authorization = value
            elif name == b"content-length":
                self.content_length = value
            elif name == b"content-type":
                self.content_type = value
            elif name == b"x-request-id":
                request_id = value
            elif name == b"x-session-id":
                self.session_id = value
            elif name == b"x-api-key" or name == b"api-key":
                self.api_key = value.strip() or None
        if request_id is None or not _REQUEST_ID.fullmatch(request_id):
            request_id = os.urandom(12).hex().encode()
        self.request_id = request_id

    def token(self) -> bytes | None:
        """The secret from `Authorization: Bearer`, `x-api-key` or `api-key` (SPEC §9)."""
        if self.authorization is None:
            return self.api_key
        return bearer_token(self.authorization) or self.api_key

    def declared_length(self) -> int | None:
        if self.content_length is None:
            return None
        try:
            return int(self.content_length)
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
