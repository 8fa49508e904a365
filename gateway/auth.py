"""Bearer authentication: an API key or an OIDC JWT becomes `request.user` (an Identity).

Thin on purpose: governance decides (`governance.auth.authenticate`, which re-reads the key
on every request, so a revocation committed by any process applies to the next request).
This middleware only opens a short session for it and hands over the identity;
`request.auth` is the key id (None for a JWT). Excluded paths need no credential: the health
probes, the OpenAPI schema, and the console (which authenticates by its own session cookie
and sets the same `scope["user"]` through the same governance call).
"""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.base import DefineMiddleware

from audit.db import translate_errors
from governance.auth import authenticate

EXCLUDED_PATHS = ["^/healthz$", "^/readyz$", "^/schema", "^/console"]


class BearerAuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:  # type: ignore[type-arg]
        state = connection.app.state
        header = connection.headers.get("authorization")
        with state.telemetry.span("auth"):
            async with translate_errors(), state.sessionmaker() as session:
                identity = await authenticate(session, header, jwt=state.jwt)
        return AuthenticationResult(user=identity, auth=identity.key_id)


def auth_middleware() -> DefineMiddleware:
    return DefineMiddleware(BearerAuthMiddleware, exclude=EXCLUDED_PATHS)
