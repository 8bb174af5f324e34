"""multipart/form-data on raw bytes (audio uploads): where each field's value lies, so a
part can be spliced (the `model`) or measured (the echo's `file`) without copying or
decoding the others.

Read strictly (RFC 2046 framing, RFC 7578 parts): the upstream must see exactly the parts
the gateway checked, so any form that two honest parsers could split or name differently
is refused whole (`MalformedForm`, whose `cause` the 400 carries), never guessed at. What
is refused, and which leniency it closes:
- a preamble, an epilogue past one CRLF, padding after a boundary, and any occurrence of
  the boundary that is not a whole line after CRLF: a parser that accepts bare LF, skips
  a preamble or scans for the boundary alone must find the same delimiters we do;
- a bare CR or LF, a folded line or a repeated field in a part's head, a head without its
  blank line: parsers split those heads differently;
- a part without `Content-Disposition: form-data; name=...`, a repeated parameter, an
  unterminated quote, `\\"` in a quoted string (an escape by RFC 2045, the string's end by
  the HTML form rules browsers follow), a backslash in a name (the two rules read the name
  differently), a `name*=`/`filename*=` extended parameter (RFC 7578 §4.2: MUST NOT);
- `Content-Transfer-Encoding` (deprecated by RFC 7578 §4.7; some parsers decode it, so the
  upstream would read other bytes than the gateway) and nested multipart (§4.3);
- two parts of one name, compared without ASCII case (ASP.NET binds form fields so),
  except names ending in `[]`: the OpenAI SDK sends a list (`timestamp_granularities[]`,
  `include[]`) as one part per item, and every framework reads those as the whole list.

Every scan moves forward: one `find` per delimiter from the last one, heads at most
MAX_PART_HEAD bytes each, so a 10 MiB file part costs one pass."""

from __future__ import annotations

import re

MAX_PART_HEAD = 16 * 1024  # a part's own head: bytes before its blank line

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 token
_TOKEN_ONLY = re.compile(_TOKEN)
# A parameter's unquoted value: a token without `'` and `*`, which RFC 2231 readers (the
# stdlib's email) take for the syntax of extended values.
_PLAIN_VALUE = re.compile(rb"[!#$%&+.^_`|~0-9A-Za-z-]+")
_MEDIA_TYPE = re.compile(rb"(" + _TOKEN + rb")/(" + _TOKEN + rb")")
_PARAM_NAME = re.compile(rb"[ \t]*;[ \t]*(" + _TOKEN + rb")=")
# qdtext, or a quoted-pair whose second octet is not `"`: a string matched by this ends at
# its first `"` whichever escaping rule the reader follows.
_QUOTED = re.compile(
    rb'"((?:[\t\x20\x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t\x20\x21\x23-\x7e\x80-\xff])*)"'
)
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
# A part's header names: letters, digits and `-` (python-multipart takes no more), so no
# parser that folds `_` into `-` finds a second Content-Disposition.
_FIELD_NAME = re.compile(rb"[0-9A-Za-z-]+")
# RFC 2046 bchars, 1 to 70, not ending in a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_MULTIPART = re.compile(rb"[ \t]*multipart/", re.IGNORECASE)


class MalformedForm(ValueError):
    """The body is not the multipart/form-data its content type says."""

    def __init__(self, message: str, cause: str = "multipart") -> None:
        super().__init__(message)
        self.cause = cause


def delimiter_of(content_type: bytes | None) -> bytes:
    """`--BOUNDARY` from a multipart/form-data content type. The boundary must be the only
    one and plain RFC 2046 characters: an upstream reading another boundary than ours
    would see other parts."""
    value = (content_type or b"").strip(b" \t")
    media = _MEDIA_TYPE.match(value)
    if media is None or (media[1] + b"/" + media[2]).lower() != b"multipart/form-data":
        raise MalformedForm(
            "this endpoint takes multipart/form-data with a boundary", "not_multipart"
        )
    boundary = _parameters(value, media.end(), "the content type", "content_type").get(b"boundary")
    if boundary is None or not _BOUNDARY.fullmatch(boundary):
        raise MalformedForm(
            "the multipart content type needs one boundary of 1 to 70 RFC 2046 characters",
            "boundary",
        )
    return b"--" + boundary


