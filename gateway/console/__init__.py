"""The web console under /console: server-rendered pages for owners, officers and admins.

`console_router()` holds every page, the static files and the console's session middleware
and HTML error handlers; `template_config()` the Jinja2 environment (autoescaping on). The
app-wide route-policy guard decides every page as it does every API route
(governance/route_policy.csv has a line per console route), and the pages call the same
governance and audit services as the API. See docs/console.md.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar import Router
from litestar.contrib.jinja import JinjaTemplateEngine
from litestar.middleware.base import DefineMiddleware
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from gateway.console import admin, ledger, owner, signin
from gateway.console.errors import EXCEPTION_HANDLERS
from gateway.console.middleware import ConsoleSessionMiddleware
from gateway.console.owner import when

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = when
    return env


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(
        engine=JinjaTemplateEngine.from_environment(_environment()),
    )


def console_router() -> Router:
    return Router(
        path="/",
        route_handlers=[
            *signin.HANDLERS,
            *owner.HANDLERS,
            *ledger.HANDLERS,
            *admin.HANDLERS,
            create_static_files_router(
                path="/console/static", directories=[STATIC], name="console:static"
            ),
        ],
        middleware=[DefineMiddleware(ConsoleSessionMiddleware)],
        exception_handlers=EXCEPTION_HANDLERS,
        include_in_schema=False,
    )


__all__ = ["console_router", "template_config"]
