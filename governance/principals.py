"""Principals: applications, data owners, compliance officers and admins, with their groups."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from governance import policy
from governance.changes import change, fresh
from governance.errors import AlreadyExists, InvalidInput, NotPermitted, UnknownPrincipal
from governance.identity import Identity
from governance.models import Principal
from governance.names import check_id, check_role, check_text

MAX_DISPLAY_NAME = 255  # principals.display_name


def require_admin(actor: Identity, what: str) -> None:
    if not actor.is_admin:
        raise NotPermitted(f"{actor.id} may not {what}: admin role required")


async def get_principal(session: AsyncSession, principal_id: str) -> Principal:
    """The principal; InvalidId for a malformed id (bad input, not "not found")."""
    row: Principal | None = await fresh(session, Principal, check_id(principal_id, "principal id"))
    if row is None:
        raise UnknownPrincipal(f"unknown principal {principal_id!r}")
    return row


async def list_principals(session: AsyncSession) -> Sequence[Principal]:
    stmt = select(Principal).order_by(Principal.id).execution_options(populate_existing=True)
    return (await session.execute(stmt)).scalars().all()


async def add_principal(
    session: AsyncSession,
    *,
    actor: Identity,
    principal_id: str,
    roles: Iterable[str],
    groups: Iterable[str] = (),
    display_name: str | None = None,
) -> Principal:
    """Create a principal with at least one role (admin only)."""
    require_admin(actor, "create principals")
    check_id(principal_id, "principal id")
    check_text(display_name, "display name", MAX_DISPLAY_NAME)
    role_list = sorted({check_role(r) for r in roles})
    if not role_list:
        raise InvalidInput("a principal needs at least one role")
    group_list = sorted({check_id(g, "group") for g in groups})
    async with change(session, actor) as ch:
        if await fresh(session, Principal, principal_id) is not None:
            raise AlreadyExists(f"principal {principal_id!r} already exists")
        row = Principal(
            id=principal_id,
            display_name=display_name,
            roles=role_list,
            groups=group_list,
            created_at=datetime.now(UTC),
            created_by=actor.id,
        )
        session.add(row)
        await policy.adapter(session).add_policies(
            "g", "g", policy.principal_links(principal_id, role_list, group_list)
        )
        await ch.record(
            "principal.created",
            {"principal_id": principal_id, "roles": role_list, "groups": group_list},
        )
    return row