def fields(raw: bytes, delimiter: bytes) -> list[tuple[bytes, int, int]]:
    """(field name, value start, value end) for each part, in order, once the whole form
    has been checked. The CRLF before the next delimiter belongs to the delimiter, not to
    the value."""
    if not raw.startswith(delimiter):
        raise MalformedForm("the form must start with its boundary (no preamble)", "preamble")
    found: list[tuple[bytes, int, int]] = []
    names: set[bytes] = set()
    at = 0  # where the current delimiter line's boundary starts
    while True:
        after = at + len(delimiter)
        if raw.startswith(b"--", after):
            tail = len(raw) - after - 2
            if tail and (tail != 2 or not raw.endswith(b"\r\n")):
                raise MalformedForm(
                    "nothing may follow the form's closing boundary but one CRLF", "epilogue"
                )
            break
        if not raw.startswith(b"\r\n", after):
            if len(raw) < after + 2:
                raise MalformedForm("the form has no closing boundary", "unclosed")
            raise _stray("a boundary must be followed by CRLF or `--`, with no padding")
        # From at + 1: an occurrence overlapping this one is stray too.
        nxt = raw.find(delimiter, at + 1)
        if nxt < 0:
            raise MalformedForm("the form has no closing boundary", "unclosed")
        if nxt < after + 2 or not raw.startswith(b"\r\n", nxt - 2):
            raise _stray("the boundary appears inside a part, not on a line of its own")
        value_end = nxt - 2
        # From the CRLF ending the delimiter line, so a part with no head is found too.
        blank = raw.find(b"\r\n\r\n", after, min(value_end, after + MAX_PART_HEAD))
        if blank < 0:
            raise MalformedForm(
                "a part's head has no blank line before its value, or is over "
                f"{MAX_PART_HEAD} bytes",
                "part_head",
            )
        name = _part_name(raw[after + 2 : blank])
        folded = name.lower()
        if folded in names and not name.endswith(b"[]"):
            if folded == b"model":
                raise MalformedForm("the form has more than one `model` part", "duplicate_name")
            raise MalformedForm("two parts of the form have the same name", "duplicate_name")
        names.add(folded)
        found.append((name, blank + 4, value_end))
        at = nxt
    if not found:
        raise MalformedForm("the form has no parts", "no_parts")
    return found


def _stray(message: str) -> MalformedForm:
    return MalformedForm(message, "stray_boundary")


def _part_name(head: bytes) -> bytes:
    """The `name` of a part from its head (header lines without their last CRLF)."""
    disposition: bytes | None = None
    seen: set[bytes] = set()
    for line in head.split(b"\r\n") if head else ():
        if b"\r" in line or b"\n" in line:
            raise MalformedForm("a part's head has a bare CR or LF", "line_end")
        if line[:1] in (b" ", b"\t"):
            raise MalformedForm("a part's head has a folded line", "folded_header")
        key, colon, value = line.partition(b":")
        value = value.strip(b" \t")
        if not colon or not _FIELD_NAME.fullmatch(key) or not _FIELD_VALUE.fullmatch(value):
            raise MalformedForm("a line of a part's head is not `Name: value`", "part_head")
        key = key.lower()
        if key in seen:
            raise MalformedForm("a part's head repeats a header field", "repeated_header")
        seen.add(key)
        if key == b"content-disposition":
            disposition = value
        elif key == b"content-transfer-encoding":
            raise MalformedForm(
                "Content-Transfer-Encoding is not allowed in a form (RFC 7578 §4.7)",
                "transfer_encoding",
            )
        elif key == b"content-type" and _MULTIPART.match(value):
            raise MalformedForm("a part may not be multipart itself (RFC 7578 §4.3)", "nested")
    if disposition is None:
        raise MalformedForm("a part has no Content-Disposition", "no_disposition")
    kind = _TOKEN_ONLY.match(disposition)
    if kind is None or kind[0].lower() != b"form-data":
        raise MalformedForm("a part's Content-Disposition is not form-data", "not_form_data")
    params = _parameters(disposition, kind.end(), "a Content-Disposition", "disposition")
    name = params.get(b"name")
    if name is None:
        raise MalformedForm("a part's Content-Disposition has no name", "no_name")
    if b"\\" in name:
        # RFC 2045 drops the backslash of a quoted-pair, the HTML form rules keep it.
        raise MalformedForm("a part's name has a backslash", "escaped_name")
    return name


def _parameters(value: bytes, at: int, what: str, cause: str) -> dict[bytes, bytes]:
    """The `; name=value` parameters of a header value from `at` to its end, names
    lower-cased; a quoted value as written between its quotes."""
    params: dict[bytes, bytes] = {}
    while at < len(value):
        param = _PARAM_NAME.match(value, at)
        if param is None:
            raise MalformedForm(f"the parameters of {what} do not parse", cause)
        key = param[1].lower()
        at = param.end()
        if value.startswith(b'"', at):
            quoted = _QUOTED.match(value, at)
            if quoted is None:
                raise _bad_quote(value, at, what, cause)
            params_value, at = quoted[1], quoted.end()
        else:
            token = _PLAIN_VALUE.match(value, at)
            if token is None:
                raise MalformedForm(f"a parameter of {what} has no value, or one to quote", cause)
            params_value, at = token[0], token.end()
        if b"*" in key:
            raise MalformedForm(
                f"{what} has an RFC 2231 extended parameter (RFC 7578 §4.2: not used)",
                "extended_parameter",
            )
        if key in params:
            raise MalformedForm(f"{what} repeats a parameter", "repeated_parameter")
        params[key] = params_value
    return params


def _bad_quote(value: bytes, at: int, what: str, cause: str) -> MalformedForm:
    close = value.find(b'"', at + 1)
    if close < 0:
        return MalformedForm(f"{what} has an unterminated quote", "unterminated_quote")
    if value[close - 1] == 0x5C:  # a backslash
        return MalformedForm(
            f'{what} has \\" in a quoted string (an escape or its end, by which rule?)',
            "escaped_quote",
        )
    return MalformedForm(f"a quoted parameter of {what} has a control character", cause)
