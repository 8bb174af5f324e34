"""API families (SPEC §9) end to end: real sockets, a scriptable loopback upstream, and
the official SDKs where a client would use them."""

from __future__ import annotations

import base64
import json
import logging
import struct
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import GatewayFactory, RunningGateway
from tests.helpers import until
from tests.scripted_upstream import Json, Raw, Sse, Upstream

MESSAGES = [{"role": "user", "content": "hi"}]


def routes(*upstreams: Upstream, apis: list[str] | None = None, slug: str = "m") -> str:
    providers: dict[str, Any] = {}
    for i, up in enumerate(upstreams, 1):
        providers[f"p{i}"] = {"base_url": up.url, "api_key": f"sk-upstream-{i}"}
        if apis is not None:
            providers[f"p{i}"]["apis"] = apis
    entries = [{"provider": name, "model": "upstream-model"} for name in providers]
    return yaml.safe_dump({"providers": providers, "models": {slug: {"providers": entries}}})


KEYS = yaml.safe_dump({"keys": [{"name": "a", "key": "sk-client-a", "tpm": 10000}]})


def event(kind: str, **data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def response_obj(rid: str, status: str, usage: dict[str, int] | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "response", "model": "upstream-model", "status": status,
            "output": [], "usage": usage}  # fmt: skip


def responses_stream(rid: str, text: str = "Hi") -> list[bytes]:
    usage = {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
    return [
        event("response.created", sequence_number=0, response=response_obj(rid, "in_progress")),
        event(
            "response.output_text.delta",
            sequence_number=1,
            item_id="i",
            output_index=0,
            content_index=0,
            delta=text,
        ),
        event(
            "response.completed", sequence_number=2, response=response_obj(rid, "completed", usage)
        ),
    ]


def messages_stream(model: str = "upstream-model") -> list[bytes]:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": model,
               "content": [], "stop_reason": None, "stop_sequence": None,
               "usage": {"input_tokens": 10, "output_tokens": 1,
                         "cache_read_input_tokens": 4}}  # fmt: skip
    return [
        event("message_start", message=message),
        event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        event("content_block_delta", index=0, delta={"type": "text_delta", "text": "model"}),
        event("content_block_stop", index=0),
        event("message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": 6}),
        event("message_stop"),
    ]


def data_of(body: bytes, kind: str) -> dict[str, Any]:
    for block in body.split(b"\n\n"):
        if block.startswith(f"event: {kind}\n".encode()):
            found = json.loads(block.split(b"\ndata: ", 1)[1])
            assert isinstance(found, dict)
            return found
    raise AssertionError(f"no {kind} event in {body[:500]!r}")


