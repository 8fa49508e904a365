"""OpenTelemetry traces and metrics of one server process, and their Prometheus text.

Traces: a span per HTTP request (`TelemetryMiddleware`; W3C `traceparent` from the caller is
continued), and inside it the spans the request flow opens with `Telemetry.span`: `auth`,
`policy`, `engine`, `ledger`. Span ids are generated whether or not anything is exported, so
every ledger record can carry its request's trace id (`current_trace_id`).

Metrics follow the OpenTelemetry GenAI semantic conventions (server side):
`gen_ai.server.request.duration`, `gen_ai.server.time_to_first_token`,
`gen_ai.server.time_per_output_token` (histograms, seconds) and `gen_ai.client.token.usage`
(histogram of tokens, `gen_ai.token.type` input|output), each with `gen_ai.operation.name`
(text_completion | chat) and `gen_ai.request.model`; plus `flexgate.expert.tokens` and
`flexgate.expert.weight` (counters of the engine's per-expert usage, labelled `expert` and
`key_id`), `flexgate.requests` (by operation and status) and `flexgate.ratelimit.rejected`.
Inference spans carry `gen_ai.usage.input_tokens` / `gen_ai.usage.output_tokens`.

Export: OTLP over HTTP/protobuf to OTEL_EXPORTER_OTLP_ENDPOINT when it is set, nothing at all
otherwise. The same metrics are always readable at GET /metrics in Prometheus text (names with
dots turned into underscores and the unit appended, e.g.
`gen_ai_server_request_duration_seconds`). Providers are per Telemetry object, not global, so
several apps in one process (tests) never share or clash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from contracts.settings import Settings

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST
OPERATIONS = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat"}
# Bucket bounds the GenAI conventions recommend for durations (s) and token counts.
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
_propagator = TraceContextTextMapPropagator()


def current_trace_id() -> str | None:
    """The 32-hex trace id of the span running now (for the ledger record), or None."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def _views() -> list[View]:
    def hist(name: str, bounds: tuple[float, ...]) -> View:
        return View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(bounds))

    return [
        hist("gen_ai.server.request.duration", _DURATION_BUCKETS),
        hist("gen_ai.server.time_to_first_token", _TTFT_BUCKETS),
        hist("gen_ai.server.time_per_output_token", _TPOT_BUCKETS),
        hist("gen_ai.client.token.usage", tuple(float(b) for b in _TOKEN_BUCKETS)),
    ]


