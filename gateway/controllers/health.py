"""Liveness and readiness probes (no credential; the route policy lets anyone call them)."""

from __future__ import annotations

from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from gateway.health import readiness
from gateway.schemas.health import Health, Readiness


class HealthController(Controller):
    tags = ["health"]  # noqa: RUF012 (Litestar declares it a list)
    security = [{}]  # noqa: RUF012 (no credential needed; OpenAPI's "anonymous")

    @get("/healthz", summary="The process is alive")
    async def healthz(self) -> Health:
        return Health(status="ok")

    @get(
        "/readyz",
        summary="Model loaded, database reachable and ledger writer healthy (else 503)",
        responses={503: ResponseSpec(Readiness, description="not ready: see checks")},
    )
    async def readyz(self, state: State) -> Response[Readiness]:
        checks = await readiness(state)
        ok = all(v == "ok" for v in checks.values())
        return Response(
            Readiness(status="ready" if ok else "not ready", checks=checks),
            status_code=200 if ok else 503,
        )
