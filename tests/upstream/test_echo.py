"""The built-in echo upstream, called directly: every family's shapes, streams included."""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import zlib
from typing import Any

import orjson
import pytest
from openai.types import CreateEmbeddingResponse, ImagesResponse
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseCreatedEvent,
    ResponseItemList,
    ResponseTextDeltaEvent,
)
from openai.types.responses.input_token_count_response import InputTokenCountResponse

from gateway.upstream import echo
from gateway.upstream.echo import EchoResponse

RESPONSE_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 3,  # "echo: hello world"
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
MESSAGE_EVENTS = [
    "message_start",
    "content_block_start",
    "ping",
    *["content_block_delta"] * 3,
    "content_block_stop",
    "message_delta",
    "message_stop",
]


@pytest.fixture(autouse=True)
def no_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(echo, "WORD_DELAY", 0)


def post(path: str, obj: Any, **kw: Any) -> EchoResponse:
    return EchoResponse.answer(path, orjson.dumps(obj), **kw)


async def body_of(r: EchoResponse) -> Any:
    assert not r.is_sse
    assert r.headers == [(b"content-type", b"application/json")]
    return orjson.loads(await r.read())


async def chunks(r: EchoResponse) -> list[bytes]:
    assert r.is_sse
    assert r.headers == [(b"content-type", b"text/event-stream")]
    out = []
    while chunk := await r.next_chunk():
        out.append(chunk)
    return out


async def typed_events(r: EchoResponse) -> list[dict[str, Any]]:
    """Each chunk is one `event: <type>` SSE event whose data repeats the type."""
    events = []
    for chunk in await chunks(r):
        assert chunk.endswith(b"\n\n")
        event_line, data_line = chunk[:-2].split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        obj = orjson.loads(data_line[6:])
        assert obj["type"] == event_line[7:].decode()
        events.append(obj)
    return events


# --- chat, completions, embeddings ------------------------------------------------------


async def test_chat_answers_the_last_user_message() -> None:
    r = post(
        "/chat/completions",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "first"},
                {"role": "user", "content": [{"type": "text", "text": "hello"}]},
            ],
        },
    )
    assert r.status == 200
    obj = await body_of(r)
    assert obj["id"].startswith("echo-")
    assert obj["object"] == "chat.completion"
    assert obj["model"] == "m"
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": "echo: hello"}
    usage = obj["usage"]
    assert usage["completion_tokens"] == 2
    assert usage["total_tokens"] == usage["prompt_tokens"] + 2


