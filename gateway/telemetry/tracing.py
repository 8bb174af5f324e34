"""OpenTelemetry traces (SPEC §12), loaded only when OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set and the `gateway[otel]` extra is installed.

One SERVER span per request and one CLIENT span per upstream attempt, with the GenAI
semantic conventions' attributes. A client's W3C `traceparent` is continued: the
request's span is its child, and each attempt sends upstream a `traceparent` naming the
attempt's span (the client's `tracestate` goes along as it came). The SDK's standard
exporter (OTLP/HTTP, protobuf) and its variables apply; a BatchSpanProcessor exports
from its own thread, off the request path.

Without the variable nothing here imports OpenTelemetry: `Tracing.from_env` returns
None and the request path pays one `is None` test.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from gateway.errors import GatewayError
from gateway.families import Family
from gateway.types import Headers
from gateway.wire.usage import prompt_kinds, usage_parts

log = logging.getLogger("gateway")

# The conventions the spans follow, named on the tracer (each span's instrumentation
# scope carries it): the OpenTelemetry GenAI semantic conventions v0.1.0 (SPEC §14), the
# first release of open-telemetry/semantic-conventions-genai, which publishes its schemas
# as https://opentelemetry.io/schemas/gen-ai/<version>. Not a core semconv URL (1.x):
# GenAI left the core after v1.41.0, whose registry has the cache-write count as
# gen_ai.usage.cache_creation.input_tokens; the GenAI repository renamed it
# gen_ai.usage.cache_write.input_tokens (its #440) before v0.1.0, the name used here.
SCHEMA_URL = "https://opentelemetry.io/schemas/gen-ai/0.1.0"

# gen_ai.operation.name by API family (the GenAI conventions' values where one fits).
OPERATIONS = {
    "chat": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "messages": "chat",
}


def _operation(family: Family) -> str:
    return OPERATIONS.get(family.name, family.name)


class Tracing:
    def __init__(self, provider: Any, api: Any, propagator: Any) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("gateway", schema_url=SCHEMA_URL)
        self.api = api  # opentelemetry.trace, imported by from_env
        self.propagator = propagator  # W3C trace context, made once

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Tracing | None:
        env = os.environ if env is None else env
        if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):  # fmt: skip
            return None
        if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return None
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError:
            log.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
                "no traces (pip install 'gateway[otel]')"
            )
            return None
        attributes = {} if env.get("OTEL_SERVICE_NAME") else {"service.name": "gateway"}
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider, trace, TraceContextTextMapPropagator())

    def request(self, family: Family, client_headers: Headers) -> RequestTrace:
        """The request's span, a child of the client's traceparent when it sent one."""
        parent = None
        for name, value in client_headers:
            if name == b"traceparent":
                parent = self._parent(value)
                break
        operation = _operation(family)
        span = self.tracer.start_span(
            operation,
            context=parent,
            kind=self.api.SpanKind.SERVER,
            attributes={"gen_ai.operation.name": operation},
        )
        return RequestTrace(self, span, operation)

    def _parent(self, value: bytes) -> Any:
        context = self.propagator.extract({"traceparent": value.decode("latin-1")})
        span = self.api.get_current_span(context)
        return context if span.get_span_context().is_valid else None

    def close(self) -> None:
        """On drain: export what is left (bounded by the exporter's own timeout)."""
        self.provider.shutdown()


class RequestTrace:
    """One request's span and its attempts' spans. Written by the endpoint (the request
    and its end) and the attempt (its own span)."""

    def __init__(self, tracing: Tracing, span: Any, operation: str) -> None:
        self.tracing = tracing
        self.span = span
        self.operation = operation

    def attempt(
        self, provider: str, upstream_model: str, address: str, port: int, headers: Headers
    ) -> tuple[AttemptSpan, Headers]:
        """An attempt's CLIENT span, and the client's headers with a traceparent naming
        it (replacing the client's own)."""
        api = self.tracing.api
        span = self.tracing.tracer.start_span(
            f"{self.operation} {upstream_model}",
            context=api.set_span_in_context(self.span),
            kind=api.SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": self.operation,
                "gen_ai.request.model": upstream_model,
                "gen_ai.provider.name": provider,
                "server.address": address,
                "server.port": port,
            },
        )
        ctx = span.get_span_context()
        parent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        out = [(n, v) for n, v in headers if n != b"traceparent"]
        out.append((b"traceparent", parent.encode()))
        return AttemptSpan(span, api), out

    def end(
        self,
        slug: str | None,
        status: int,
        provider: str | None = None,
        upstream_model: str | None = None,
        usage: dict[str, Any] | None = None,
        error: GatewayError | None = None,
        session: str | None = None,
    ) -> None:
        span = self.span
        if session:
            span.set_attribute("gen_ai.conversation.id", session)
        if slug:
            span.update_name(f"{self.operation} {slug}")
            span.set_attribute("gen_ai.request.model", slug)
        if provider:
            span.set_attribute("gen_ai.provider.name", provider)
        if upstream_model:
            span.set_attribute("gen_ai.response.model", upstream_model)
        if usage:
            prompt, _, completion = usage_parts(usage)
            span.set_attribute("gen_ai.usage.input_tokens", prompt)
            span.set_attribute("gen_ai.usage.output_tokens", completion)
            read, written, _ = prompt_kinds(usage)
            span.set_attribute("gen_ai.usage.cache_read.input_tokens", read)
            span.set_attribute("gen_ai.usage.cache_write.input_tokens", written)
        if status:
            span.set_attribute("http.response.status_code", status)
        failed(span, self.tracing.api, status, error)
        span.end()


def failed(span: Any, api: Any, status: int, error: GatewayError | None = None) -> None:
    """error.type and an ERROR status for a failed request or attempt: the gateway's
    error code, or the HTTP status an upstream answered with."""
    kind = error.code if error is not None else (str(status) if status >= 400 else None)
    if kind is not None:
        span.set_attribute("error.type", kind)
        span.set_status(api.Status(api.StatusCode.ERROR))


class AttemptSpan:
    """One attempt's span, ended once by the attempt's Opened.close: when the attempt
    fails or is cancelled, else when the relay has served or discarded its answer."""

    def __init__(self, span: Any, api: Any) -> None:
        self.span = span
        self.api = api

    def end(self, status: int, error: GatewayError | None = None) -> None:
        if status:
            self.span.set_attribute("http.response.status_code", status)
        failed(self.span, self.api, status, error)
        self.span.end()
