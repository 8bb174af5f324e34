"""The official `openai` SDK against the gateway: calls, streams, models, exception classes.

The gateway runs in the test's event loop, so the sync client runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import GatewayFactory, RunningGateway
from tests.helpers import free_port
from tests.scripted_upstream import DONE, Json, Sse, Upstream, chunk

UPSTREAM_SECRET = "sk-upstream-sdk-SECRET-77"
KEY = "sk-gw-sdk-plain-1"
LIMITED = "sk-gw-sdk-limited-2"
KEYS = f"""
keys:
  - name: app
    key: {KEY}
  - name: limited
    key: {LIMITED}
    models: ["e"]
"""
MESSAGES: list[Any] = [{"role": "user", "content": "hello world"}]
T = TypeVar("T")


def routes(upstream: Upstream, dead_port: int) -> str:
    return f"""
providers:
  p:
    base_url: {upstream.url}
    api_key: {UPSTREAM_SECRET}
  p2:
    base_url: {upstream.url}
    api_key: {UPSTREAM_SECRET}
  echo:
    base_url: builtin:echo
  dead:
    base_url: http://127.0.0.1:{dead_port}/v1
models:
  e:
    providers: [{{provider: echo}}]
  team/special:
    providers: [{{provider: echo}}]
  m:
    providers:
      - provider: p
        model: upstream-model
  pair:
    providers:
      - provider: p
        model: upstream-a
      - provider: p2
        model: upstream-b
  fragile:
    cooldown: {{failures: 1, seconds: 60}}
    providers:
      - provider: p
        model: upstream-fragile
  gone:
    providers: [{{provider: dead}}]
