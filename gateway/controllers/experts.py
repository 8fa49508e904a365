"""Experts, licenses, deny rules, withdrawal: thin handlers over governance's services.

The route policy lets data owners and admins reach these routes; whether the caller owns *this*
expert is governance's check (`require_owner`, inside each service), so an owner gets 403 on
another owner's expert and nothing is written.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, post
from litestar.params import Parameter
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.bodies import strict_body
from gateway.schemas.governance import (
    Access,
    DenialOut,
    DenyIn,
    ExpertList,
    ExpertOut,
    ExpertStatusOut,
    GrantIn,
    LicenseOut,
    LicensesOut,
    error_responses,
    from_row,
)
from governance import experts as expert_service
from governance import licenses as license_service
from governance.identity import Identity
from governance.models import Denial, Expert, License
from governance.names import DEFAULT_PURPOSE
from governance.store import PolicySnapshot


def license_out(lic: License) -> LicenseOut:
    return from_row(LicenseOut, lic, expert=lic.expert_id, purposes=list(lic.purposes))


def denial_out(row: Denial) -> DenialOut:
    return from_row(DenialOut, row, expert=row.expert_id)


def status_out(row: Expert) -> ExpertStatusOut:
    return from_row(ExpertStatusOut, row, owner=row.owner_id)


AnyRequest = Request[Any, Any, Any]
ERRORS = error_responses(400, 401, 403, 404, 409, 503)


class ExpertsController(Controller):
    path = "/v1/experts"
    tags = ("experts",)

    @get(
        "/",
        summary="Experts of the served model, and whether the caller may use each",
        responses=ERRORS,
    )
    async def list_experts(
        self,
        snapshot: PolicySnapshot,
        identity: Identity,
        purpose: str = Parameter(default=DEFAULT_PURPOSE, description="purpose to decide for"),
    ) -> ExpertList:
        decision = snapshot.allowed_experts(identity, purpose)
        allowed = set(decision.allowed)
        return ExpertList(
            purpose=purpose,
            policy_version=snapshot.version,
            data=[
                ExpertOut(
                    id=e.id,
                    owner=e.owner,
                    status=e.status,
                    description=e.description,
                    position=e.position,
                    access=Access(allowed=e.id in allowed, reason=decision.excluded.get(e.id)),
                )
                for e in snapshot.experts
            ],
        )

    @get(
        "/{id:str}/licenses",
        summary="Licenses and deny rules of an expert (owner, admin)",
        responses=ERRORS,
    )
    async def list_licenses(
        self, db_session: AsyncSession, identity: Identity, id: str
    ) -> LicensesOut:
        expert = await expert_service.get_expert(db_session, id)
        expert_service.require_owner(identity, expert, "list the licenses of")
        licenses = await license_service.list_licenses(db_session, id)
        denials = await license_service.list_denials(db_session, id)
        return LicensesOut(
            expert=id,
            licenses=[license_out(x) for x in licenses],
            denials=[denial_out(x) for x in denials],
        )

    @post(
        "/{id:str}/licenses",
        summary="Grant an expert (owner of it)",
        status_code=201,
        responses=ERRORS,
    )
    async def grant(
        self,
        request: AnyRequest,
        db_session: AsyncSession,
        identity: Identity,
        id: str,
        data: GrantIn,
    ) -> LicenseOut:
        data = await strict_body(request, GrantIn)
        lic = await license_service.grant_license(
            db_session,
            actor=identity,
            expert_id=id,
            grantee=data.grantee,
            purposes=data.purposes,
            valid_from=data.valid_from,
            expires_at=data.expires_at,
            note=data.note,
        )
        return license_out(lic)

    @delete(
        "/{id:str}/licenses/{license_id:str}",
        summary="Revoke a license (owner of the expert)",
        status_code=200,
        responses=ERRORS,
    )
    async def revoke(
        self, db_session: AsyncSession, identity: Identity, id: str, license_id: str
    ) -> LicenseOut:
        lic = await license_service.revoke_license(
            db_session, actor=identity, license_id=license_id, expert_id=id
        )
        return license_out(lic)

    @post(
        "/{id:str}/denials",
        summary="Deny an expert to a grantee (owner)",
        status_code=201,
        responses=ERRORS,
    )
    async def deny(
        self,
        request: AnyRequest,
        db_session: AsyncSession,
        identity: Identity,
        id: str,
        data: DenyIn,
    ) -> DenialOut:
        data = await strict_body(request, DenyIn)
        row = await license_service.deny(
            db_session, actor=identity, expert_id=id, grantee=data.grantee
        )
        return denial_out(row)

    @post(
        "/{id:str}/withdraw",
        summary="Withdraw an expert for everyone",
        status_code=200,
        responses=ERRORS,
    )
    async def withdraw(
        self, db_session: AsyncSession, identity: Identity, id: str
    ) -> ExpertStatusOut:
        return status_out(
            await expert_service.withdraw_expert(db_session, actor=identity, expert_id=id)
        )

    @post(
        "/{id:str}/reinstate",
        summary="Reinstate a withdrawn expert",
        status_code=200,
        responses=ERRORS,
    )
    async def reinstate(
        self, db_session: AsyncSession, identity: Identity, id: str
    ) -> ExpertStatusOut:
        return status_out(
            await expert_service.reinstate_expert(db_session, actor=identity, expert_id=id)
        )
