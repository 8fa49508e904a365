"""Optional JWT bearer tokens from an OIDC identity provider, verified with PyJWT.

A token is accepted only if its signature verifies against the provider's JWKS (read from a
file, or fetched from a URL and cached by `jwt.PyJWKClient`), it is unexpired, and its `iss`
and `aud` are the configured ones. One claim names the principal, another its roles; roles
outside the four FlexGate roles are ignored. Symmetric algorithms are not accepted: a JWKS
holds public keys.

Configuration (read once, through `contracts.settings`; all optional; JWT is off unless
issuer, audience and JWKS are set): FLEXGATE_OIDC_ISSUER, FLEXGATE_OIDC_AUDIENCE,
FLEXGATE_OIDC_JWKS (a file path or an http(s) URL), FLEXGATE_OIDC_PRINCIPAL_CLAIM (default
`sub`), FLEXGATE_OIDC_ROLES_CLAIM (default `roles`; a dotted path such as `realm_access.roles`
reaches into nested claims).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from contracts.settings import Settings, settings
from governance.errors import AuthenticationFailed, InvalidId
from governance.identity import Identity
from governance.names import ROLES, check_id

DEFAULT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")


@dataclass(frozen=True, slots=True)
class OidcSettings:
    issuer: str
    audience: str
    jwks: str  # a file path or an http(s) URL
    principal_claim: str = "sub"
    roles_claim: str = "roles"
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_s: float = 30.0
    jwks_cache_s: int = 300

    @classmethod
    def from_settings(cls, config: Settings | None = None) -> OidcSettings | None:
        """The OIDC part of the process settings (`contracts.settings`); None when JWT is off."""
        config = settings() if config is None else config
        issuer, audience, jwks = config.oidc_issuer, config.oidc_audience, config.oidc_jwks
        if not (issuer and audience and jwks):
            return None
        return cls(
            issuer=issuer,
            audience=audience,
            jwks=jwks,
            principal_claim=config.oidc_principal_claim,
            roles_claim=config.oidc_roles_claim,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OidcSettings | None:
        """`from_settings` of `Settings.from_env(env)`; with no `env`, the process settings."""
        return cls.from_settings(None if env is None else Settings.from_env(env))


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


class JwtVerifier:
    """Verifies bearer JWTs; one per process (it caches the JWKS)."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._client: jwt.PyJWKClient | None = None
        self._keys: jwt.PyJWKSet | None = None
        if settings.jwks.startswith(("http://", "https://")):
            self._client = jwt.PyJWKClient(
                settings.jwks, cache_jwk_set=True, lifespan=settings.jwks_cache_s, timeout=5
            )
        else:
            self._keys = jwt.PyJWKSet.from_json(Path(settings.jwks).read_text(encoding="utf-8"))

    def _file_key(self, token: str) -> Any:
        assert self._keys is not None
        kid = jwt.get_unverified_header(token).get("kid")
        keys = [k for k in self._keys.keys if kid is None or k.key_id == kid]
        if len(keys) != 1:
            raise AuthenticationFailed("no matching key in the JWKS")
        return keys[0]

    async def _signing_key(self, token: str) -> Any:
        if self._client is not None:
            # Cached after the first fetch; a miss does blocking HTTP, so keep it off the loop.
            return await asyncio.to_thread(self._client.get_signing_key_from_jwt, token)
        return self._file_key(token)

    async def verify(self, token: str) -> Identity:
        """The identity a valid token names, or AuthenticationFailed."""
        s = self.settings
        try:
            key = await self._signing_key(token)
            claims = jwt.decode(
                token,
                key=key,
                algorithms=list(s.algorithms),
                audience=s.audience,
                issuer=s.issuer,
                leeway=s.leeway_s,
                options={"require": ["exp", "iss", "aud"]},
            )
        except AuthenticationFailed:
            raise
        except (jwt.PyJWTError, ValueError) as exc:
            raise AuthenticationFailed(f"invalid JWT: {exc}") from None
        principal = _claim(claims, s.principal_claim)
        try:
            principal_id = check_id(principal, "principal id") if isinstance(principal, str) else ""
        except InvalidId:
            principal_id = ""
        if not principal_id:
            raise AuthenticationFailed(f"JWT claim {s.principal_claim!r} is not a valid id")
        raw_roles = _claim(claims, s.roles_claim)
        if isinstance(raw_roles, str):
            raw_roles = raw_roles.split()
        roles = frozenset(r for r in raw_roles or [] if isinstance(r, str) and r in ROLES)
        return Identity(id=principal_id, roles=roles, via="jwt")
