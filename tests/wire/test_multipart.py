"""gateway/wire/multipart.py: strict multipart/form-data (SPEC §9 audio, §13 "Multipart
uploads"). From bytes: what real clients write parses with the right spans, every
refusal has its cause, the work is linear; a property test against the stdlib's email
parser; and end to end, a refused form never reaches the upstream."""

from __future__ import annotations

import time
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import httpx
import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.body import parse_multipart
from gateway.errors import BadRequest
from gateway.wire.multipart import MAX_PART_HEAD, MalformedForm, delimiter_of, fields
from tests.conftest import GatewayFactory, one_provider
from tests.helpers import assert_envelope
from tests.scripted_upstream import Json, Upstream

B = b"b0undary"
CD = b'Content-Disposition: form-data; name="'


def form(*parts: bytes, boundary: bytes = B, close: bytes = b"--\r\n") -> bytes:
    """Each part is its head lines, a blank line and its value, written as given."""
    return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + (
        b"--" + boundary + close
    )


def field(name: str, value: bytes) -> bytes:
    return CD + name.encode() + b'"\r\n\r\n' + value


def spans(raw: bytes, content_type: bytes) -> list[tuple[bytes, bytes]]:
    return [(name, raw[start:end]) for name, start, end in fields(raw, delimiter_of(content_type))]


def refusal(raw: bytes, boundary: bytes = B) -> str:
    with pytest.raises(MalformedForm) as caught:
        fields(raw, b"--" + boundary)
    return caught.value.cause


# What clients write -------------------------------------------------------------------


def test_openai_sdk_form_with_list_fields_parses() -> None:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"text": "hi"})

    sdk = openai.OpenAI(
        api_key="sk-x",
        base_url="http://sdk.invalid/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
    )
    audio = b"ID3\x00\r\n--not-it\r\n" + bytes(range(256))
    sdk.audio.transcriptions.create(
        model="whisper-1",
        file=("a.mp3", audio, "audio/mpeg"),
        timestamp_granularities=["word", "segment"],
        response_format="verbose_json",
    )
    request = sent[0]
    assert spans(request.content, request.headers["content-type"].encode()) == [
        (b"model", b"whisper-1"),
        (b"response_format", b"verbose_json"),
        (b"timestamp_granularities[]", b"word"),
        (b"timestamp_granularities[]", b"segment"),
        (b"file", audio),
    ]


def test_httpx_and_requests_forms_parse() -> None:
    audio = b"ID3\r\n--a\r\n\r\n"
    made = httpx.Request(
        "POST",
        "http://x.invalid/",
        data={"model": "whisper-1", "language": "en"},
        files={"file": ('C:\\dir\\a".mp3', audio, "audio/mpeg")},  # escaped as \\ and %22
    )
    expected = [(b"model", b"whisper-1"), (b"language", b"en"), (b"file", audio)]
    assert spans(made.read(), made.headers["content-type"].encode()) == expected
    prepared = requests.Request(
        "POST",
        "http://x.invalid/",
        data={"model": "whisper-1", "language": "en"},
        files={"file": ("résumé.mp3", audio, "audio/mpeg")},  # raw UTF-8 in the head
    ).prepare()
    assert isinstance(prepared.body, bytes)
    assert spans(prepared.body, prepared.headers["Content-Type"].encode()) == expected


# As curl 7.88.1 wrote `-F model=whisper-1 -F file=@a.mp3;type=audio/mpeg
# -F timestamp_granularities[]=word -F language=en`.
CURL_TYPE = b"multipart/form-data; boundary=------------------------d04673e809ad0322"
CURL_BODY = (
    b"--------------------------d04673e809ad0322\r\n"
    b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
    b"--------------------------d04673e809ad0322\r\n"
    b'Content-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
    b"Content-Type: audio/mpeg\r\n\r\nID3\x00\r\n--x\r\n\r\n"
    b"--------------------------d04673e809ad0322\r\n"
    b'Content-Disposition: form-data; name="timestamp_granularities[]"\r\n\r\nword\r\n'
    b"--------------------------d04673e809ad0322\r\n"
    b'Content-Disposition: form-data; name="language"\r\n\r\nen\r\n'
    b"--------------------------d04673e809ad0322--\r\n"
)


