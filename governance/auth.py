"""Authentication of a request's bearer credential: an API key, or a JWT when OIDC is on.

Fails closed: anything that is not a well-formed, known, unexpired, unrevoked key or a valid
token raises AuthenticationFailed (the gateway answers 401).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from governance.errors import AuthenticationFailed
from governance.identity import Identity
from governance.keys import KeyCache, authenticate_key, looks_like_key
from governance.oidc import JwtVerifier


def bearer_token(authorization: str | None) -> str:
    """The credential of an `Authorization: Bearer …` header value."""
    if not authorization:
        raise AuthenticationFailed("missing Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("expected `Authorization: Bearer <key or JWT>`")
    return token


async def authenticate(
    session: AsyncSession,
    authorization: str | None,
    *,
    jwt: JwtVerifier | None = None,
    now: datetime | None = None,
    keys: KeyCache | None = None,
    version: int | None = None,
) -> Identity:
    """Who sent this `Authorization` header value (see module docstring).

    With `keys` (and `version`, the policy version just read in `session`), a key already
    authenticated at that version is answered from the process's KeyCache.
    """
    token = bearer_token(authorization)
    if looks_like_key(token):
        if keys is not None and version is not None:
            return await keys.authenticate_key(session, token, version=version, now=now)
        return await authenticate_key(session, token, now=now)
    if jwt is not None and token.count(".") == 2:
        return await jwt.verify(token)
    raise AuthenticationFailed("unrecognised bearer credential")
