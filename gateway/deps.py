"""Dependency providers, registered app-wide: handlers name what they need as parameters.

`db_session` (one per request, closed after), `identity` (the authenticated caller),
`snapshot` (the policy at the database's current version: a moved version reloads it) and
`settings`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide
from sqlalchemy.ext.asyncio import AsyncSession

from audit.db import translate_errors
from contracts.settings import Settings
from gateway.auth import POLICY_VERSION
from gateway.errors import UNAVAILABLE, ApiError
from governance.identity import Identity
from governance.store import PolicySnapshot

log = logging.getLogger(__name__)


async def provide_db_session(state: State) -> AsyncIterator[AsyncSession]:
    async with state.sessionmaker() as session:
        yield session


def provide_identity(request: Request[Any, Any, Any]) -> Identity:
    user = request.scope.get("user")
    if not isinstance(user, Identity):
        raise ApiError(
            401, "authentication required", type="authentication_error", code="invalid_api_key"
        )
    return user


async def provide_snapshot(request: Request[Any, Any, Any], state: State) -> PolicySnapshot:
    """The current policy; if it cannot be read the request fails closed (503).

    The bearer middleware read the version moments ago; when the worker's snapshot is at that
    version it is the answer, without another read. Otherwise a short session of its own
    reads (and, if the version moved, reloads) it and gives its connection back at once."""
    latest: PolicySnapshot | None = state.policy.latest
    if latest is not None and request.scope.get("state", {}).get(POLICY_VERSION) == latest.version:
        return latest
    try:
        async with translate_errors(), state.sessionmaker() as session:
            snapshot: PolicySnapshot = await state.policy.snapshot(session)
            return snapshot
    except Exception as exc:  # fail closed: whatever stops the policy loading stops the request
        log.error("policy snapshot failed: %s", exc)
        raise ApiError(
            503,
            "the access policy cannot be evaluated right now; try again",
            type=UNAVAILABLE,
            code="policy_unavailable",
        ) from exc


def provide_settings(state: State) -> Settings:
    settings: Settings = state.settings
    return settings


DEPENDENCIES: dict[str, Provide] = {
    "db_session": Provide(provide_db_session),
    "identity": Provide(provide_identity, sync_to_thread=False),
    "snapshot": Provide(provide_snapshot),
    "settings": Provide(provide_settings, sync_to_thread=False),
}
