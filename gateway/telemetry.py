"""OpenTelemetry traces and metrics of one server, and their Prometheus text.

Traces: a span per HTTP request (`TelemetryMiddleware`; W3C `traceparent` from the caller is
continued), and inside it the spans the request flow opens with `Telemetry.span`: `auth`,
`policy`, `engine`, `ledger`. Span ids are generated whether or not anything is exported, so
every ledger record can carry its request's trace id (`current_trace_id`); spans are only
recorded (attributes, timings) when something exports them.

Metrics follow the OpenTelemetry GenAI semantic conventions (server side):
`gen_ai.server.request.duration`, `gen_ai.server.time_to_first_token`,
`gen_ai.server.time_per_output_token` (histograms, seconds) and `gen_ai.client.token.usage`
(histogram of tokens, `gen_ai.token.type` input|output), each with `gen_ai.operation.name`
(text_completion | chat) and `gen_ai.request.model`; plus `flexgate.expert.tokens` and
`flexgate.expert.weight` (counters of the engine's per-expert usage, labelled `expert` and
`key_id`), `flexgate.requests` (by operation and status) and `flexgate.ratelimit.rejected`.
Inference spans carry `gen_ai.usage.input_tokens` / `gen_ai.usage.output_tokens`.

Each metric is declared once (`METRICS`) and recorded into two places:
- Prometheus (prometheus_client), always: GET /metrics, names with dots as underscores and
  the unit appended (`gen_ai_server_request_duration_seconds`, `flexgate_expert_tokens_total`).
  Under `flexgate serve` every worker writes its values to the server's metrics folder
  (`Settings.metrics_dir`, prometheus_client's multiprocess mode) and /metrics sums the
  folder, so any worker answers for the whole server. Without it (an app in a test) each
  Telemetry has a registry of its own, so several apps in one process never clash.
- OpenTelemetry, only when OTEL_EXPORTER_OTLP_ENDPOINT is set: OTLP over HTTP/protobuf,
  pushed by every worker (with its own `service.instance.id`). Nothing is exported otherwise.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from contracts.settings import Settings

log = logging.getLogger(__name__)

PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_LATEST
OPERATIONS = {"/v1/completions": "text_completion", "/v1/chat/completions": "chat"}
# Bucket bounds the GenAI conventions recommend for durations (s) and token counts.
_DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48)
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)
_GENAI = ("gen_ai.operation.name", "gen_ai.request.model")
_propagator = TraceContextTextMapPropagator()


@dataclass(frozen=True, slots=True)
class Metric:
    """One metric, as OpenTelemetry names it; the Prometheus name and labels follow."""

    name: str
    unit: str
    description: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] | None = None
    """Histogram bounds; None: a counter."""

    @property
    def prometheus_name(self) -> str:
        base = self.name.replace(".", "_")
        return f"{base}_seconds" if self.unit == "s" else base


METRICS: dict[str, Metric] = {
    "request_duration": Metric(
        "gen_ai.server.request.duration", "s", "GenAI request duration", _GENAI, _DURATION_BUCKETS
    ),
    "ttft": Metric(
        "gen_ai.server.time_to_first_token", "s", "Time to first token", _GENAI, _TTFT_BUCKETS
    ),
    "tpot": Metric(
        "gen_ai.server.time_per_output_token",
        "s",
        "Time per output token after the first",
        _GENAI,
        _TPOT_BUCKETS,
    ),
    "token_usage": Metric(
        "gen_ai.client.token.usage",
        "{token}",
        "Tokens per request",
        (*_GENAI, "gen_ai.token.type"),
        tuple(float(b) for b in _TOKEN_BUCKETS),
    ),
    "expert_tokens": Metric(
        "flexgate.expert.tokens",
        "{token}",
        "(token, layer) selections of each expert",
        ("expert", "key_id"),
    ),
    "expert_weight": Metric(
        "flexgate.expert.weight", "1", "Router probability mass per expert", ("expert", "key_id")
    ),
    "requests": Metric(
        "flexgate.requests", "{request}", "Inference requests by status", (*_GENAI, "status")
    ),
    "rejected": Metric(
        "flexgate.ratelimit.rejected",
        "{request}",
        "Requests refused by a rate limit",
        ("limit", "key_id"),
    ),
}


def current_trace_id() -> str | None:
    """The 32-hex trace id of the span running now (for the ledger record), or None."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class _Instrument:
    """One metric in Prometheus and, when exporting, in OpenTelemetry."""

    def __init__(self, spec: Metric, meter: Any, registry: CollectorRegistry | None) -> None:
        self.spec = spec
        labels = [name.replace(".", "_") for name in spec.labels]
        self.prometheus: Histogram | Counter
        if spec.buckets is not None:
            self.prometheus = Histogram(
                spec.prometheus_name,
                spec.description,
                labels,
                buckets=spec.buckets,
                registry=registry,
            )
        else:
            self.prometheus = Counter(
                spec.prometheus_name, spec.description, labels, registry=registry
            )
        self.otel: Any = None
        if meter is not None:
            make = meter.create_histogram if spec.buckets is not None else meter.create_counter
            self.otel = make(spec.name, unit=spec.unit, description=spec.description)

    def record(self, value: float, attributes: Mapping[str, str]) -> None:
        child = self.prometheus.labels(*(attributes[name] for name in self.spec.labels))
        if isinstance(child, Histogram):
            child.observe(value)
        else:
            child.inc(value)
        if self.otel is not None:
            (self.otel.record if self.spec.buckets is not None else self.otel.add)(
                value, dict(attributes)
            )


