"""Admin routes: principals, keys (shown once), key revocation, per-key limits.

Each handler calls one governance service; the services check the admin role again (the route
policy already did), write their ledger records and commit.
"""

from __future__ import annotations

from datetime import timedelta

from litestar import Controller, delete, get, post, put
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.settings import Settings
from gateway.schemas.governance import (
    KeyCreatedOut,
    KeyIn,
    KeyRevokedOut,
    LimitsIn,
    LimitsOut,
    PrincipalIn,
    PrincipalOut,
    error_responses,
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


ERRORS = error_responses(400, 401, 403, 404, 409, 503)


class AdminController(Controller):
    path = "/v1/admin"
    tags = ("admin",)

    @post("/principals", summary="Create a principal", status_code=201, responses=ERRORS)
    async def create_principal(
        self, db_session: AsyncSession, identity: Identity, data: PrincipalIn
    ) -> PrincipalOut:
        row = await add_principal(
            db_session,
            actor=identity,
            principal_id=data.id,
            roles=data.roles,
            groups=data.groups,
            display_name=data.display_name,
        )
        return PrincipalOut(
            id=row.id,
            roles=list(row.roles),
            groups=list(row.groups),
            display_name=row.display_name,
            created_at=row.created_at,
            created_by=row.created_by,
        )

    @post(
        "/principals/{id:str}/keys",
        summary="Create an API key (returned once)",
        status_code=201,
        responses=ERRORS,
    )
    async def create_key(
        self,
        db_session: AsyncSession,
        identity: Identity,
        settings: Settings,
        id: str,
        data: KeyIn | None = None,
    ) -> KeyCreatedOut:
        data = data or KeyIn()
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
        return KeyRevokedOut(
            key_id=row.id,
            principal=row.principal_id,
            revoked_at=row.revoked_at,
            revoked_by=row.revoked_by,
        )

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
        db_session: AsyncSession,
        identity: Identity,
        settings: Settings,
        key_id: str,
        data: LimitsIn,
    ) -> LimitsOut:
        limits = await set_limits(
            db_session,
            actor=identity,
            key_id=key_id,
            limits=Limits(data.rpm, data.tpm, data.max_parallel),
        )
        return limits_out(key_id, limits, settings)