async def test_responses_stream_rewrites_response_model_and_pins_its_id(
    gateway: GatewayFactory,
    make_upstream: Any,
    client: httpx.AsyncClient,
) -> None:
    """The id a stream created routes its lookups and continuations to the entry that
    made it, even where the model's order would pick another provider first."""
    first, second = await make_upstream(), await make_upstream()
    gw = await gateway(routes(first, second))
    first.script(Json({"error": {"message": "busy"}}, status=500))
    second.script(Sse(responses_stream("resp_2")))
    r = await client.post(
        f"{gw.base_url}/responses", json={"model": "m", "input": "hi", "stream": True}
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-gateway-provider"] == "p2"
    assert data_of(r.content, "response.created")["response"]["model"] == "m"
    assert data_of(r.content, "response.completed")["response"]["model"] == "m"
    assert b'"delta": "Hi"' in r.content  # other events: the upstream's bytes
    assert second.requests[-1].json()["model"] == "upstream-model"

    second.script(Json(response_obj("resp_2", "completed")))
    r = await client.get(f"{gw.base_url}/responses/resp_2?include=x")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "m"  # the slug that created it
    got = second.requests[-1]
    assert (got.method, got.path, got.query, got.body) == ("GET", "/v1/responses/resp_2",
                                                            "include=x", b"")  # fmt: skip
    second.script(Json({"id": "resp_2", "object": "response.deleted", "deleted": True}))
    r = await client.delete(f"{gw.url}/openai/v1/responses/resp_2")
    assert r.status_code == 200 and second.requests[-1].method == "DELETE"

    # A continuation without `model` goes to the same entry, first provider or not.
    second.script(Json(response_obj("resp_3", "completed")))
    r = await client.post(
        f"{gw.base_url}/responses", json={"previous_response_id": "resp_2", "input": "more"}
    )
    assert r.status_code == 200, r.text
    assert second.requests[-1].json()["model"] == "upstream-model"
    assert len(first.requests) == 1


async def test_unknown_response_id_is_404_response_not_found(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream))
    r = await client.get(f"{gw.base_url}/responses/resp_nobody")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "response_not_found"
    r = await client.post(f"{gw.base_url}/responses", json={"previous_response_id": "resp_x"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "response_not_found"
    r = await client.post(f"{gw.base_url}/responses/resp_x")  # POST only on /cancel
    assert r.status_code == 405
    assert upstream.requests == []


async def test_responses_failed_before_content_fails_over(
    gateway: GatewayFactory, make_upstream: Any, client: httpx.AsyncClient
) -> None:
    first, second = await make_upstream(), await make_upstream()
    gw = await gateway(routes(first, second))
    created = event("response.created", sequence_number=0,
                    response=response_obj("resp_1", "in_progress"))  # fmt: skip
    failed = event("response.failed", sequence_number=1,
                   response=response_obj("resp_1", "failed"))  # fmt: skip
    first.script(Sse([created, failed]))
    second.script(Sse(responses_stream("resp_9", "ok")))
    r = await client.post(
        f"{gw.base_url}/responses", json={"model": "m", "input": "hi", "stream": True}
    )
    assert r.status_code == 200
    assert r.headers["x-gateway-attempts"] == "2"
    assert b"response.failed" not in r.content
    assert data_of(r.content, "response.created")["response"]["id"] == "resp_9"


async def test_messages_stream_with_x_api_key_rewrites_message_start_and_counts_usage(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream, apis=["messages"]), KEYS)
    upstream.script(Sse(messages_stream()))
    headers = {"x-api-key": "sk-client-a", "anthropic-version": "2023-06-01",
               "anthropic-beta": "tools-2024-04-04"}  # fmt: skip
    body = {"model": "m", "max_tokens": 10, "messages": MESSAGES, "stream": True}
    r = await client.post(f"{gw.base_url}/messages", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert data_of(r.content, "message_start")["message"]["model"] == "m"
    # A text delta that says "model" is the upstream's bytes.
    assert data_of(r.content, "content_block_delta")["delta"]["text"] == "model"
    got = upstream.requests[-1]
    assert got.header("anthropic-version") == "2023-06-01"
    assert got.header("anthropic-beta") == "tools-2024-04-04"
    assert got.header("x-api-key") is None  # the client's credential stays here
    assert got.header("authorization") == "Bearer sk-upstream-1"
    # input 10 + cache read 4 (message_start) + output 6 (message_delta's running total)
    assert gw.runtime.limiter.usage["a"].spent == 20


async def test_messages_errors_use_anthropics_envelope(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream, apis=["messages"]), KEYS)
    r = await client.post(f"{gw.base_url}/messages", json={"model": "m", "messages": MESSAGES})
    assert r.status_code == 401
    assert r.json() == {"type": "error", "error": {"type": "authentication_error",
                                                   "message": r.json()["error"]["message"]}}  # fmt: skip
    headers = {"x-api-key": "sk-client-a"}
    r = await client.post(
        f"{gw.base_url}/messages", json={"model": "nope", "messages": MESSAGES}, headers=headers
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    # An upstream's own error comes back unmodified.
    upstream_error = {"type": "error", "error": {"type": "invalid_request_error",
                                                 "message": "max_tokens: Field required"}}  # fmt: skip
    upstream.script(Json(upstream_error, status=400))
    r = await client.post(
        f"{gw.base_url}/messages", json={"model": "m", "messages": MESSAGES}, headers=headers
    )
    assert r.status_code == 400 and r.json() == upstream_error
    # The chat family keeps SPEC §4's envelope, api-key credential and all.
    r = await client.post(
        f"{gw.base_url}/chat/completions", json={"model": "m", "messages": MESSAGES},
        headers={"api-key": "sk-client-a"},
    )  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "api_not_supported"
    assert "chat" in r.json()["error"]["message"]


async def test_messages_only_where_listed(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream))  # default apis: no messages
    r = await client.post(f"{gw.base_url}/messages", json={"model": "m", "messages": MESSAGES})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "messages API" in r.json()["error"]["message"]
    assert upstream.requests == []


async def test_messages_error_event_before_content_fails_over(
    gateway: GatewayFactory, make_upstream: Any, client: httpx.AsyncClient
) -> None:
    first, second = await make_upstream(), await make_upstream()
    gw = await gateway(routes(first, second, apis=["messages"]))
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    first.script(Sse([messages_stream()[0], event("error", **overloaded)]))
    second.script(Sse(messages_stream()))
    body = {"model": "m", "max_tokens": 10, "messages": MESSAGES, "stream": True}
    r = await client.post(f"{gw.base_url}/messages", json=body)
    assert r.status_code == 200
    assert r.headers["x-gateway-attempts"] == "2"
    assert b"overloaded_error" not in r.content


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        "/chat/completions",
        "/api/v1/chat/completions",
        "/openai/v1/chat/completions",
        "/openai/deployments/m/chat/completions?api-version=2024-10-21",
    ],
)
async def test_every_prefix_and_azure_deployments(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, path: str
) -> None:
    gw = await gateway(routes(upstream))
    body: dict[str, Any] = {"messages": MESSAGES}
    if "deployments" not in path:
        body["model"] = "m"
    r = await client.post(gw.url + path, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "m"
    got = upstream.requests[-1]
    assert got.path == "/v1/chat/completions" and got.query == ""  # api-version not sent
    assert got.json()["model"] == "upstream-model"


async def test_multipart_upload_rewrites_only_the_model_part(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream))
    audio = bytes(range(256)) * 40 + b'\r\nContent-Disposition: form-data; name="model"\r\n'
    boundary = b"b0undary"

    def form(model: bytes) -> bytes:
        parts = [
            b'Content-Disposition: form-data; name="model"\r\n\r\n' + model,
            b'Content-Disposition: form-data; name="file"; filename="a.mp3"\r\n'
            b"Content-Type: audio/mpeg\r\n\r\n" + audio,
            b'Content-Disposition: form-data; name="language"\r\n\r\nen',
        ]
        return b"".join(b"--" + boundary + b"\r\n" + p + b"\r\n" for p in parts) + (
            b"--" + boundary + b"--\r\n"
        )

    upstream.script(Json({"text": "hello"}))
    ctype = "multipart/form-data; boundary=" + boundary.decode()
    r = await client.post(
        f"{gw.base_url}/audio/transcriptions", content=form(b"m"), headers={"content-type": ctype}
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"text": "hello"}
    got = upstream.requests[-1]
    assert got.body == form(b"upstream-model")
    assert got.header("content-type") == ctype
    r = await client.post(
        f"{gw.base_url}/audio/transcriptions", content=b"{}", headers={"content-type": "text/x"}
    )
    # Without keys the sidecar's gate refuses what is not a form (SPEC §13); with keys
    # the form parser would (400 bad_request, tests/wire/test_multipart.py).
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