"""


@dataclass
class Sdk:
    gw: RunningGateway
    upstream: Upstream
    sent: list[str] = field(default_factory=list)  # requests the SDK put on the wire

    def _hook(self, request: httpx2.Request) -> None:
        self.sent.append(f"{request.method} {request.url.path}")

    async def _ahook(self, request: httpx2.Request) -> None:
        self.sent.append(f"{request.method} {request.url.path}")

    def sync(self, key: str = KEY, **kwargs: Any) -> OpenAI:
        http = openai.DefaultHttpxClient(event_hooks={"request": [self._hook]})
        return OpenAI(
            base_url=self.gw.base_url, api_key=key, timeout=10, http_client=http, **kwargs
        )

    def aio(self, key: str = KEY, **kwargs: Any) -> AsyncOpenAI:
        http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [self._ahook]})
        return AsyncOpenAI(
            base_url=self.gw.base_url, api_key=key, timeout=10, http_client=http, **kwargs
        )

    async def in_thread(self, fn: Callable[[OpenAI], T], key: str = KEY) -> T:
        def run() -> T:
            with self.sync(key) as client:
                return fn(client)

        return await asyncio.to_thread(run)


@pytest.fixture
async def sdk(gateway: GatewayFactory, upstream: Upstream) -> Sdk:
    gw = await gateway(routes(upstream, free_port()), KEYS)
    # conftest's listening socket is proto 0, so asyncio never sets TCP_NODELAY on it and
    # every response would wait ~40 ms for a delayed ACK. Accepted sockets inherit this.
    for server in gw.server.servers:
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Sdk(gw, upstream)


def raises_in_thread(
    exc: type[BaseException], fn: Callable[[OpenAI], Any]
) -> Callable[[OpenAI], BaseException]:
    def run(client: OpenAI) -> BaseException:
        with pytest.raises(exc) as info:
            fn(client)
        return info.value

    return run


# --------------------------------------------------------------------------- echo


async def test_sync_chat_echo(sdk: Sdk) -> None:
    resp = await sdk.in_thread(lambda c: c.chat.completions.create(model="e", messages=MESSAGES))
    assert resp.model == "e"
    assert resp.choices[0].message.content == "echo: hello world"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.total_tokens > 0
    assert sdk.sent == ["POST /v1/chat/completions"]


async def test_async_chat_echo(sdk: Sdk) -> None:
    async with sdk.aio() as client:
        resp = await client.chat.completions.create(model="team/special", messages=MESSAGES)
    assert resp.model == "team/special"
    assert resp.choices[0].message.content == "echo: hello world"


async def test_sync_stream_echo(sdk: Sdk) -> None:
    def run(c: OpenAI) -> list[Any]:
        with c.chat.completions.create(model="e", messages=MESSAGES, stream=True) as stream:
            return list(stream)

    chunks = await sdk.in_thread(run)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "echo: hello world"
    assert len(chunks) >= 4  # one per word, then the finish
    assert {ch.model for ch in chunks} == {"e"}
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_async_stream_echo_with_usage(sdk: Sdk) -> None:
    async with sdk.aio() as client:
        stream = await client.chat.completions.create(
            model="e",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [ch async for ch in stream]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "echo: hello world"
    assert {ch.model for ch in chunks} == {"e"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


async def test_embeddings_echo_sync_and_async(sdk: Sdk) -> None:
    resp = await sdk.in_thread(
        lambda c: c.embeddings.create(model="e", input=["a", "b", "c"], encoding_format="float")
    )
    assert resp.model == "e"
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert all(len(d.embedding) == 8 for d in resp.data)
    async with sdk.aio() as client:
        again = await client.embeddings.create(model="e", input="a", encoding_format="float")
    assert again.data[0].embedding == resp.data[0].embedding


async def test_completions_echo_sync_and_async_stream(sdk: Sdk) -> None:
    resp = await sdk.in_thread(lambda c: c.completions.create(model="e", prompt="hi there"))
    assert resp.model == "e"
    assert resp.choices[0].text == "echo: hi there"
    async with sdk.aio() as client:
        stream = await client.completions.create(model="e", prompt="hi there", stream=True)
        parts = [ch async for ch in stream]
    assert "".join(p.choices[0].text for p in parts if p.choices) == "echo: hi there"
    assert {p.model for p in parts} == {"e"}


# --------------------------------------------------------------------------- scripted upstream


async def test_chat_via_upstream_sync_and_async(sdk: Sdk) -> None:
    resp = await sdk.in_thread(
        lambda c: c.chat.completions.create(model="m", messages=MESSAGES, temperature=0.3)
    )
    assert resp.model == "m"
    assert resp.choices[0].message.content == "hi"
    async with sdk.aio() as client:
        resp2 = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert resp2.model == "m"
    assert len(sdk.upstream.requests) == 2
    first = sdk.upstream.requests[0]
    assert first.path == "/v1/chat/completions"
    assert first.json() == {"model": "upstream-model", "messages": MESSAGES, "temperature": 0.3}
    assert first.header("authorization") == f"Bearer {UPSTREAM_SECRET}"
    for req in sdk.upstream.requests:
        assert KEY not in repr(req.headers)


async def test_stream_via_upstream_sync_and_async(sdk: Sdk) -> None:
    events = [
        chunk("one"),
        chunk(" two"),
        chunk(None, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
        DONE,
    ]
    sdk.upstream.script(Sse(events), Sse(events))

    def run(c: OpenAI) -> list[Any]:
        return list(c.chat.completions.create(model="m", messages=MESSAGES, stream=True))

    chunks = await sdk.in_thread(run)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "one two"
    assert {ch.model for ch in chunks} == {"m"}
    async with sdk.aio() as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        achunks = [ch async for ch in stream]
    assert "".join(ch.choices[0].delta.content or "" for ch in achunks) == "one two"
    assert achunks[-1].choices[0].finish_reason == "stop"
    assert {ch.model for ch in achunks} == {"m"}
    assert [r.json()["model"] for r in sdk.upstream.requests] == ["upstream-model"] * 2
    assert all(r.json()["stream"] is True for r in sdk.upstream.requests)


async def test_embeddings_and_completions_via_upstream(sdk: Sdk) -> None:
    sdk.upstream.script(
        Json(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
                "model": "upstream-model",
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        ),
        Json(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 1700000000,
                "model": "upstream-model",
                "choices": [
                    {"index": 0, "text": "done", "finish_reason": "stop", "logprobs": None}
                ],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
        ),
    )
    emb = await sdk.in_thread(
        lambda c: c.embeddings.create(model="m", input="x", encoding_format="float")
    )
    assert emb.model == "m"
    assert emb.data[0].embedding == [0.25, -0.5]
    async with sdk.aio() as client:
        comp = await client.completions.create(model="m", prompt="p", max_tokens=3)
    assert comp.model == "m"
    assert comp.choices[0].text == "done"
    paths = [r.path for r in sdk.upstream.requests]
    assert paths == ["/v1/embeddings", "/v1/completions"]
    assert sdk.upstream.requests[0].json() == {
        "model": "upstream-model",
        "input": "x",
        "encoding_format": "float",
    }
    assert sdk.upstream.requests[1].json() == {
        "model": "upstream-model",
        "prompt": "p",
        "max_tokens": 3,
    }


# --------------------------------------------------------------------------- models


async def test_models_list_and_retrieve(sdk: Sdk) -> None:
    def run(c: OpenAI) -> tuple[list[str], Any]:
        ids = [m.id for m in c.models.list()]
        return ids, c.models.retrieve("e")

    ids, e = await sdk.in_thread(run)
    assert sorted(ids) == sorted(["e", "team/special", "m", "pair", "fragile", "gone"])
    assert e.id == "e"
    # The SDK sends a slug's `/` as %2F, which is never decoded into a separator
    # (SPEC §13): such a slug is listed, and used as `model`, but not retrieved by path.
    await sdk.in_thread(
        raises_in_thread(openai.NotFoundError, lambda c: c.models.retrieve("team/special"))
    )
    async with sdk.aio(LIMITED) as client:
        page = await client.models.list()
        assert [m.id for m in page.data] == ["e"]
        assert (await client.models.retrieve("e")).id == "e"


# --------------------------------------------------------------------------- exceptions


def _status_error(exc: BaseException, status: int, code: str) -> openai.APIStatusError:
    assert isinstance(exc, openai.APIStatusError)
    assert exc.status_code == status
    assert exc.code == code
    assert isinstance(exc.body, dict)
    assert exc.body["code"] == code
    assert isinstance(exc.body["message"], str) and exc.body["message"]
    return exc


async def test_authentication_error(sdk: Sdk) -> None:
    exc = await sdk.in_thread(
        raises_in_thread(
            openai.AuthenticationError,
            lambda c: c.chat.completions.create(model="e", messages=MESSAGES),
        ),
        key="sk-gw-wrong",
    )
    _status_error(exc, 401, "unauthorized")
    async with sdk.aio("sk-gw-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as info:
            await client.models.list()
    _status_error(info.value, 401, "unauthorized")
    assert len(sdk.sent) == 2


async def test_permission_denied_error(sdk: Sdk) -> None:
    async with sdk.aio(LIMITED) as client:
        with pytest.raises(openai.PermissionDeniedError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    _status_error(info.value, 403, "model_not_allowed")
    assert sdk.upstream.requests == []


async def test_bad_request_error(sdk: Sdk) -> None:
    exc = await sdk.in_thread(
        raises_in_thread(
            openai.BadRequestError,
            lambda c: c.chat.completions.create(model="nope", messages=MESSAGES),
        )
    )
    _status_error(exc, 400, "model_not_found")
    async with sdk.aio() as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(model="nope", input="x")
    _status_error(info.value, 400, "model_not_found")


async def test_not_found_error(sdk: Sdk) -> None:
    exc = await sdk.in_thread(
        raises_in_thread(openai.NotFoundError, lambda c: c.models.retrieve("nope"))
    )
    _status_error(exc, 404, "model_not_found")
    async with sdk.aio(LIMITED) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve("m")
    _status_error(info.value, 404, "model_not_found")


async def test_unprocessable_entity_error(sdk: Sdk) -> None:
    async with sdk.aio() as client:
        with pytest.raises(openai.UnprocessableEntityError) as info:
            await client.chat.completions.create(model="e", messages=[])
        err = _status_error(info.value, 422, "validation_error")
        assert isinstance(err.body, dict)
        assert "messages" in [str(v) for v in err.body["details"].values()]
        with pytest.raises(openai.UnprocessableEntityError) as info:
            await client.chat.completions.create(
                model="e", messages=MESSAGES, extra_body={"route": "x"}
            )
        _status_error(info.value, 422, "validation_error")
    exc = await sdk.in_thread(
        raises_in_thread(
            openai.UnprocessableEntityError,
            lambda c: c.chat.completions.create(
                model="e", messages=MESSAGES, extra_body={"stream": "yes"}
            ),
        )
    )
    _status_error(exc, 422, "validation_error")


RATE_LIMITED = {
    "error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}
}
OVERLOADED = {"error": {"message": "overloaded", "type": "server_error", "code": "overloaded"}}


async def test_rate_limit_relayed_after_exhausting_providers_no_sdk_retry(sdk: Sdk) -> None:
    sdk.upstream.script(Json(RATE_LIMITED, status=429), Json(RATE_LIMITED, status=429))
    async with sdk.aio() as client:  # default max_retries=2
        assert client.max_retries == 2
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="pair", messages=MESSAGES)
    exc = info.value
    assert exc.status_code == 429
    assert exc.code == "rate_limit_exceeded"  # the last upstream's own body
    assert exc.response.headers.get("x-should-retry") == "false"
    # The gateway tried both providers; the SDK did not try again.
    assert [r.json()["model"] for r in sdk.upstream.requests] == ["upstream-a", "upstream-b"]
    assert sdk.sent == ["POST /v1/chat/completions"]


async def test_upstream_503_sync_client_does_not_retry(sdk: Sdk) -> None:
    sdk.upstream.script(Json(OVERLOADED, status=503), Json(OVERLOADED, status=503))
    exc = await sdk.in_thread(
        raises_in_thread(
            openai.InternalServerError,
            lambda c: c.chat.completions.create(model="pair", messages=MESSAGES),
        )
    )
    assert isinstance(exc, openai.InternalServerError)
    assert exc.status_code == 503
    assert exc.code == "overloaded"
    assert exc.response.headers.get("x-should-retry") == "false"
    assert len(sdk.upstream.requests) == 2
    assert sdk.sent == ["POST /v1/chat/completions"]


async def test_stream_rate_limited_no_sdk_retry(sdk: Sdk) -> None:
    sdk.upstream.script(Json(RATE_LIMITED, status=429), Json(RATE_LIMITED, status=429))
    async with sdk.aio() as client:
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="pair", messages=MESSAGES, stream=True)
    assert info.value.response.headers.get("x-should-retry") == "false"
    assert len(sdk.upstream.requests) == 2
    assert len(sdk.sent) == 1


async def test_unreachable_upstream_is_502_internal_server_error(sdk: Sdk) -> None:
    async with sdk.aio() as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="gone", messages=MESSAGES)
    exc = _status_error(info.value, 502, "upstream_unavailable")
    assert isinstance(exc, openai.APIStatusError)
    assert exc.response.headers.get("x-should-retry") == "false"
    assert sdk.sent == ["POST /v1/chat/completions"]
    exc2 = await sdk.in_thread(
        raises_in_thread(
            openai.APIStatusError,
            lambda c: c.chat.completions.create(model="gone", messages=MESSAGES, stream=True),
        )
    )
    _status_error(exc2, 502, "upstream_unavailable")
    assert len(sdk.sent) == 2


async def test_cooling_down_is_503_without_sdk_retry(sdk: Sdk) -> None:
    sdk.upstream.script(Json(OVERLOADED, status=500))
    async with sdk.aio() as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="fragile", messages=MESSAGES)
        assert info.value.status_code == 500
        assert len(sdk.sent) == 1
        # One failure opened the breaker (failures: 1): the gateway answers on its own.
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="fragile", messages=MESSAGES)
    exc = _status_error(info.value, 503, "no_provider_available")
    assert exc.response.headers.get("x-should-retry") == "false"
    assert len(sdk.sent) == 2
    assert len(sdk.upstream.requests) == 1
