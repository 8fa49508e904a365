"""Every controller of the API; add yours to CONTROLLERS (one line)."""

from __future__ import annotations

from litestar import Controller

from gateway.controllers.admin import AdminController
from gateway.controllers.audit import AuditController
from gateway.controllers.experts import ExpertsController
from gateway.controllers.health import HealthController
from gateway.controllers.metrics import MetricsController
from gateway.controllers.openai import OpenAIController
from gateway.controllers.tokenize import TokenizeController

CONTROLLERS: list[type[Controller]] = [
    HealthController,
    OpenAIController,
    TokenizeController,
    ExpertsController,
    AuditController,
    AdminController,
    MetricsController,
]