class Telemetry:
    """Tracer, meter and instruments of one app; `shutdown` flushes and stops exporters."""

    def __init__(
        self,
        settings: Settings,
        *,
        span_exporter: SpanExporter | None = None,
        metric_readers: list[MetricReader] | None = None,
        service_name: str = "flexgate",
    ) -> None:
        resource = Resource.create({"service.name": service_name})
        self.exporting = bool(settings.otel_endpoint) or span_exporter is not None
        self.tracer_provider = TracerProvider(resource=resource)
        self._span_processor: SpanProcessor | None = None
        readers: list[MetricReader] = list(metric_readers or [])
        if settings.otel_endpoint:
            base = settings.otel_endpoint.rstrip("/")
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            span_exporter = span_exporter or OTLPSpanExporter(endpoint=f"{base}/v1/traces")
            readers.append(
                PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{base}/v1/metrics"))
            )
        if span_exporter is not None:
            self._span_processor = BatchSpanProcessor(span_exporter)
            self.tracer_provider.add_span_processor(self._span_processor)
        self.registry = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=self.registry))
        self.meter_provider = MeterProvider(
            resource=resource, metric_readers=readers, views=_views()
        )
        self.tracer = self.tracer_provider.get_tracer("flexgate.gateway")
        m = self.meter_provider.get_meter("flexgate.gateway")
        self.request_duration = m.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="GenAI request duration"
        )
        self.ttft = m.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="Time to first token"
        )
        self.tpot = m.create_histogram(
            "gen_ai.server.time_per_output_token",
            unit="s",
            description="Time per output token after the first",
        )
        self.token_usage = m.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens per request"
        )
        self.expert_tokens = m.create_counter(
            "flexgate.expert.tokens",
            unit="{token}",
            description="(token, layer) selections of each expert",
        )
        self.expert_weight = m.create_counter(
            "flexgate.expert.weight", unit="1", description="Router probability mass per expert"
        )
        self.requests = m.create_counter(
            "flexgate.requests", unit="{request}", description="Inference requests by status"
        )
        self.rejected = m.create_counter(
            "flexgate.ratelimit.rejected",
            unit="{request}",
            description="Requests refused by a rate limit",
        )

    # -- traces ---------------------------------------------------------------------------

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A child span of the current one (`auth`, `policy`, `engine`, `ledger`, …)."""
        with self.tracer.start_as_current_span(
            name, attributes={k: v for k, v in attributes.items() if v is not None}
        ) as span:
            yield span

    # -- metrics --------------------------------------------------------------------------

    def record_inference(
        self,
        *,
        operation: str,
        model: str,
        key_id: str | None,
        input_tokens: int,
        output_tokens: int,
        duration_s: float,
        ttft_s: float | None,
        usage: Mapping[str, tuple[int, float]] | Mapping[str, Mapping[str, Any]],
        status: str = "ok",
        span: Span | None = None,
    ) -> None:
        """Record one finished inference request (also on the current span, if any)."""
        attrs = {"gen_ai.operation.name": operation, "gen_ai.request.model": model}
        self.request_duration.record(duration_s, attrs)
        self.token_usage.record(input_tokens, {**attrs, "gen_ai.token.type": "input"})
        self.token_usage.record(output_tokens, {**attrs, "gen_ai.token.type": "output"})
        if ttft_s is not None:
            self.ttft.record(ttft_s, attrs)
            if output_tokens > 1:
                self.tpot.record(max(0.0, duration_s - ttft_s) / (output_tokens - 1), attrs)
        self.requests.add(1, {**attrs, "status": status})
        key = key_id or "none"
        for expert, value in usage.items():
            if isinstance(value, Mapping):
                tokens, weight = int(value.get("tokens", 0)), float(value.get("weight", 0.0))
            else:
                tokens, weight = int(value[0]), float(value[1])
            labels = {"expert": expert, "key_id": key}
            self.expert_tokens.add(tokens, labels)
            self.expert_weight.add(weight, labels)
        target = span if span is not None else trace.get_current_span()
        if target.is_recording():
            target.set_attributes(
                {
                    **attrs,
                    "gen_ai.usage.input_tokens": input_tokens,
                    "gen_ai.usage.output_tokens": output_tokens,
                }
            )

    def record_rejection(self, limit: str, key_id: str | None) -> None:
        self.rejected.add(1, {"limit": limit, "key_id": key_id or "none"})

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        """Flush what is pending to the OTLP endpoint (if any) and stop the exporters."""
        try:
            self.tracer_provider.shutdown()
            self.meter_provider.shutdown()
        except Exception:  # an unreachable collector must not fail a server's shutdown
            log.warning("telemetry shutdown failed", exc_info=True)


class TelemetryMiddleware:
    """ASGI middleware: one server span per HTTP request, continuing the caller's trace.

    Named `METHOD /route/{template}` (low cardinality), with the HTTP semantic-convention
    attributes and the response status; 5xx marks the span as an error. The Telemetry object
    is the app's (`app.state.telemetry`, set by the runtime lifespan), looked up per request.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        telemetry = scope["app"].state.get("telemetry") if "app" in scope else None
        if scope["type"] != "http" or telemetry is None:
            await self.app(scope, receive, send)
            return
        carrier = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in scope.get("headers", ())
            if k in (b"traceparent", b"tracestate")
        }
        parent = _propagator.extract(carrier) if carrier else None
        method = scope.get("method", "GET")
        route = scope.get("path_template") or scope.get("path", "")
        status: dict[str, int] = {}

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        started = time.perf_counter()
        with telemetry.tracer.start_as_current_span(
            f"{method} {route}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "http.route": route,
                "url.path": scope.get("path", ""),
            },
        ) as span:
            try:
                await self.app(scope, receive, send_wrapper)
            finally:
                code = status.get("code", 500)
                span.set_attribute("http.response.status_code", code)
                span.set_attribute("flexgate.duration_ms", (time.perf_counter() - started) * 1e3)
                if code >= 500:
                    span.set_status(Status(StatusCode.ERROR))


__all__ = [
    "OPERATIONS",
    "PROMETHEUS_CONTENT_TYPE",
    "Telemetry",
    "TelemetryMiddleware",
    "current_trace_id",
]
