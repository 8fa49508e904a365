"""The app factory: `create_app(settings) -> Litestar`.

Everything a worker serves is assembled here and nowhere else: controllers, the bearer
middleware, the one route-policy guard, exception handlers (OpenAI error shape), app-wide
dependency providers, the lifespan and the OpenAPI schema at /schema.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.handlers import HTTPRouteHandler
from litestar.logging import LoggingConfig
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme

from contracts.settings import Settings
from contracts.settings import settings as current_settings
from gateway.auth import auth_middleware
from gateway.console import console_router
from gateway.console import template_config as console_template_config
from gateway.controllers import CONTROLLERS
from gateway.deps import DEPENDENCIES
from gateway.errors import EXCEPTION_HANDLERS
from gateway.guards import route_policy
from gateway.lifespan import lifespan
from gateway.request_ids import request_id_middleware
from gateway.runtime import runtime_lifespan
from gateway.schemas.openai import ErrorResponse
from gateway.telemetry import TelemetryMiddleware


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="FlexGate",
        version="0.1.0",
        description=(
            "OpenAI-compatible inference under data-owner control: every request runs with "
            "exactly the experts its caller is licensed to use, and is recorded in a "
            "tamper-evident ledger."
        ),
        path="/schema",
        components=Components(
            security_schemes={
                "bearer": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="an API key (`fg_…`) or, when OIDC is configured, a JWT",
                )
            }
        ),
        security=[{"bearer": []}],
        render_plugins=[JsonRenderPlugin()],
    )


QUIET_LOGGERS = ("alembic", "casbin")
"""Libraries whose INFO lines at start-up (Alembic's plugins and migration context, Casbin's
model dump) say nothing to an operator; their warnings still show."""


def logging_config() -> LoggingConfig:
    """Litestar configures the root logger, INFO by default. Under `flexgate serve` it follows
    `--log-level` instead: uvicorn has set its own loggers' level in this worker before it
    calls the factory, so `--log-level warning` silences FlexGate's INFO lines too (and
    `debug` lets the quiet libraries speak)."""
    level = logging.getLogger("uvicorn.error").getEffectiveLevel()
    quiet = logging.getLevelName(level if level <= logging.DEBUG else max(logging.WARNING, level))
    return LoggingConfig(
        root={"level": logging.getLevelName(level), "handlers": ["queue_listener"]},
        loggers={name: {"level": quiet} for name in QUIET_LOGGERS},
    )


def create_app(settings: Settings | None = None, *, engine: Any = None) -> Litestar:
    """A FlexGate worker. `engine`: an already-loaded engine.Engine (tests), else the
    lifespan loads `settings.model_dir` off the event loop."""
    settings = settings or current_settings()
    state = State({"settings": settings, "injected_engine": engine, "ready": False})
    app = Litestar(
        route_handlers=[*CONTROLLERS, console_router()],
        template_config=console_template_config(),
        middleware=[TelemetryMiddleware, request_id_middleware, auth_middleware()],
        guards=[route_policy],
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan, runtime_lifespan],
        state=state,
        openapi_config=openapi_config(),
        request_max_body_size=settings.max_body_bytes,
        logging_config=logging_config(),
        debug=False,
    )
    document_errors(app)
    return app


def document_errors(app: Litestar) -> None:
    """Every route may answer errors in the OpenAI shape (the guard, the bearer middleware,
    the body limit and the database are app-wide): say so in the schema of each operation,
    unless its handler documents that status itself."""
    spec = ResponseSpec(ErrorResponse, description="error (OpenAI shape)")
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            if not isinstance(handler, HTTPRouteHandler) or not handler.include_in_schema:
                continue
            anonymous = handler.resolve_security() == [{}]
            codes = [400, 404, 405, 413, 503] + ([] if anonymous else [401, 403, 429])
            own = dict(handler.responses or {})
            handler.responses = {**{c: spec for c in codes}, **own}
