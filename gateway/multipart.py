"""multipart/form-data on raw bytes (audio uploads): where each field's value lies, so a
part can be spliced (the `model`) or measured (the echo's `file`) without copying or
decoding the others."""

from __future__ import annotations

import re
from collections.abc import Iterator

# A part's head names its field: `Content-Disposition: form-data; name="model"`.
_PART_NAME = re.compile(rb'(?i)content-disposition:[^\r\n]*;[ \t]*name="([^"\r\n]*)"')
_BOUNDARY = re.compile(rb'(?i)boundary=(?:"([^"]{1,70})"|([^;, \t]{1,70}))')
MAX_PART_HEAD = 16 * 1024  # a part's own head: bytes before its blank line


class MalformedForm(ValueError):
    """The body is not the multipart/form-data its content type says."""

    def __init__(self, message: str, cause: str = "multipart") -> None:
        super().__init__(message)
        self.cause = cause


def delimiter_of(content_type: bytes | None) -> bytes:
    """`--BOUNDARY` from a multipart/form-data content type."""
    found = _BOUNDARY.search(content_type or b"")
    if content_type is None or b"multipart/form-data" not in content_type.lower() or not found:
        raise MalformedForm(
            "this endpoint takes multipart/form-data with a boundary", "not_multipart"
        )
    return b"--" + (found.group(1) or found.group(2))


def fields(raw: bytes, delimiter: bytes) -> Iterator[tuple[bytes, int, int]]:
    """(field name, value start, value end) for each part, in order. The CRLF before the
    next delimiter belongs to the delimiter, not to the value."""
    at = raw.find(delimiter)
    while at >= 0:
        head_start = at + len(delimiter)
        if raw.startswith(b"--", head_start):
            return  # the closing delimiter
        head_end = raw.find(b"\r\n\r\n", head_start, head_start + MAX_PART_HEAD)
        if head_end < 0:
            raise MalformedForm("a multipart part has no end to its headers")
        value_start = head_end + 4
        nxt = raw.find(b"\r\n" + delimiter, value_start)
        if nxt < 0:
            raise MalformedForm("the multipart body is not closed")
        name = _PART_NAME.search(raw, head_start, head_end)
        if name is not None:
            yield name.group(1), value_start, nxt
        at = nxt + 2