def test_curl_form_parses() -> None:
    assert spans(CURL_BODY, CURL_TYPE) == [
        (b"model", b"whisper-1"),
        (b"file", b"ID3\x00\r\n--x\r\n"),
        (b"timestamp_granularities[]", b"word"),
        (b"language", b"en"),
    ]


def test_what_rfc_7578_allows_parses() -> None:
    raw = form(
        b"content-disposition: Form-Data;NAME=model\r\n\r\nm",  # case, token, no space
        b'Content-Disposition:form-data ;\tname="";  filename="x.wav"; x-extra=1\r\n'
        b"Content-Type: audio/wav\r\n\r\n",  # empty name, extra parameter, empty value
        b"Content-Type: text/plain \r\n" + CD + b'note"\r\n\r\na\nb\rc\r\n\r\n-- b0undar',
        close=b"--",  # no CRLF after the close delimiter
    )
    assert spans(raw, b'multipart/form-data; boundary="b0undary"') == [
        (b"model", b"m"),
        (b"", b""),
        (b"note", b"a\nb\rc\r\n\r\n-- b0undar"),
    ]


def test_model_value_is_spliced_by_the_body() -> None:
    raw = form(field("model", b"m"), field("stream", b"true"))
    parsed = parse_multipart(raw, b"multipart/form-data; boundary=" + B)
    assert parsed.slugs == ("m",) and parsed.stream
    assert parsed.for_upstream("whisper-1") == form(
        field("model", b"whisper-1"), field("stream", b"true")
    )


# Refusals -----------------------------------------------------------------------------

MODEL = field("model", b"m")

