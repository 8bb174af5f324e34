"""The official Node SDK through the gateway (SPEC §9): it asks embeddings for base64 by
default and decodes them itself, so an echo that ignored `encoding_format` gave it
`[0, 0]` vectors. The package comes from the npm registry once, kept in the venv."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import GatewayFactory

NODE_DIR = Path(sys.prefix) / "share" / "gateway-tests" / "node"
OPENAI_NPM = "openai@5"

SCRIPT = """
import OpenAI from "openai";
const client = new OpenAI({ baseURL: process.env.BASE_URL, apiKey: "sk-node" });
const b64 = await client.embeddings.create({ model: "m", input: "hello" });
const floats = await client.embeddings.create({
  model: "m", input: "hello", encoding_format: "float",
});
const reply = await client.responses.create({ model: "m", input: "from node" });
console.log(JSON.stringify({
  base64: b64.data[0].embedding, float: floats.data[0].embedding,
  text: reply.output_text, model: reply.model,
}));
"""


def node_sdk() -> Path:
    """The openai npm package under the venv, installed on first use."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed (Debian: apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "openai").exists():
        NODE_DIR.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR), OPENAI_NPM],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm install {OPENAI_NPM} failed:\n{done.stderr[-2000:]}"
    return NODE_DIR


async def test_node_sdk_gets_real_vectors_from_its_base64_default(
    gateway: GatewayFactory,
) -> None:
    folder = await asyncio.to_thread(node_sdk)
    gw = await gateway(
        "providers:\n  echo:\n    base_url: builtin:echo\n"
        "models:\n  m:\n    providers: [{provider: echo}]\n"
    )
    script = folder / "check.mjs"
    script.write_text(SCRIPT)
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        cwd=folder,
        env={"BASE_URL": gw.base_url, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-2000:]
    got = json.loads(out)
    assert got["base64"] == pytest.approx(got["float"], abs=1e-6)
    assert any(v != 0 for v in got["base64"])
    assert got["text"] == "echo: from node" and got["model"] == "m"
