from __future__ import annotations

import httpx

from tests.conftest import GatewayFactory, one_provider
from tests.scripted_upstream import DONE, Sse, Upstream, chunk


async def test_chat_roundtrip(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    gw = await gateway(one_provider(upstream))
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 200
    assert r.json()["model"] == "m"
    assert upstream.requests[0].json()["model"] == "upstream-model"


async def test_stream_roundtrip(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient
) -> None:
    upstream.script(Sse([chunk("a"), chunk("b"), DONE]))
    gw = await gateway(one_provider(upstream))
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 200
    assert r.content == (chunk("a") + chunk("b") + DONE).replace(b'"upstream-model"', b'"m"')