async def test_chat_stream_with_usage() -> None:
    r = post(
        "/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "hello world"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    raw = await chunks(r)
    assert raw[-1] == b"data: [DONE]\n\n"
    events = [orjson.loads(c.removeprefix(b"data: ")) for c in raw[:-1]]
    pieces = [e["choices"][0]["delta"].get("content") for e in events[:3]]
    assert pieces == ["echo:", " hello", " world"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[3]["choices"][0]["finish_reason"] == "stop"
    assert events[4]["choices"] == [] and events[4]["usage"]["completion_tokens"] == 3
    assert {e["object"] for e in events} == {"chat.completion.chunk"}


async def test_completions_plain_and_stream() -> None:
    obj = await body_of(post("/completions", {"model": "m", "prompt": "once"}))
    assert obj["object"] == "text_completion"
    assert obj["choices"][0]["text"] == "echo: once"
    raw = await chunks(post("/completions", {"model": "m", "prompt": "once", "stream": True}))
    events = [orjson.loads(c.removeprefix(b"data: ")) for c in raw[:-1]]
    assert [e["choices"][0]["text"] for e in events] == ["echo:", " once", ""]


async def test_embeddings_base64_decodes_to_the_list_form() -> None:
    request = {"model": "e", "input": ["abc", "de"]}
    listed = await body_of(post("/embeddings", request))
    packed = await body_of(post("/embeddings", {**request, "encoding_format": "base64"}))
    CreateEmbeddingResponse.model_validate(listed)
    assert [d["index"] for d in packed["data"]] == [0, 1]
    for plain, b64 in zip(listed["data"], packed["data"], strict=True):
        vector = plain["embedding"]
        raw = base64.b64decode(b64["embedding"])
        assert len(raw) == 4 * len(vector)
        decoded = struct.unpack(f"<{len(vector)}f", raw)
        # float32 on the wire: the same values, to float32 precision.
        assert decoded == struct.unpack(
            f"<{len(vector)}f", struct.pack(f"<{len(vector)}f", *vector)
        )
        assert decoded == pytest.approx(vector, rel=1e-6)
    assert packed["usage"] == listed["usage"]


async def test_bad_json_is_a_400_in_openai_envelope() -> None:
    r = EchoResponse.answer("/chat/completions", b"nope")
    assert r.status == 400
    assert (await body_of(r))["error"]["type"] == "invalid_request_error"


# --- responses ------------------------------------------------------------------------


async def test_responses_plain_parses_with_the_sdk() -> None:
    r = post(
        "/responses",
        {
            "model": "gpt-x",
            "input": [
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
                {"role": "user", "content": [{"type": "input_text", "text": "hello world"}]},
            ],
            "previous_response_id": "resp_before",
        },
    )
    assert r.status == 200
    obj = await body_of(r)
    n = obj["id"].removeprefix("resp_echo")
    assert n.isdigit()
    assert obj["object"] == "response" and obj["status"] == "completed"
    assert obj["model"] == "gpt-x"
    assert obj["previous_response_id"] == "resp_before"
    assert obj["output"] == [
        {
            "type": "message",
            "id": f"msg_echo{n}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "echo: hello world", "annotations": []}],
        }
    ]
    usage = obj["usage"]
    assert usage["output_tokens"] == 3
    assert usage["total_tokens"] == usage["input_tokens"] + 3
    parsed = Response.model_validate(obj)
    assert parsed.output_text == "echo: hello world"


async def test_responses_string_input() -> None:
    obj = await body_of(post("/responses", {"model": "m", "input": "hi"}))
    assert obj["output"][0]["content"][0]["text"] == "echo: hi"
    assert obj["previous_response_id"] is None


async def test_responses_stream_events() -> None:
    r = post("/responses", {"model": "m", "input": "hello world", "stream": True})
    events = await typed_events(r)
    assert [e["type"] for e in events] == RESPONSE_EVENTS
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    created = ResponseCreatedEvent.model_validate(events[0])
    assert created.response.status == "in_progress"
    assert created.response.output == [] and created.response.usage is None
    added = events[2]["item"]
    assert added["status"] == "in_progress" and added["content"] == []
    deltas = [ResponseTextDeltaEvent.model_validate(e) for e in events[4:7]]
    assert "".join(d.delta for d in deltas) == "echo: hello world"
    assert {(d.item_id, d.output_index, d.content_index) for d in deltas} == {(added["id"], 0, 0)}
    assert events[7]["text"] == "echo: hello world"
    assert events[8]["part"]["text"] == "echo: hello world"
    assert events[9]["item"]["status"] == "completed"
    done = ResponseCompletedEvent.model_validate(events[-1])
    assert done.response.output_text == "echo: hello world"
    assert done.response.usage is not None and done.response.usage.output_tokens == 3


async def test_responses_stored_get_items_cancel_delete() -> None:
    created = await body_of(
        post("/responses", {"model": "m", "input": [{"role": "user", "content": "one"}]})
    )
    ident = created["id"]
    got = EchoResponse.answer(f"/responses/{ident}", b"", b"GET")
    assert got.status == 200 and await body_of(got) == created

    items = await body_of(EchoResponse.answer(f"/responses/{ident}/input_items", b"", b"GET"))
    listed = ResponseItemList.model_validate(items)
    assert listed.has_more is False
    assert items["data"][0]["type"] == "message" and items["data"][0]["role"] == "user"
    assert items["data"][0]["content"] == [{"type": "input_text", "text": "one"}]
    assert items["first_id"] == items["last_id"] == items["data"][0]["id"]

    cancelled = EchoResponse.answer(f"/responses/{ident}/cancel", b"")
    assert cancelled.status == 200 and (await body_of(cancelled))["id"] == ident

    deleted = EchoResponse.answer(f"/responses/{ident}", b"", b"DELETE")
    assert await body_of(deleted) == {"id": ident, "object": "response.deleted", "deleted": True}
    gone = EchoResponse.answer(f"/responses/{ident}", b"", b"GET")
    assert gone.status == 404
    assert await body_of(gone) == {
        "error": {
            "message": f"Response with id '{ident}' not found.",
            "type": "invalid_request_error",
            "code": "not_found",
            "param": None,
        }
    }


async def test_responses_input_items_order() -> None:
    request = {
        "model": "m",
        "input": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    }
    ident = (await body_of(post("/responses", request)))["id"]
    newest = await body_of(EchoResponse.answer(f"/responses/{ident}/input_items", b"", b"GET"))
    oldest = await body_of(
        EchoResponse.answer(f"/responses/{ident}/input_items?order=asc", b"", b"GET")
    )
    assert [i["role"] for i in oldest["data"]] == ["user", "assistant", "user"]
    assert newest["data"] == oldest["data"][::-1]
    assert oldest["data"][1]["content"] == [{"type": "output_text", "text": "b", "annotations": []}]
    ResponseItemList.model_validate(oldest)


async def test_responses_store_is_bounded() -> None:
    first = (await body_of(post("/responses", {"model": "m", "input": "x"})))["id"]
    for _ in range(echo.MAX_STORED):
        post("/responses", {"model": "m", "input": "x"})
    assert len(echo._stored) <= echo.MAX_STORED
    assert EchoResponse.answer(f"/responses/{first}", b"", b"GET").status == 404


async def test_responses_input_tokens() -> None:
    obj = await body_of(post("/responses/input_tokens", {"model": "m", "input": "hello " * 20}))
    parsed = InputTokenCountResponse.model_validate(obj)
    assert parsed.object == "response.input_tokens" and parsed.input_tokens > 1
    created = await body_of(post("/responses", {"model": "m", "input": "hello " * 20}))
    assert created["usage"]["input_tokens"] == parsed.input_tokens


# --- messages -------------------------------------------------------------------------

MESSAGES_REQUEST = {
    "model": "claude-x",
    "max_tokens": 64,
    "messages": [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": [{"type": "text", "text": "hello world"}]},
    ],
}


async def test_messages_plain() -> None:
    obj = await body_of(post("/messages", MESSAGES_REQUEST))
    assert obj["id"].startswith("msg_echo")
    assert obj["type"] == "message" and obj["role"] == "assistant"
    assert obj["model"] == "claude-x"
    assert obj["content"] == [{"type": "text", "text": "echo: hello world"}]
    assert obj["stop_reason"] == "end_turn" and obj["stop_sequence"] is None
    assert obj["usage"]["output_tokens"] == 3 and obj["usage"]["input_tokens"] >= 1


async def test_messages_parse_with_the_anthropic_sdk() -> None:
    anthropic = pytest.importorskip("anthropic")
    obj = await body_of(post("/messages", MESSAGES_REQUEST))
    message = anthropic.types.Message.model_validate(obj)
    assert message.content[0].text == "echo: hello world"


async def test_messages_stream_events() -> None:
    events = await typed_events(post("/messages", {**MESSAGES_REQUEST, "stream": True}))
    assert [e["type"] for e in events] == MESSAGE_EVENTS
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["output_tokens"] == 1 and start["model"] == "claude-x"
    assert events[1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [e["delta"] for e in events[3:6]]
    assert {d["type"] for d in deltas} == {"text_delta"}
    assert "".join(d["text"] for d in deltas) == "echo: hello world"
    assert events[6] == {"type": "content_block_stop", "index": 0}
    assert events[7] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 3},
    }


async def test_messages_count_tokens_and_error_envelope() -> None:
    counted = await body_of(post("/messages/count_tokens", MESSAGES_REQUEST))
    plain = await body_of(post("/messages", MESSAGES_REQUEST))
    assert counted == {"input_tokens": plain["usage"]["input_tokens"]}
    bad = EchoResponse.answer("/messages", b"[")
    assert bad.status == 400
    err = await body_of(bad)
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert isinstance(err["error"]["message"], str)


# --- images, audio, moderations, rerank -------------------------------------------------


async def test_images_are_a_valid_png() -> None:
    obj = await body_of(post("/images/generations", {"model": "img", "prompt": "a cat", "n": 2}))
    assert set(obj) == {"created", "data"}
    ImagesResponse.model_validate(obj)
    assert len(obj["data"]) == 2
    image = obj["data"][0]
    assert image["revised_prompt"] == "a cat"
    png = base64.b64decode(image["b64_json"])
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert struct.unpack(">II", png[16:24]) == (1, 1)  # IHDR width, height
    # Each chunk's CRC holds, and the pixel data inflates.
    at = 8
    kinds = []
    while at < len(png):
        (length,) = struct.unpack(">I", png[at : at + 4])
        kind, data = png[at + 4 : at + 8], png[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", png[at + 8 + length : at + 12 + length])
        assert zlib.crc32(kind + data) == crc
        if kind == b"IDAT":
            assert len(zlib.decompress(data)) == 5
        kinds.append(kind)
        at += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]


async def test_speech_is_binary() -> None:
    r = post("/audio/speech", {"model": "tts", "input": "hello", "voice": "alloy"})
    assert r.status == 200 and not r.is_sse
    assert r.headers == [(b"content-type", b"audio/mpeg")]
    audio = await r.read()
    assert audio == b"ID3" + hashlib.sha256(b"hello").digest()
    assert await r.next_chunk() == audio
    assert await r.next_chunk() == b""


def multipart(boundary: bytes, fields: list[tuple[str, bytes, str | None]]) -> bytes:
    out = b""
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"'
        if filename:
            disposition += f'; filename="{filename}"'
        out += b"--" + boundary + b"\r\n"
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: audio/mpeg\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


@pytest.mark.parametrize("path", ["/audio/transcriptions", "/audio/translations"])
async def test_transcription_counts_the_file_bytes(path: str) -> None:
    audio = b"\x00\r\n--not-the-boundary\r\n" + bytes(range(256)) * 3
    boundary = b"----echo-boundary-42"
    body = multipart(boundary, [("model", b"whisper-1", None), ("file", audio, "a.mp3")])
    headers = [(b"content-type", b'multipart/form-data; boundary="' + boundary + b'"')]
    r = EchoResponse.answer(path, body, None, headers)
    assert r.status == 200
    assert await body_of(r) == {"text": f"echo: {len(audio)} bytes of audio"}


async def test_transcription_without_file_is_400() -> None:
    boundary = b"b0und"
    body = multipart(boundary, [("model", b"whisper-1", None)])
    headers = [(b"content-type", b"multipart/form-data; boundary=" + boundary)]
    r = EchoResponse.answer("/audio/transcriptions", body, None, headers)
    assert r.status == 400
    assert (await body_of(r))["error"]["type"] == "invalid_request_error"
    not_form = post("/audio/transcriptions", {"model": "whisper-1"})
    assert not_form.status == 400


async def test_moderations_one_result_per_input() -> None:
    obj = await body_of(post("/moderations", {"model": "mod", "input": ["a", "b", "c"]}))
    assert obj["id"].startswith("modr-echo") and obj["model"] == "mod"
    assert [r["flagged"] for r in obj["results"]] == [False] * 3
    assert not any(any(r["categories"].values()) for r in obj["results"])
    single = await body_of(post("/moderations", {"model": "mod", "input": "a"}))
    assert len(single["results"]) == 1


async def test_rerank_orders_by_query_words() -> None:
    obj = await body_of(
        post(
            "/rerank",
            {
                "model": "rr",
                "query": "red apple pie",
                "documents": ["blue sky", {"text": "Red apple pie recipe"}, "an apple"],
            },
        )
    )
    assert obj["model"] == "rr" and obj["id"]
    assert [r["index"] for r in obj["results"]] == [1, 2, 0]
    scores = [r["relevance_score"] for r in obj["results"]]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == 1.0 and scores[-1] == 0.0
    assert obj["usage"]["total_tokens"] >= 1
    top = await body_of(
        post("/rerank", {"model": "rr", "query": "a", "documents": ["a", "b", "a b"], "top_n": 1})
    )
    assert [r["index"] for r in top["results"]] == [0]


# --- unknown --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/nope", None),
        ("/chat/completions", b"GET"),
        ("/responses", b"DELETE"),
        ("/responses/resp_x/unknown", b"GET"),
        ("/messages", b"GET"),
    ],
)
async def test_unknown_path_or_method_is_404(path: str, method: bytes | None) -> None:
    r = EchoResponse.answer(path, b"{}", method)
    assert r.status == 404
    err = (await body_of(r))["error"]
    assert err["type"] == "invalid_request_error" and err["param"] is None
    assert isinstance(err["message"], str)


async def test_stream_events_wait_between_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(echo, "WORD_DELAY", 0.01)
    r = post("/messages", {**MESSAGES_REQUEST, "stream": True})
    started = time.perf_counter()
    first = await r.next_chunk()
    assert first.startswith(b"event: message_start")
    assert not r.ready()  # the next event is a word delay away
    rest = await chunks(r)
    # A margin: event loops' timers (uvloop's) keep millisecond time.
    assert time.perf_counter() - started >= 0.009 * len(rest)


def test_moderation_answer_passes_the_sdks_strict_validation() -> None:
    from openai.types import ModerationCreateResponse

    answer = EchoResponse.answer("/moderations", b'{"model": "m", "input": ["a"]}')
    obj = ModerationCreateResponse.model_validate(orjson.loads(answer._body))
    assert obj.results[0].flagged is False
