"""SPEC §12's traces: a loopback OTLP/HTTP receiver decodes what the gateway's exporter
sends (opentelemetry-proto), and checks the spans, their GenAI attributes, the parent
and child links and the traceparent the upstream got."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gateway.families import CHAT, MESSAGES, RESPONSES
from gateway.telemetry.tracing import SCHEMA_URL, Tracing
from tests.conftest import GatewayFactory
from tests.helpers import until
from tests.scripted_upstream import Json, Sse, Upstream, chat_completion, chunk

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


class Receiver:
    """OTLP/HTTP on 127.0.0.1: POST /v1/traces, protobuf bodies, decoded and kept."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.resources: list[dict[str, Any]] = []
        self.scopes: list[tuple[str, str]] = []  # (instrumentation scope, its schema URL)
        spans, resources, scopes = self.spans, self.resources, self.scopes

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                assert self.path == "/v1/traces"
                assert self.headers["content-type"] == "application/x-protobuf"
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    resources.append({a.key: _value(a.value) for a in rs.resource.attributes})
                    for ss in rs.scope_spans:
                        scopes.append((ss.scope.name, ss.schema_url))
                        for span in ss.spans:
                            spans.append(_span(span))
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value"))


def _span(span: Any) -> dict[str, Any]:
    return {
        "name": span.name,
        "kind": span.kind,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent": span.parent_span_id.hex(),
        "attributes": {a.key: _value(a.value) for a in span.attributes},
        "error": span.status.code == 2,
    }


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    r = Receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms: the tests wait less
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    yield r
    r.stop()


def routes(first: Upstream, second: Upstream) -> str:
    return (
        "providers:\n"
        f"  p1: {{base_url: {first.url}, api_key: sk-one}}\n"
        f"  p2: {{base_url: {second.url}, api_key: sk-two}}\n"
        "models:\n  m:\n    providers:\n"
        "      - {provider: p1, model: up-one}\n"
        "      - {provider: p2, model: up-two}\n"
    )


async def test_a_request_a_failed_attempt_and_the_serving_one(
    gateway: GatewayFactory,
    make_upstream: Any,
    client: httpx.AsyncClient,
    receiver: Receiver,
) -> None:
    first, second = await make_upstream(), await make_upstream()
    first.script(Json({"error": {"message": "down"}}, status=503))
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
             "prompt_tokens_details": {"cached_tokens": 3}}  # fmt: skip
    second.script(Json({**chat_completion(), "usage": usage}))
    gw = await gateway(routes(first, second))
    parent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    r = await client.post(
        f"{gw.base_url}/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        headers={"traceparent": parent, "tracestate": "vendor=1", "session-id": "codex-s"},
    )
    assert r.status_code == 200, r.text
    await until(lambda: len(receiver.spans) >= 3, within=10)
    server = next(s for s in receiver.spans if s["kind"] == 2)  # SERVER
    attempts = [s for s in receiver.spans if s["kind"] == 3]  # CLIENT
    # The client's trace, continued: same trace id, its span the parent.
    assert server["trace_id"] == CLIENT_TRACE and server["parent"] == CLIENT_SPAN
    assert server["name"] == "chat m"
    a = server["attributes"]
    assert a["gen_ai.operation.name"] == "chat"
    assert a["gen_ai.request.model"] == "m"
    assert a["gen_ai.response.model"] == "up-two"
    assert a["gen_ai.provider.name"] == "p2"
    assert a["gen_ai.usage.input_tokens"] == 5 and a["gen_ai.usage.output_tokens"] == 2
    assert a["gen_ai.conversation.id"] == "codex-s"  # the request's session (SPEC §14)
    assert a["gen_ai.usage.cache_read.input_tokens"] == 3  # OpenAI's cached_tokens
    assert a["gen_ai.usage.cache_write.input_tokens"] == 0
    assert "error.type" not in a and not server["error"]
    # One child per attempt: the failed one with error.type, the one that served.
    assert [s["parent"] for s in attempts] == [server["span_id"]] * 2
    failed = next(s for s in attempts if s["attributes"]["gen_ai.provider.name"] == "p1")
    served = next(s for s in attempts if s["attributes"]["gen_ai.provider.name"] == "p2")
    assert failed["attributes"]["error.type"] == "503" and failed["error"]
    assert failed["name"] == "chat up-one"
    assert served["attributes"]["gen_ai.request.model"] == "up-two"
    assert served["attributes"]["server.address"] == "127.0.0.1"
    assert "error.type" not in served["attributes"]
    # Each upstream was told of its own attempt's span, in the client's trace.
    for upstream, span in ((first, failed), (second, served)):
        got = upstream.requests[-1]
        assert got.header("traceparent") == f"00-{CLIENT_TRACE}-{span['span_id']}-01"
        assert got.header("tracestate") == "vendor=1"
    assert receiver.resources[0]["service.name"] == "gateway"
    # The conventions named where a collector looks for them (SPEC §14).
    assert set(receiver.scopes) == {("gateway", SCHEMA_URL)}
    assert SCHEMA_URL == "https://opentelemetry.io/schemas/gen-ai/0.1.0"


