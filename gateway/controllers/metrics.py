"""GET /metrics: the server's metrics in Prometheus text format (admin role).

A Prometheus scraper authenticates like any client, with the bearer key of an admin principal
(`authorization: {credentials: <key>}` in its scrape config; docs/gateway.md). Under
`flexgate serve --workers N` whichever worker answers reports the sum over all of them
(gateway.telemetry: the server's metrics folder).
"""

from __future__ import annotations

from litestar import Controller, Request, get
from litestar.response import Response

from gateway.schemas.governance import error_responses
from gateway.telemetry import PROMETHEUS_CONTENT_TYPE, Telemetry

ERRORS = error_responses(401, 403)


class MetricsController(Controller):
    path = "/metrics"
    tags = ("metrics",)

    @get(
        "/",
        summary="Prometheus text: GenAI and per-expert metrics",
        media_type="text/plain",
        responses=ERRORS,
    )
    async def metrics(self, request: Request) -> Response[bytes]:  # type: ignore[type-arg]
        telemetry: Telemetry = request.app.state.telemetry
        return Response(telemetry.prometheus_text(), media_type=PROMETHEUS_CONTENT_TYPE)