REFUSED = [
    ("two-models", form(MODEL, field("model", b"other")), "duplicate_name"),
    ("duplicate-name", form(MODEL, field("x", b"1"), field("x", b"2")), "duplicate_name"),
    ("duplicate-folded", form(MODEL, field("Model", b"other")), "duplicate_name"),
    ("no-disposition", form(MODEL, b"Content-Type: text/plain\r\n\r\nx"), "no_disposition"),
    ("empty-head", form(MODEL, b"\r\nx"), "no_disposition"),
    ("attachment", form(b'Content-Disposition: attachment; name="model"\r\n\r\nm'), "not_form_data"),
    ("no-name", form(b'Content-Disposition: form-data; filename="a"\r\n\r\nm'), "no_name"),
    ("repeated-param", form(b'Content-Disposition: form-data; name="model"; name="x"\r\n\r\nm'),
     "repeated_parameter"),
    ("repeated-param-case", form(b"Content-Disposition: form-data; name=x; NAME=model\r\n\r\nm"),
     "repeated_parameter"),
    ("unterminated", form(b'Content-Disposition: form-data; name="model\r\n\r\nm'),
     "unterminated_quote"),
    ("escaped-quote", form(b'Content-Disposition: form-data; name="a\\"; name="model"\r\n\r\nm'),
     "escaped_quote"),
    ("backslash-name", form(b'Content-Disposition: form-data; name="mod\\el"\r\n\r\nm'),
     "escaped_name"),
    ("name-star", form(b"Content-Disposition: form-data; name*=utf-8''model\r\n\r\nm"),
     "extended_parameter"),
    ("filename-star", form(CD + b"model\"; filename*=utf-8''a.mp3\r\n\r\nm"),
     "extended_parameter"),
    ("trailing-semicolon", form(b'Content-Disposition: form-data; name="model";\r\n\r\nm'),
     "disposition"),
    ("space-around-equals", form(b'Content-Disposition: form-data; name = "model"\r\n\r\nm'),
     "disposition"),
    ("junk-after-quote", form(b'Content-Disposition: form-data; name="model"x\r\n\r\nm'),
     "disposition"),
    ("ctl-in-quote", form(b'Content-Disposition: form-data; name="mo\x00del"\r\n\r\nm'),
     "part_head"),
    ("two-dispositions", form(CD + b'model"\r\n' + CD + b'x"\r\n\r\nm'), "repeated_header"),
    ("obs-fold", form(b"Content-Disposition: form-data;\r\n name=\"model\"\r\n\r\nm"),
     "folded_header"),
    ("bare-lf-in-head", form(b'Content-Disposition: form-data; name="a"\nX: y\r\n\r\nm'),
     "line_end"),
    ("lf-blank-line", form(b'Content-Disposition: form-data; name="a"\n\nm\r\n\r\nn'), "line_end"),
    ("not-a-field", form(b"Content-Disposition form-data\r\n\r\nm"), "part_head"),
    ("underscore-field", form(MODEL.replace(b"Content-", b"Content_")), "part_head"),
    ("space-before-colon", form(b'Content-Disposition : form-data; name="a"\r\n\r\nm'),
     "part_head"),
    ("blank-line-is-the-delimiter-crlf", form(b'Content-Disposition: form-data; name="model"\r\n'),
     "part_head"),
    ("no-blank-line", form(b'Content-Disposition: form-data; name="model"'), "part_head"),
    ("head-too-long", form(b"X-Pad: " + b"a" * MAX_PART_HEAD + b"\r\n" + MODEL), "part_head"),
    ("transfer-encoding", form(b"Content-Transfer-Encoding: base64\r\n" + CD + b'model"\r\n\r\nbQ=='),
     "transfer_encoding"),
    ("nested", form(b"Content-Type: Multipart/Mixed; boundary=x\r\n" + MODEL), "nested"),
    ("preamble", b"hello\r\n" + form(MODEL), "preamble"),
    ("leading-crlf", b"\r\n" + form(MODEL), "preamble"),
    ("epilogue", form(MODEL) + b"bye", "epilogue"),
    ("epilogue-part", form(MODEL, close=b"--\r\n--b0undary\r\n") + field("model", b"x"), "epilogue"),
    ("no-close", form(MODEL)[: -len(b"--b0undary--\r\n")], "unclosed"),
    ("cut-after-boundary", b"--b0undary", "unclosed"),
    ("cut-in-value", b"--b0undary\r\n" + MODEL, "unclosed"),
    ("padding", form(MODEL).replace(b"--b0undary\r\n", b"--b0undary \r\n"), "stray_boundary"),
    ("longer-boundary", form(MODEL, field("a", b"x\r\n--b0undaryX\r\n")), "stray_boundary"),
    ("lf-delimiter", form(field("file", b"x\n--b0undary\r\n" + MODEL)), "stray_boundary"),
    ("boundary-mid-line", form(MODEL, field("a", b"x--b0undary--")), "stray_boundary"),
    ("lf-before-close", form(MODEL).replace(b"\r\n--b0undary--", b"\n--b0undary--"), "stray_boundary"),
    ("no-parts", b"--b0undary--\r\n", "no_parts"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "cause"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_with_its_cause(raw: bytes, cause: str) -> None:
    assert refusal(raw) == cause


def test_a_refusal_is_400_with_the_cause_in_details() -> None:
    raw = form(MODEL, field("model", b"other"))
    with pytest.raises(BadRequest) as caught:
        parse_multipart(raw, b"multipart/form-data; boundary=" + B)
    assert caught.value.details == {"cause": "duplicate_name"}
    assert "model" in caught.value.message


def test_array_fields_may_repeat_other_names_may_not() -> None:
    raw = form(MODEL, field("include[]", b"a"), field("include[]", b"b"))
    assert spans(raw, b"multipart/form-data; boundary=" + B)[1:] == [
        (b"include[]", b"a"),
        (b"include[]", b"b"),
    ]
    assert refusal(form(MODEL, field("include", b"a"), field("include", b"b"))) == "duplicate_name"


@pytest.mark.parametrize(
    ("content_type", "delimiter"),
    [
        (b"multipart/form-data; boundary=abc", b"--abc"),
        (b'Multipart/Form-Data;boundary="a b:c?"', b"--a b:c?"),
        (b"multipart/form-data; charset=utf-8; BOUNDARY=x ", b"--x"),
        (b'multipart/form-data; x="q\\\\q"; boundary=y', b"--y"),  # an escape, in another param
    ],
)
def test_delimiter_of_a_content_type(content_type: bytes, delimiter: bytes) -> None:
    assert delimiter_of(content_type) == delimiter


@pytest.mark.parametrize(
    ("content_type", "cause"),
    [
        (None, "not_multipart"),
        (b"application/json", "not_multipart"),
        (b"text/plain; x=multipart/form-data; boundary=a", "not_multipart"),
        (b"multipart/mixed; boundary=a", "not_multipart"),
        (b"multipart/form-data", "boundary"),
        (b"multipart/form-data; boundary=", "content_type"),
        (b'multipart/form-data; boundary=""', "boundary"),
        (b'multipart/form-data; boundary="a "', "boundary"),
        (b"multipart/form-data; boundary=" + b"a" * 71, "boundary"),
        (b'multipart/form-data; boundary="a\\b"', "boundary"),
        (b"multipart/form-data; boundary=a; boundary=b", "repeated_parameter"),
        (b"multipart/form-data; boundary=a; Boundary=b", "repeated_parameter"),
        (b'multipart/form-data; c="; boundary=evil"; boundary=a; x', "content_type"),
        (b'multipart/form-data; boundary="a', "unterminated_quote"),
        (b'multipart/form-data; x="\\"; boundary=evil"; boundary=a', "escaped_quote"),
        (b"multipart/form-data; boundary=a'b", "content_type"),
        (b"multipart/form-data; boundary*=utf-8''a", "extended_parameter"),
    ],
)
def test_content_type_refused(content_type: bytes | None, cause: str) -> None:
    with pytest.raises(MalformedForm) as caught:
        delimiter_of(content_type)
    assert caught.value.cause == cause


@pytest.mark.parametrize(
    "shape",
    ["one-file", "many-parts", "near-boundaries", "near-heads"],
)
def test_work_is_linear_in_the_body(shape: str) -> None:
    mib = 1024 * 1024
    boundary = b"x" * 70
    if shape == "one-file":
        raw = form(MODEL, field("file", b"\r\n-" * (10 * mib // 3)), boundary=boundary)
    elif shape == "many-parts":
        raw = form(MODEL, *(field(f"f{i}", b"v") for i in range(100_000)), boundary=boundary)
    elif shape == "near-boundaries":  # the boundary less its last byte, on every line
        raw = form(MODEL, field("file", (b"\r\n--" + b"x" * 69) * (mib // 8)), boundary=boundary)
    else:  # heads close to the limit without their blank line until the end
        pad = b"X-Pad: " + b"a" * (MAX_PART_HEAD - 100) + b"\r\n"
        raw = form(MODEL, *(pad + field(f"f{i}", b"") for i in range(500)), boundary=boundary)
    # This process's CPU time, not the wall clock: other tests running beside it (the
    # suite runs in several processes) cannot stretch it.
    started = time.process_time()
    got = fields(raw, b"--" + boundary)
    elapsed = time.process_time() - started
    assert got[0][0] == b"model"
    # Linear work here is 1-60 ms of CPU; a rescan from the start per part or per line
    # would be minutes.
    assert elapsed < 10.0, (shape, len(raw), elapsed)


# Property: the stdlib's email parser sees the same form --------------------------------


def oracle(raw: bytes, boundary: bytes) -> list[tuple[str | None, bytes | None]]:
    """Names and values as email.parser reads the form (RFC 2046 framing, RFC 2231
    parameters, quoted-pairs unescaped)."""
    head = b'Content-Type: multipart/form-data; boundary="' + boundary + b'"\r\n\r\n'
    message = BytesParser(policy=HTTP).parsebytes(head + raw)
    assert isinstance(message, EmailMessage) and message.is_multipart()
    seen: list[tuple[str | None, bytes | None]] = []
    for part in message.iter_parts():
        disposition: Any = part.get("content-disposition")
        name = None if disposition is None else disposition.params.get("name")
        payload = part.get_payload(decode=True)
        seen.append((name, payload if isinstance(payload, bytes) else None))
    return seen


BCHARS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? "
TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
QUOTABLE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) not in '"\\') + "é\t"
CONTENT_TYPES = [b"audio/mpeg", b"application/octet-stream", b"text/plain; charset=utf-8"]

boundaries = st.text(BCHARS, min_size=1, max_size=70).filter(lambda b: not b.endswith(" "))
field_names = st.one_of(
    st.text(QUOTABLE, max_size=10),
    st.text(TCHARS, min_size=1, max_size=10),
    st.sampled_from(["model", "file", "include[]", "timestamp_granularities[]"]),
)


@st.composite
def forms(draw: st.DrawFn) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    """(boundary, body, [(name, value)]): a well-formed form in one of the many ways
    RFC 7578 allows writing it."""
    boundary = draw(boundaries).encode()
    names = draw(
        st.lists(field_names, min_size=1, max_size=6, unique_by=lambda n: n.lower()).map(
            lambda ns: ns + [n for n in ns if n.endswith("[]")]  # lists repeat their name
        )
    )
    pieces = st.sampled_from(
        [b"\r\n", b"\n", b"\r", b"-", b"--", b"x", b" ", b"\r\n\r\n", boundary[:-1],
         b"--" + boundary[:-1], CD + b'model"\r\n', b"\x00\xff"]
    )  # fmt: skip
    body = b""
    expected: list[tuple[str, bytes]] = []
    for name in names:
        value = draw(st.binary(max_size=20) | st.lists(pieces, max_size=6).map(b"".join))
        quoted = not _is_token(name) or draw(st.booleans())
        written = b'"' + name.encode() + b'"' if quoted else name.encode()
        params = [draw(st.sampled_from([b"name", b"Name", b"NAME"])) + b"=" + written]
        if draw(st.booleans()):
            params.append(b'filename="' + draw(st.text(QUOTABLE, max_size=8)).encode() + b'"')
        if draw(st.booleans()):
            params.append(b"x-extra=" + draw(st.sampled_from([b"1", b'"a;b"', b'"\\\\"'])))
        params = draw(st.permutations(params))
        semicolon = st.sampled_from([b"; ", b";", b" ;\t", b";  "])
        disposition = draw(st.sampled_from([b"form-data", b"Form-Data", b"FORM-DATA"]))
        for param in params:
            disposition += draw(semicolon) + param
        colon = st.sampled_from([b": ", b":", b":\t", b":  "])
        lines = [
            draw(st.sampled_from([b"Content-Disposition", b"content-disposition"]))
            + draw(colon)
            + disposition
            + draw(st.sampled_from([b"", b" "]))
        ]
        if draw(st.booleans()):
            lines.append(b"Content-Type" + draw(colon) + draw(st.sampled_from(CONTENT_TYPES)))
        head = b"".join(line + b"\r\n" for line in draw(st.permutations(lines)))
        body += b"--" + boundary + b"\r\n" + head + b"\r\n" + value + b"\r\n"
        expected.append((name, value))
    body += b"--" + boundary + b"--" + draw(st.sampled_from([b"", b"\r\n"]))
    return boundary, body, expected


def _is_token(name: str) -> bool:
    """Writable unquoted: a token without RFC 2231's `'` and `*`."""
    return bool(name) and all(c in TCHARS and c not in "'*" for c in name)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forms())
def test_well_formed_forms_parse_as_email_reads_them(
    made: tuple[bytes, bytes, list[tuple[str, bytes]]],
) -> None:
    boundary, raw, expected = made
    if any(b"--" + boundary in value for _, value in expected):
        # A value holding the boundary: refused, whichever rule sees it first (a stray
        # boundary, or the part head it seems to begin).
        assert refusal(raw, boundary) in ("stray_boundary", "part_head")
        return
    got = [(name.decode(), raw[start:end]) for name, start, end in fields(raw, b"--" + boundary)]
    assert got == expected
    assert oracle(raw, boundary) == got


MUTATIONS = [b"\n", b"\r", b"\r\n", b" ", b"\t", b'"', b";", b"\\", b"*", b"=", b"--",
             b"\r\n ", b"\r\n\r\n", b'name="model"', b"Content-Transfer-Encoding: base64\r\n",
             CD + b'model"\r\n\r\nx\r\n']  # fmt: skip


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forms(), st.data())
def test_any_form_accepted_is_read_alike_by_email(
    made: tuple[bytes, bytes, list[tuple[str, bytes]]], data: st.DataObject
) -> None:
    """Bytes inserted, replaced or deleted anywhere (the boundary among them): whenever
    fields() still accepts, the oracle sees exactly its names and values."""
    boundary, raw, _ = made
    inserts = st.sampled_from([*MUTATIONS, b"--" + boundary, b"\r\n--" + boundary + b"\r\n"])
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw)))
        cut = data.draw(st.integers(0, 2))
        raw = raw[:at] + data.draw(inserts | st.just(b"")) + raw[at + cut :]
    try:
        accepted = fields(raw, b"--" + boundary)
    except MalformedForm:
        return
    got = [
        (name.decode("utf-8", "surrogateescape"), raw[start:end]) for name, start, end in accepted
    ]
    assert oracle(raw, boundary) == got


# End to end ---------------------------------------------------------------------------


async def test_upstream_never_sees_a_refused_form_and_gets_a_good_one_whole(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = await gateway(one_provider(upstream))
    ctype = {"content-type": "multipart/form-data; boundary=" + B.decode()}
    audio = bytes(range(256)) * 64
    smuggled = [
        ("duplicate_name", form(MODEL, field("file", audio), field("model", b"gpt-4o"))),
        # A lenient upstream would find a second `model` after a bare LF or in the epilogue.
        ("stray_boundary", form(field("file", audio + b"\n--b0undary\r\n" + field("model", b"x")), MODEL)),
        ("epilogue", form(MODEL, field("file", audio)) + b"--b0undary\r\n" + field("model", b"x")),
    ]  # fmt: skip
    async with httpx.AsyncClient(timeout=10) as client:
        for cause, raw in smuggled:
            r = await client.post(f"{gw.base_url}/audio/transcriptions", content=raw, headers=ctype)
            assert assert_envelope(r, 400, "bad_request")["details"] == {"cause": cause}
        assert upstream.requests == []

        sent: list[bytes] = []

        async def keep(request: httpx.Request) -> None:
            sent.append(await request.aread())

        upstream.script(Json({"text": "hello"}))
        http = httpx.AsyncClient(timeout=10, event_hooks={"request": [keep]})
        async with openai.AsyncOpenAI(
            api_key="sk-x", base_url=gw.base_url, http_client=http
        ) as sdk:
            answer = await sdk.audio.transcriptions.create(
                model="m",
                file=("a.mp3", audio, "audio/mpeg"),
                timestamp_granularities=["word", "segment"],
                response_format="json",
            )
    assert answer.text == "hello"
    (got,) = upstream.requests
    assert got.path == "/v1/audio/transcriptions"
    model_part = b'name="model"\r\n\r\nm\r\n'
    assert sent[0].count(model_part) == 1
    assert got.body == sent[0].replace(model_part, b'name="model"\r\n\r\nupstream-model\r\n')