async def test_binary_speech_answer_is_relayed_as_is(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(routes(upstream))
    audio = b'ID3\x00{"model":"upstream-model"}' + bytes(range(256))
    head = b"HTTP/1.1 200 OK\r\ncontent-type: audio/mpeg\r\ncontent-length: %d\r\n\r\n"
    upstream.script(Raw(head % len(audio) + audio))
    r = await client.post(
        f"{gw.base_url}/audio/speech", json={"model": "m", "input": "hi", "voice": "alloy"}
    )
    assert r.status_code == 200
    assert r.content == audio
    assert r.headers["content-type"] == "audio/mpeg"


async def test_unserved_paths_are_logged_and_counted(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await gateway(routes(upstream))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        r = await client.post(f"{gw.base_url}/assistants", json={})
    assert r.status_code == 404
    await until(lambda: any("/v1/assistants" in rec.getMessage() for rec in caplog.records))
    metrics = (await client.get(f"{gw.url}/metrics")).text
    assert 'status="404"' in metrics


async def sdk_gateway(gateway: GatewayFactory) -> RunningGateway:
    return await gateway(
        "providers:\n  echo:\n    base_url: builtin:echo\n"
        "models:\n  m:\n    providers: [{provider: echo, model: echo-1}]\n",
        KEYS,
    )


async def test_openai_sdk_responses_through_the_echo(gateway: GatewayFactory) -> None:
    openai = pytest.importorskip("openai")
    gw = await sdk_gateway(gateway)
    sdk = openai.AsyncOpenAI(base_url=gw.base_url, api_key="sk-client-a", max_retries=0)
    created = await sdk.responses.create(model="m", input="hello there")
    assert created.model == "m"
    assert created.output_text == "echo: hello there"
    again = await sdk.responses.retrieve(created.id)
    assert again.id == created.id and again.model == "m"
    texts = []
    async with sdk.responses.stream(model="m", input="streamed words") as stream:
        async for ev in stream:
            if ev.type == "response.output_text.delta":
                texts.append(ev.delta)
        final = await stream.get_final_response()
    assert "".join(texts) == "echo: streamed words"
    assert final.model == "m"
    # Asked for explicitly, base64 comes back as the string (the Node SDK's default).
    emb = await sdk.embeddings.create(model="m", input="x", encoding_format="base64")
    plain = await sdk.embeddings.create(model="m", input="x", encoding_format="float")
    raw = base64.b64decode(str(emb.data[0].embedding))
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert floats == pytest.approx(plain.data[0].embedding, abs=1e-6)
    await sdk.close()


async def test_anthropic_sdk_messages_through_the_echo(gateway: GatewayFactory) -> None:
    anthropic = pytest.importorskip("anthropic")
    gw = await sdk_gateway(gateway)
    sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-client-a", max_retries=0)
    msg = await sdk.messages.create(
        model="m", max_tokens=20, messages=[{"role": "user", "content": "hello"}]
    )
    assert msg.model == "m"
    assert msg.content[0].text == "echo: hello"
    async with sdk.messages.stream(
        model="m", max_tokens=20, messages=[{"role": "user", "content": "two words"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "echo: two words"
    assert final.model == "m"
    count = await sdk.messages.count_tokens(
        model="m", messages=[{"role": "user", "content": "hello"}]
    )
    assert count.input_tokens > 0
    bad = anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        await bad.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    await bad.close()
    await sdk.close()


async def test_openai_sdk_every_other_family_through_the_echo(gateway: GatewayFactory) -> None:
    """Images, speech, transcriptions, moderations, and Azure's and Groq's client paths,
    as the official SDK sends them."""
    openai = pytest.importorskip("openai")
    gw = await sdk_gateway(gateway)
    sdk = openai.AsyncOpenAI(base_url=gw.base_url, api_key="sk-client-a", max_retries=0)
    image = await sdk.images.generate(model="m", prompt="a dot")
    assert image.data and base64.b64decode(image.data[0].b64_json or "").startswith(b"\x89PNG")
    speech = await sdk.audio.speech.create(model="m", input="hi", voice="alloy")
    assert (await speech.aread()).startswith(b"ID3")
    text = await sdk.audio.transcriptions.create(model="m", file=("a.mp3", b"\x00" * 300))
    assert text.text == "echo: 300 bytes of audio"
    mod = await sdk.moderations.create(model="m", input=["a", "b"])
    assert [r.flagged for r in mod.results] == [False, False]
    await sdk.close()

    azure = openai.AsyncAzureOpenAI(
        azure_endpoint=gw.url, api_key="sk-client-a", api_version="2024-10-21", max_retries=0
    )
    chat = await azure.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert chat.model == "m" and chat.choices[0].message.content == "echo: hi"
    await azure.close()
    groq_style = openai.AsyncOpenAI(
        base_url=f"{gw.url}/openai/v1", api_key="sk-client-a", max_retries=0
    )
    chat = await groq_style.chat.completions.create(model="m", messages=MESSAGES)  # type: ignore[arg-type]
    assert chat.model == "m"
    await groq_style.close()


async def test_responses_usage_counts_for_limits(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    """responses: usage.input_tokens and output_tokens, in response.completed for a
    stream, in the body otherwise; no stream_options is added to the request."""
    gw = await gateway(routes(upstream), KEYS)
    headers = {"authorization": "Bearer sk-client-a"}
    upstream.script(Sse(responses_stream("resp_5")))
    body = {"model": "m", "input": "hi", "stream": True}
    r = await client.post(f"{gw.base_url}/responses", json=body, headers=headers)
    assert r.status_code == 200, r.text
    assert "stream_options" not in upstream.requests[-1].json()
    assert gw.runtime.limiter.usage["a"].spent == 7
    usage = {"input_tokens": 3, "output_tokens": 4}
    upstream.script(Json(response_obj("resp_6", "completed", usage)))
    r = await client.post(f"{gw.base_url}/responses", json={**body, "stream": False},
                          headers=headers)  # fmt: skip
    assert r.status_code == 200
    assert gw.runtime.limiter.usage["a"].spent == 14