async def test_a_refusal_and_a_stream_have_spans_too(
    gateway: GatewayFactory,
    upstream: Upstream,
    client: httpx.AsyncClient,
    receiver: Receiver,
) -> None:
    gw = await gateway(
        f"providers:\n  p: {{base_url: {upstream.url}}}\n"
        "models:\n  m:\n    providers:\n      - {provider: p, model: up}\n"
    )
    r = await client.post(f"{gw.base_url}/chat/completions", json={"model": "nope",
                          "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 400
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    upstream.script(Sse([chunk("Hi"), chunk(choices=[], usage=usage), b"data: [DONE]\n\n"]))
    r = await client.post(f"{gw.base_url}/chat/completions", json={"model": "m", "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 200 and b"[DONE]" in r.content
    await until(lambda: len(receiver.spans) >= 3, within=10)
    servers = [s for s in receiver.spans if s["kind"] == 2]
    refused = next(s for s in servers if s["error"])
    assert refused["attributes"]["error.type"] == "model_not_found"
    assert refused["attributes"]["http.response.status_code"] == 400
    stream = next(s for s in servers if not s["error"])
    assert stream["attributes"]["gen_ai.usage.output_tokens"] == 2
    assert stream["trace_id"] != refused["trace_id"]  # no client traceparent: new traces
    # Without a client traceparent, the upstream still gets one: the attempt's.
    assert upstream.requests[-1].header("traceparent").startswith(f"00-{stream['trace_id']}-")


def test_without_the_variable_nothing_is_loaded(tmp_path: Any) -> None:
    import subprocess
    import sys

    code = (
        "import sys, gateway.app, gateway.runtime, gateway.telemetry.tracing\n"
        "from gateway.telemetry.tracing import Tracing\n"
        "assert Tracing.from_env({}) is None\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'loaded'\n"
    )
    env = {"PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_the_tracer_names_the_genai_conventions_and_every_familys_cache_tokens() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider, trace, TraceContextTextMapPropagator())
    usages = [  # (family, usage, cache read, cache write, all prompt tokens)
        (CHAT, {"prompt_tokens": 1000, "completion_tokens": 5,
                "prompt_tokens_details": {"cached_tokens": 800}}, 800, 0, 1000),
        (RESPONSES, {"input_tokens": 1000, "output_tokens": 5,
                     "input_tokens_details": {"cached_tokens": 600}}, 600, 0, 1000),
        (MESSAGES, {"input_tokens": 50, "output_tokens": 5, "cache_read_input_tokens": 900,
                    "cache_creation_input_tokens": 50}, 900, 50, 1000),
    ]  # fmt: skip
    for family, usage, _, _, _ in usages:
        request = tracing.request(family, [])
        span, _ = request.attempt("p", "up", "127.0.0.1", 443, [])
        span.end(200)
        request.end("m", 200, "p", "up", usage, session="s")
    tracing.close()
    spans = exporter.get_finished_spans()
    assert len(spans) == 6
    for span in spans:
        assert span.instrumentation_scope is not None
        assert span.instrumentation_scope.name == "gateway"
        assert span.instrumentation_scope.schema_url == SCHEMA_URL
    servers = [s for s in spans if s.kind == trace.SpanKind.SERVER]
    for span, (_, _, read, written, prompt) in zip(servers, usages, strict=True):
        attributes = span.attributes or {}
        assert attributes["gen_ai.usage.cache_read.input_tokens"] == read
        assert attributes["gen_ai.usage.cache_write.input_tokens"] == written
        # The conventions' input_tokens holds the cached ones, Anthropic's included.
        assert attributes["gen_ai.usage.input_tokens"] == prompt
