"""Every controller of the API; add yours to CONTROLLERS (one line)."""

from __future__ import annotations

from litestar import Controller

from gateway.controllers.admin import AdminController
from gateway.controllers.audit import AuditController
from gateway.controllers.experts import ExpertsController
from gateway.controllers.health import HealthController
from gateway.controllers.metrics import MetricsController

CONTROLLERS: list[type[Controller]] = [
    HealthController,
    ExpertsController,
    AuditController,
    AdminController,
    MetricsController,
]
