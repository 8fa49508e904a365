"""The one guard: governance's route policy decides every route.

Route rules are the static `p2` lines of governance/route_policy.csv (no database state), so
the guard asks an in-memory snapshot of them built at start-up (`app.state.routes`) and costs
a memoised dict lookup. It asks with the route's path template in Casbin's `:name` syntax, so
`/v1/experts/{id:str}/licenses` is checked as `/v1/experts/:id/licenses`. Which expert an
owner may manage is the services' business, not the guard's.
"""

from __future__ import annotations

import re

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from gateway.errors import GENERIC_AUTH_MESSAGE, PERMISSION, ApiError
from governance.identity import Identity
from governance.store import PolicySnapshot

_PARAM = re.compile(r"\{(\w+)(?::[^}]*)?\}")


def casbin_path(template: str) -> str:
    """Litestar's `/a/{id:str}/b` as keyMatch2's `/a/:id/b`."""
    return _PARAM.sub(lambda m: ":" + m.group(1), template)


def route_snapshot() -> PolicySnapshot:
    """A policy snapshot holding only the route rules (what the guard needs)."""
    from governance import policy

    return PolicySnapshot(0, [], policy.enforcer_from_rules(routes=policy.route_rules()))


async def route_policy(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:  # type: ignore[type-arg]
    user = connection.scope.get("user")
    roles = user.roles if isinstance(user, Identity) else frozenset()
    template = connection.scope.get("path_template") or connection.scope["path"]
    method = str(connection.scope.get("method", "GET"))
    routes: PolicySnapshot = connection.app.state.routes
    if routes.authorize(roles, method, casbin_path(template)):
        return
    if user is None:
        raise ApiError(
            401,
            GENERIC_AUTH_MESSAGE,
            type="authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    raise ApiError(
        403,
        f"{method} {casbin_path(template)} is not allowed for roles {sorted(roles) or ['none']}",
        type=PERMISSION,
        code="permission_denied",
    )