def _views() -> list[View]:
    return [
        View(
            instrument_name=m.name,
            aggregation=ExplicitBucketHistogramAggregation(m.buckets),
        )
        for m in METRICS.values()
        if m.buckets is not None
    ]


def _multiprocess(settings: Settings) -> bool:
    """Is this process writing its metrics to the server's folder?"""
    if settings.metrics_dir is None:
        return False
    if not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client picks its storage when imported; `flexgate serve` sets
        # PROMETHEUS_MULTIPROC_DIR before any worker imports it.
        raise RuntimeError(
            "PROMETHEUS_MULTIPROC_DIR must be set before prometheus_client is imported"
        )
    return True


class Telemetry:
    """Tracer and metrics of one app; `shutdown` flushes and stops exporters."""

    def __init__(
        self,
        settings: Settings,
        *,
        span_exporter: SpanExporter | None = None,
        metric_readers: list[MetricReader] | None = None,
        service_name: str = "flexgate",
    ) -> None:
        resource = Resource.create(
            {"service.name": service_name, "service.instance.id": uuid.uuid4().hex}
        )
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
        self.exporting = span_exporter is not None or bool(readers)
        # Not exporting: spans still get ids (the ledger's trace_id) but record nothing;
        # exporting: the SDK's default sampler (OTEL_TRACES_SAMPLER, else parent-based on).
        self.tracer_provider = TracerProvider(
            resource=resource, sampler=None if span_exporter is not None else ALWAYS_OFF
        )
        self._span_processor: SpanProcessor | None = None
        self.tracing = span_exporter is not None
        """Are spans exported (and so worth recording)?"""
        if span_exporter is not None:
            self._span_processor = BatchSpanProcessor(span_exporter)
            self.tracer_provider.add_span_processor(self._span_processor)
        self.meter_provider: MeterProvider | None = (
            MeterProvider(resource=resource, metric_readers=readers, views=_views())
            if readers
            else None
        )
        meter = (
            None
            if self.meter_provider is None
            else self.meter_provider.get_meter("flexgate.gateway")
        )
        self.metrics_dir = settings.metrics_dir if _multiprocess(settings) else None
        own = None if self.metrics_dir is not None else CollectorRegistry(auto_describe=True)
        self.registry = CollectorRegistry() if own is None else own
        if self.metrics_dir is not None:
            MultiProcessCollector(self.registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
        self.instruments = {k: _Instrument(m, meter, own) for k, m in METRICS.items()}
        self.tracer = self.tracer_provider.get_tracer("flexgate.gateway")

    # -- traces ---------------------------------------------------------------------------

    @contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A child span of the current one (`auth`, `policy`, `engine`, `ledger`, …); when no
        span is exported, the current span itself (a child would record nothing, and the
        trace id, all a record needs, is the request span's)."""
        if not self.tracing:
            yield trace.get_current_span()
            return
        with self.tracer.start_as_current_span(
            name, attributes={k: v for k, v in attributes.items() if v is not None}
        ) as span:
            yield span

    def start_span(self, name: str, **attributes: Any) -> Span | None:
        """A child span to end by hand (the engine's, which outlives its handler); None when
        no span is exported."""
        return self.tracer.start_span(name, attributes=attributes) if self.tracing else None

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
        m = self.instruments
        attrs = {"gen_ai.operation.name": operation, "gen_ai.request.model": model}
        m["request_duration"].record(duration_s, attrs)
        m["token_usage"].record(input_tokens, {**attrs, "gen_ai.token.type": "input"})
        m["token_usage"].record(output_tokens, {**attrs, "gen_ai.token.type": "output"})
        if ttft_s is not None:
            m["ttft"].record(ttft_s, attrs)
            if output_tokens > 1:
                m["tpot"].record(max(0.0, duration_s - ttft_s) / (output_tokens - 1), attrs)
        m["requests"].record(1, {**attrs, "status": status})
        key = key_id or "none"
        for expert, value in usage.items():
            if isinstance(value, Mapping):
                tokens, weight = int(value.get("tokens", 0)), float(value.get("weight", 0.0))
            else:
                tokens, weight = int(value[0]), float(value[1])
            if not tokens:  # an excluded or unused expert: nothing to add
                continue
            labels = {"expert": expert, "key_id": key}
            m["expert_tokens"].record(tokens, labels)
            m["expert_weight"].record(weight, labels)
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
        self.instruments["rejected"].record(1, {"limit": limit, "key_id": key_id or "none"})

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def shutdown(self) -> None:
        """Flush what is pending to the OTLP endpoint (if any) and stop the exporters."""
        try:
            self.tracer_provider.shutdown()
            if self.meter_provider is not None:
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
