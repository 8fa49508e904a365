"""Bearer authentication: an API key or an OIDC JWT becomes `request.user` (an Identity).

Thin on purpose: governance decides (`governance.auth.authenticate`). This middleware gets
the policy version from a read that started after the request arrived (gateway.versions:
every governance change, a key's revocation included, moves it, so a revocation committed by
any process applies to the next request), lets governance authenticate against the worker's
KeyCache at that version (a key already known at it costs no database read), and hands over
the identity; `request.auth` is the key id (None for a JWT). The version goes to
`scope["state"]["policy_version"]`, where the policy snapshot provider finds it, so a
request with an unchanged policy reads the database once before the engine runs. Excluded
paths need no credential: the health probes, the OpenAPI schema, and the console (which
authenticates by its own session cookie and sets the same `scope["user"]` through the same
governance call).
"""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.middleware.base import DefineMiddleware

from audit.db import translate_errors
from governance.auth import authenticate, bearer_token

POLICY_VERSION = "policy_version"
"""Key of `scope["state"]`: the policy version read when the request was authenticated."""

EXCLUDED_PATHS = ["^/healthz$", "^/readyz$", "^/schema", "^/console"]


class BearerAuthMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:  # type: ignore[type-arg]
        state = connection.app.state
        header = connection.headers.get("authorization")
        with state.telemetry.span("auth"):
            bearer_token(header)  # no credential at all: refused before any database work
            async with translate_errors():
                version = await state.versions.current()
            async with translate_errors(), state.sessionmaker() as session:
                identity = await authenticate(
                    session, header, jwt=state.jwt, keys=state.key_cache, version=version
                )
        connection.scope.setdefault("state", {})[POLICY_VERSION] = version
        return AuthenticationResult(user=identity, auth=identity.key_id)


def auth_middleware() -> DefineMiddleware:
    return DefineMiddleware(BearerAuthMiddleware, exclude=EXCLUDED_PATHS)
