"""Spans: exported ones carry the request flow (`auth`, `policy`, `engine`, `ledger` inside the
request span, with the GenAI usage); without an exporter nothing is recorded, yet every record
still gets its request's trace id."""

from __future__ import annotations

from typing import Any

from gw_helpers import completion, records
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.telemetry import Telemetry


async def test_exported_spans_follow_the_request_flow(gw_world: Any, gw_engine: Any) -> None:
    from gateway.app import create_app

    exporter = InMemorySpanExporter()
    app = create_app(gw_world.settings, engine=gw_engine)
    app.state.telemetry = Telemetry(gw_world.settings, span_exporter=exporter)
    async with AsyncTestClient(app=app) as client:
        r = await client.post(
            "/v1/completions", json=completion(max_tokens=2), headers=gw_world.headers("app-1")
        )
        assert r.status_code == 200, r.text
    spans = exporter.get_finished_spans()  # flushed when the lifespan ended
    by_name = {s.name: s for s in spans}
    request = by_name["POST /v1/completions"]
    for child in ("auth", "policy", "engine", "ledger"):
        assert by_name[child].parent is not None, child
        assert by_name[child].context.trace_id == request.context.trace_id, child
    attrs = dict(request.attributes or {})
    assert attrs["http.response.status_code"] == 200
    assert attrs["gen_ai.usage.output_tokens"] == 2
    (rec,) = [
        e
        for e in await records(gw_world.sm, "inference")
        if e.seq == int(r.headers["x-flexgate-audit-seq"])
    ]
    assert rec.payload["trace_id"] == format(request.context.trace_id, "032x")


async def test_without_an_exporter_nothing_is_recorded_but_the_trace_id_is_kept(
    gw_client: Any, gw_world: Any, gw_app: Any
) -> None:
    telemetry: Telemetry = gw_app.state.telemetry
    assert telemetry.tracing is False
    with telemetry.span("auth") as span:
        assert not span.is_recording()
    assert telemetry.start_span("engine") is None
    r = await gw_client.post(
        "/v1/completions", json=completion(max_tokens=2), headers=gw_world.headers("app-1")
    )
    assert r.status_code == 200
    (rec,) = [
        e
        for e in await records(gw_world.sm, "inference")
        if e.seq == int(r.headers["x-flexgate-audit-seq"])
    ]
    trace_id = rec.payload["trace_id"]
    assert isinstance(trace_id, str) and len(trace_id) == 32 and int(trace_id, 16) != 0
