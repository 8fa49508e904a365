"""Every controller of the API; add yours to CONTROLLERS (one line)."""

from __future__ import annotations

from litestar import Controller

from gateway.controllers.health import HealthController
from gateway.controllers.openai import OpenAIController
from gateway.controllers.tokenize import TokenizeController

CONTROLLERS: list[type[Controller]] = [HealthController, OpenAIController, TokenizeController]
