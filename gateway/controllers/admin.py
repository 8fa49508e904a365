"""Admin routes: principals, keys (shown once), key revocation, per-key limits.

Each handler calls one governance service; the services check the admin role again (the route
policy already did), write their ledger records and commit.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from litestar import Controller, Request, delete, get, post, put
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.settings import Settings
from gateway.bodies import optional_body, strict_body
from gateway.schemas.governance import (
    KeyCreatedOut,
    KeyIn,
    KeyRevokedOut,
    LimitsIn,
    LimitsOut,
    PrincipalIn,
    PrincipalOut,
    error_responses,
    from_row,
)
from governance.identity import Identity
from governance.key_limits import Limits, check_limits, get_limits, set_limits
from governance.keys import create_key, revoke_key
from governance.principals import add_principal


def limits_out(key_id: str, limits: Limits, settings: Settings) -> LimitsOut:
    return LimitsOut(
        key_id=key_id,
        rpm=limits.rpm,
        tpm=limits.tpm,
        max_parallel=limits.max_parallel,
        effective={
            "rpm": settings.rate_rpm if limits.rpm is None else limits.rpm,
            "tpm": settings.rate_tpm if limits.tpm is None else limits.tpm,
            "max_parallel": (
                settings.rate_max_parallel if limits.max_parallel is None else limits.max_parallel
            ),
        },
    )


AnyRequest = Request[Any, Any, Any]
ERRORS = error_responses(400, 401, 403, 404, 409, 503)


class AdminController(Controller):
    path = "/v1/admin"
    tags = ("admin",)

    @post("/principals", summary="Create a principal", status_code=201, responses=ERRORS)
    async def create_principal(
        self, request: AnyRequest, db_session: AsyncSession, identity: Identity, data: PrincipalIn
    ) -> PrincipalOut:
        data = await strict_body(request, PrincipalIn)
        row = await add_principal(
            db_session,
            actor=identity,
            principal_id=data.id,
            roles=data.roles,
            groups=data.groups,
            display_name=data.display_name,
        )
        return from_row(PrincipalOut, row, roles=list(row.roles), groups=list(row.groups))

    @post(
        "/principals/{id:str}/keys",
        summary="Create an API key (returned once)",
        status_code=201,
        responses=ERRORS,
    )
    async def create_key(
        self,
        request: AnyRequest,
        db_session: AsyncSession,
        identity: Identity,
        settings: Settings,
        id: str,
        data: KeyIn | None = None,
    ) -> KeyCreatedOut:
        data = await optional_body(request, KeyIn) or KeyIn()
        limits = check_limits(Limits(data.rpm, data.tpm, data.max_parallel))
        row, token = await create_key(
            db_session,
            actor=identity,
            principal_id=id,
            expires_in=None
            if data.expires_in_days is None
            else timedelta(days=data.expires_in_days),
        )
        if limits != Limits():
            await set_limits(db_session, actor=identity, key_id=row.id, limits=limits)
        return KeyCreatedOut(
            key_id=row.id,
            key=token,
            principal=row.principal_id,
            created_at=row.created_at,
            expires_at=row.expires_at,
            limits=limits_out(row.id, limits, settings),
        )

    @delete("/keys/{key_id:str}", summary="Revoke an API key", status_code=200, responses=ERRORS)
    async def revoke_key(
        self, db_session: AsyncSession, identity: Identity, key_id: str
    ) -> KeyRevokedOut:
        row = await revoke_key(db_session, actor=identity, key_id=key_id)
        return from_row(KeyRevokedOut, row, key_id=row.id, principal=row.principal_id)

    @get("/keys/{key_id:str}/limits", summary="A key's limits and what applies", responses=ERRORS)
    async def get_key_limits(
        self, db_session: AsyncSession, settings: Settings, key_id: str
    ) -> LimitsOut:
        return limits_out(key_id, await get_limits(db_session, key_id), settings)

    @put(
        "/keys/{key_id:str}/limits",
        summary="Set a key's limits (null: server default)",
        responses=ERRORS,
    )
    async def set_key_limits(
        self,
        request: AnyRequest,
        db_session: AsyncSession,
        identity: Identity,
        settings: Settings,
        key_id: str,
        data: LimitsIn,
    ) -> LimitsOut:
        data = await strict_body(request, LimitsIn)
        limits = await set_limits(
            db_session,
            actor=identity,
            key_id=key_id,
            limits=Limits(data.rpm, data.tpm, data.max_parallel),
        )
        return limits_out(key_id, limits, settings)
