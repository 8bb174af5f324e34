"""A slug reaches response headers (x-upstream-model): control characters are refused."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.scripted_upstream import Upstream


@pytest.mark.parametrize("slug", ["p/a\r\nx-evil: 1", "p/a\nb", "p/\x00", "p/" + "a" * 600])
async def test_slug_with_control_characters_is_422(
    gateway: GatewayFactory, upstream: Upstream, client: httpx.AsyncClient, slug: str
) -> None:
    routes = f'providers:\n  p:\n    base_url: {upstream.url}\nmodels:\n  "p/*":\n    providers: [{{provider: p}}]\n'
    gw = await gateway(routes)
    for body in (
        {"model": slug, "messages": [{"role": "user", "content": "x"}]},
        {"models": ["p/ok", slug], "messages": [{"role": "user", "content": "x"}]},
    ):
        r = await client.post(f"{gw.base_url}/chat/completions", json=body)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "validation_error"
        assert "x-evil" not in r.headers
    assert upstream.requests == []
    ok = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "p/a model with spaces", "messages": [{"role": "user", "content": "x"}]},
    )
    assert ok.status_code == 200
    assert ok.headers["x-upstream-model"] == "a model with spaces"
