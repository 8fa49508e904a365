"""The second lifespan of a worker: rate limiter and telemetry (after gateway.lifespan).

Litestar enters `lifespan=[lifespan, runtime_lifespan]` in order and leaves in reverse, so the
limiter and telemetry exist before the first request and stop before the ledger writer and
database do. Sets `app.state.limiter` (gateway.limits.Limiter) and `app.state.telemetry`
(gateway.telemetry.Telemetry); the request span middleware reads the latter per request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar

from contracts.settings import Settings
from gateway.lifespan import drain_streams
from gateway.limits import Limiter
from gateway.telemetry import Telemetry

log = logging.getLogger(__name__)


@asynccontextmanager
async def runtime_lifespan(app: Litestar) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    telemetry = app.state.get("telemetry") or Telemetry(settings)
    app.state.telemetry = telemetry
    limiter = Limiter(settings)
    try:
        reaped = await limiter.reap_dead_leases()
        if reaped:
            log.warning("dropped %d rate-limit lease(s) of dead workers on this host", reaped)
        app.state.limiter = limiter
        yield
    finally:
        # Streams abandoned at shut-down release their rate leases as they end: let them end
        # before the limiter closes (their records go to the ledger, which closes later).
        await drain_streams(app.state)
        await limiter.close()
        telemetry.shutdown()
