"""Licenses and deny rules: an expert's owner decides who may use it, for what, and when.

A license grants one expert to a grantee (a principal id, `group:NAME`, `role:NAME` or `*`)
for purposes (names from the set documented in governance.names, or `*`) within an optional
window valid_from <= t < expires_at. A deny rule for a grantee overrides every license of
the expert. Each service checks all input first, then writes the row, its Casbin rule, the
version bump and the ledger record in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from governance import policy
from governance.changes import change, fresh
from governance.errors import (
    DuplicateDenial,
    DuplicateGrant,
    InvalidState,
    InvalidWindow,
    UnknownDenial,
    UnknownLicense,
)
from governance.experts import get_expert, require_owner
from governance.identity import Identity
from governance.models import Denial, License
from governance.names import check_id, check_text, new_id, normalise_purposes, parse_grantee
from governance.principals import get_principal

MAX_NOTE = 1000


def _iso(at: datetime | None) -> str | None:
    return None if at is None else policy.encode_time(at, "")


def _check_window(valid_from: datetime | None, expires_at: datetime | None, now: datetime) -> None:
    for name, value in (("valid_from", valid_from), ("expires_at", expires_at)):
        if value is not None and value.tzinfo is None:
            raise InvalidWindow(f"{name} needs a time zone (use UTC, e.g. 2026-01-01T00:00:00Z)")
    if expires_at is not None:
        if valid_from is not None and expires_at <= valid_from:
            raise InvalidWindow(
                f"expires_at {_iso(expires_at)} is not after valid_from {_iso(valid_from)}"
            )
        if expires_at <= now:
            raise InvalidWindow(f"expires_at {_iso(expires_at)} is already past")


async def _check_grantee(session: AsyncSession, grantee: str) -> None:
    kind, name = parse_grantee(grantee)
    if kind == "principal":
        await get_principal(session, name)


def license_rule(lic: License) -> policy.Rule:
    return policy.license_rule(
        grantee=lic.grantee,
        expert_id=lic.expert_id,
        purposes=lic.purposes,
        valid_from=lic.valid_from,
        expires_at=lic.expires_at,
    )


async def grant_license(
    session: AsyncSession,
    *,
    actor: Identity,
    expert_id: str,
    grantee: str,
    purposes: Iterable[str] | None = None,
    valid_from: datetime | None = None,
    expires_at: datetime | None = None,
    note: str | None = None,
    now: datetime | None = None,
) -> License:
    """Grant `expert_id` to `grantee` (owner of the expert or admin). Purposes default to `*`."""
    now = now or datetime.now(UTC)
    check_id(expert_id, "expert id")
    parse_grantee(grantee)
    purpose_list = list(normalise_purposes(purposes))
    check_text(note, "note", MAX_NOTE)
    _check_window(valid_from, expires_at, now)
    async with change(session, actor) as ch:
        expert = await get_expert(session, expert_id)
        require_owner(actor, expert, "grant")
        await _check_grantee(session, grantee)
        rule = policy.license_rule(
            grantee=grantee,
            expert_id=expert_id,
            purposes=purpose_list,
            valid_from=valid_from,
            expires_at=expires_at,
        )
        for other in await _active_licenses(session, expert_id, grantee):
            if license_rule(other) == rule:
                raise DuplicateGrant(
                    f"license {other.id} already grants {expert_id} to {grantee} "
                    "for these purposes and window"
                )
        lic = License(
            id=new_id("lic"),
            expert_id=expert_id,
            grantee=grantee,
            purposes=purpose_list,
            valid_from=valid_from,
            expires_at=expires_at,
            note=note,
            granted_by=actor.id,
            granted_at=now,
        )
        session.add(lic)
        await policy.adapter(session).add_policy("p", "p", rule)
        await ch.record(
            "license.granted",
            {
                "license_id": lic.id,
                "expert": expert_id,
                "grantee": grantee,
                "purposes": purpose_list,
                "valid_from": _iso(valid_from),
                "expires_at": _iso(expires_at),
                "note": note,
            },
        )
    return lic


async def _active_licenses(
    session: AsyncSession, expert_id: str, grantee: str
) -> Sequence[License]:
    stmt = (
        select(License)
        .where(License.expert_id == expert_id)
        .where(License.grantee == grantee)
        .where(License.revoked_at.is_(None))
        .execution_options(populate_existing=True)
    )
    return (await session.execute(stmt)).scalars().all()


async def get_license(session: AsyncSession, license_id: str) -> License:
    row: License | None = await fresh(session, License, license_id)
    if row is None:
        raise UnknownLicense(f"unknown license {license_id!r}")
    return row


async def revoke_license(
    session: AsyncSession,
    *,
    actor: Identity,
    license_id: str,
    expert_id: str | None = None,
) -> License:
    """Revoke a license (owner of its expert or admin); `expert_id`, if given, must match."""
    async with change(session, actor) as ch:
        lic = await get_license(session, license_id)
        if expert_id is not None and lic.expert_id != expert_id:
            raise UnknownLicense(f"expert {expert_id} has no license {license_id!r}")
        require_owner(actor, await get_expert(session, lic.expert_id), "revoke licenses of")
        if lic.revoked_at is not None:
            raise InvalidState(f"license {license_id} is already revoked")
        lic.revoked_at = datetime.now(UTC)
        lic.revoked_by = actor.id
        if not await policy.adapter(session).remove_policy("p", "p", license_rule(lic)):
            raise RuntimeError(f"license {license_id} has no Casbin rule: policy out of sync")
        await ch.record(
            "license.revoked",
            {"license_id": license_id, "expert": lic.expert_id, "grantee": lic.grantee},
        )
    return lic


async def list_licenses(
    session: AsyncSession, expert_id: str | None = None, *, include_revoked: bool = True
) -> Sequence[License]:
    stmt = select(License).order_by(License.expert_id, License.granted_at, License.id)
    if expert_id is not None:
        await get_expert(session, expert_id)
        stmt = stmt.where(License.expert_id == expert_id)
    if not include_revoked:
        stmt = stmt.where(License.revoked_at.is_(None))
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalars().all()


# -- deny rules ---------------------------------------------------------------------------


async def deny(session: AsyncSession, *, actor: Identity, expert_id: str, grantee: str) -> Denial:
    """Deny `expert_id` to `grantee` whatever licenses say (owner of the expert or admin)."""
    parse_grantee(grantee)
    async with change(session, actor) as ch:
        expert = await get_expert(session, expert_id)
        require_owner(actor, expert, "deny")
        await _check_grantee(session, grantee)
        existing = (
            await session.execute(
                select(Denial.id)
                .where(Denial.expert_id == expert_id)
                .where(Denial.grantee == grantee)
                .where(Denial.lifted_at.is_(None))
            )
        ).scalar_one_or_none()
        if existing is not None:
            raise DuplicateDenial(f"deny rule {existing} already denies {expert_id} to {grantee}")
        row = Denial(
            id=new_id("den"),
            expert_id=expert_id,
            grantee=grantee,
            created_by=actor.id,
            created_at=datetime.now(UTC),
        )
        session.add(row)
        await policy.adapter(session).add_policy(
            "p", "p", policy.denial_rule(grantee=grantee, expert_id=expert_id)
        )
        await ch.record(
            "license.denied", {"denial_id": row.id, "expert": expert_id, "grantee": grantee}
        )
    return row


async def lift_denial(session: AsyncSession, *, actor: Identity, denial_id: str) -> Denial:
    """Remove a deny rule (owner of the expert or admin); licenses apply again."""
    async with change(session, actor) as ch:
        row: Denial | None = await fresh(session, Denial, denial_id)
        if row is None:
            raise UnknownDenial(f"unknown deny rule {denial_id!r}")
        require_owner(actor, await get_expert(session, row.expert_id), "lift deny rules of")
        if row.lifted_at is not None:
            raise InvalidState(f"deny rule {denial_id} is already lifted")
        row.lifted_at = datetime.now(UTC)
        row.lifted_by = actor.id
        rule = policy.denial_rule(grantee=row.grantee, expert_id=row.expert_id)
        if not await policy.adapter(session).remove_policy("p", "p", rule):
            raise RuntimeError(f"deny rule {denial_id} has no Casbin rule: policy out of sync")
        await ch.record(
            "license.deny_lifted",
            {"denial_id": denial_id, "expert": row.expert_id, "grantee": row.grantee},
        )
    return row


async def list_denials(
    session: AsyncSession, expert_id: str | None = None, *, include_lifted: bool = True
) -> Sequence[Denial]:
    stmt = select(Denial).order_by(Denial.expert_id, Denial.created_at, Denial.id)
    if expert_id is not None:
        await get_expert(session, expert_id)
        stmt = stmt.where(Denial.expert_id == expert_id)
    if not include_lifted:
        stmt = stmt.where(Denial.lifted_at.is_(None))
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalars().all()
