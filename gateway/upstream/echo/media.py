"""Images, audio (speech; transcriptions and translations from a form), moderations, rerank."""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import zlib
from typing import Any

from gateway.upstream.echo.base import Answer, _Call, _count, _ids, _json_answer, _Reject
from gateway.wire.multipart import MalformedForm, delimiter_of, fields

# OpenAI's moderation categories: the SDK's strict validation wants every one named.
MODERATION_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit",
    "illicit/violent", "self-harm", "self-harm/instructions", "self-harm/intent", "sexual",
    "sexual/minors", "violence", "violence/graphic",
)  # fmt: skip


def _png_pixel() -> bytes:
    """A valid 1x1 transparent PNG, so clients that decode the image succeed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)  # 1x1, 8-bit RGBA
    pixels = zlib.compress(b"\x00" + b"\x00" * 4)  # the row's filter byte, then RGBA
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


_PIXEL_B64 = base64.b64encode(_png_pixel()).decode()


def _images(call: _Call) -> Answer:
    req = call.json()
    n = req.get("n")
    count = min(n, 10) if isinstance(n, int) and n > 0 else 1
    image = {"b64_json": _PIXEL_B64, "revised_prompt": req.get("prompt")}
    return _json_answer({"created": int(time.time()), "data": [image] * count})


def _speech(call: _Call) -> Answer:
    req = call.json()
    # Deterministic per input, so a test can tell two answers apart.
    audio = b"ID3" + hashlib.sha256(str(req.get("input", "")).encode()).digest()
    return Answer(200, audio, content_type=b"audio/mpeg")


def _form(call: _Call) -> dict[str, bytes]:
    """The multipart/form-data body's fields by name (the first of each name)."""
    body = call.body
    out: dict[str, bytes] = {}
    try:
        for name, start, end in fields(body, delimiter_of(call.header(b"content-type"))):
            out.setdefault(name.decode("utf-8", "replace"), body[start:end])
    except MalformedForm:
        raise _Reject(400, "body must be multipart/form-data with a boundary") from None
    return out


def _transcription(call: _Call) -> Answer:
    audio = _form(call).get("file")
    if audio is None:
        raise _Reject(400, "the form has no `file` part", "missing_file")
    return _json_answer({"text": f"echo: {len(audio)} bytes of audio"})


def _moderations(call: _Call) -> Answer:
    req = call.json()
    value = req.get("input")
    # A list of strings is one input each; anything else (one string, or one
    # multimodal list of parts) is a single input.
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        inputs: list[Any] = value
    else:
        inputs = [value]
    return _json_answer(
        {
            "id": f"modr-echo{next(_ids)}",
            "model": req.get("model", "echo"),
            "results": [
                {
                    "flagged": False,
                    "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
                    "category_scores": dict.fromkeys(MODERATION_CATEGORIES, 0.0),
                    "category_applied_input_types": {
                        key: ["text"] for key in MODERATION_CATEGORIES
                    },
                }
                for _ in inputs
            ],
        }
    )


def _rerank(call: _Call) -> Answer:
    req = call.json()
    query = str(req.get("query", ""))
    wanted = set(query.lower().split())
    documents = req.get("documents")
    texts = [
        str(d.get("text", "")) if isinstance(d, dict) else str(d)
        for d in (documents if isinstance(documents, list) else [])
    ]
    # The share of the query's words found in the document: crude, deterministic, and
    # it orders documents the way a reader would expect.
    scores = [len(wanted & set(t.lower().split())) / len(wanted) if wanted else 0.0 for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -scores[i])  # stable: ties by index
    top_n = req.get("top_n")
    if isinstance(top_n, int) and top_n >= 0:
        order = order[:top_n]
    return _json_answer(
        {
            "id": f"rerank-echo{next(_ids)}",
            "model": req.get("model", "echo"),
            "results": [{"index": i, "relevance_score": scores[i]} for i in order],
            "usage": {"total_tokens": _count(query, *texts)},
        }
    )


# --- dispatch -------------------------------------------------------------------------
