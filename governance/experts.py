"""The expert registry: the served model's experts, their owners and status.

The model folder is read (experts.json, else config.json's `num_experts`) through
`contracts.experts`, the schema the engine reads too (governance may not import the engine).
Registration is automatic (`ensure_registered`, called by the server and the CLI) and explicit
(`flexgate experts sync`). An owner named in experts.json who is not a principal yet is
reported, never invented; a later sync assigns them once they exist.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.experts import ExpertsFileError, model_experts
from contracts.settings import settings
from governance import policy
from governance.changes import Change, change, fresh
from governance.errors import (
    InvalidId,
    InvalidInput,
    InvalidState,
    ModelError,
    NotPermitted,
    UnknownExpert,
)
from governance.identity import Identity
from governance.models import Expert, License, Principal
from governance.names import ANY, check_id, new_id
from governance.principals import get_principal, require_admin

log = logging.getLogger(__name__)

ACTIVE = "active"
WITHDRAWN = "withdrawn"
PUBLIC_ID = "public"

WithdrawalListener = Callable[[str, str], Awaitable[None] | None]
_listeners: list[WithdrawalListener] = []


@dataclass(frozen=True, slots=True)
class ModelExpert:
    """One expert as the model folder describes it, in router-row order."""

    id: str
    owner: str | None
    description: str


@dataclass
class SyncReport:
    """What a registry sync did, and what it could not do (owners to create first)."""

    registered: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)
    owners_assigned: dict[str, str] = field(default_factory=dict)
    unknown_owners: dict[str, str] = field(default_factory=dict)
    owners_without_role: dict[str, str] = field(default_factory=dict)
    public_license: str | None = None

    @property
    def changed(self) -> bool:
        return bool(self.registered or self.updated or self.absent or self.owners_assigned)


def served_model_dir() -> Path:
    """FLEXGATE_MODEL, else the demo model in FLEXGATE_HOME (DESIGN.md, "Configuration")."""
    return settings().model_dir


def read_model_experts(model_dir: Path | str) -> list[ModelExpert]:
    """The experts of a model folder, in router-row order (schema: `contracts.experts`)."""
    try:
        entries = model_experts(model_dir)
    except ExpertsFileError as exc:
        raise ModelError(str(exc)) from None
    return [ModelExpert(id=e.id, owner=e.owner, description=e.description or "") for e in entries]


def public_expert_id(experts: Sequence[ModelExpert]) -> str:
    """The public expert: the one called `public`, else router row 0 (by convention)."""
    ids = [e.id for e in experts]
    return PUBLIC_ID if PUBLIC_ID in ids else ids[0]


# -- reading ------------------------------------------------------------------------------


async def get_expert(session: AsyncSession, expert_id: str) -> Expert:
    """The registered expert; InvalidId for a malformed id (bad input, not "not found")."""
    row: Expert | None = await fresh(session, Expert, check_id(expert_id, "expert id"))
    if row is None:
        raise UnknownExpert(f"unknown expert {expert_id!r}")
    return row


async def list_experts(session: AsyncSession, *, include_absent: bool = True) -> Sequence[Expert]:
    """Experts in router-row order; those absent from the served model last."""
    stmt = select(Expert).execution_options(populate_existing=True)
    if not include_absent:
        stmt = stmt.where(Expert.position.is_not(None))
    rows = (await session.execute(stmt)).scalars().all()
    return sorted(rows, key=lambda e: (e.position is None, e.position or 0, e.id))


def require_owner(actor: Identity, expert: Expert, what: str) -> None:
    """Only the expert's owner (or an admin) may change who can use it."""
    if actor.is_admin or (expert.owner_id is not None and expert.owner_id == actor.id):
        return
    raise NotPermitted(f"{actor.id} may not {what} expert {expert.id}: not its owner")


# -- registration -------------------------------------------------------------------------


async def _registered_matches(session: AsyncSession, model: Sequence[ModelExpert]) -> bool:
    rows = (await session.execute(select(Expert.id, Expert.position))).all()
    current = {str(r[0]): r[1] for r in rows}
    wanted = {e.id: n for n, e in enumerate(model)}
    return all(current.get(i) == n for i, n in wanted.items()) and not any(
        pos is not None and i not in wanted for i, pos in current.items()
    )


async def ensure_registered(
    session: AsyncSession, *, actor: Identity, model_dir: Path | str | None = None
) -> SyncReport | None:
    """Register the served model's experts unless that is already done (server/CLI start)."""
    model = read_model_experts(model_dir or served_model_dir())
    if await _registered_matches(session, model):
        return None
    return await sync_experts(session, actor=actor, model_dir=model_dir)


async def sync_experts(
    session: AsyncSession, *, actor: Identity, model_dir: Path | str | None = None
) -> SyncReport:
    """Bring the registry in line with the model folder; see SyncReport for what it says."""
    require_admin(actor, "sync the expert registry")
    model = read_model_experts(model_dir or served_model_dir())
    report = SyncReport()
    now = datetime.now(UTC)
    async with change(session, actor) as ch:
        rows = {
            e.id: e
            for e in (
                await session.execute(select(Expert).execution_options(populate_existing=True))
            ).scalars()
        }
        for position, me in enumerate(model):
            row = rows.get(me.id)
            if row is None:
                row = Expert(
                    id=me.id,
                    position=position,
                    description=me.description,
                    declared_owner=me.owner,
                    owner_id=None,
                    status=ACTIVE,
                    registered_at=now,
                )
                session.add(row)
                rows[me.id] = row
                report.registered.append(me.id)
            elif (row.position, row.description, row.declared_owner) != (
                position,
                me.description,
                me.owner,
            ):
                row.position, row.description, row.declared_owner = (
                    position,
                    me.description,
                    me.owner,
                )
                report.updated.append(me.id)
        model_ids = {e.id for e in model}
        for expert_id, row in rows.items():
            if expert_id not in model_ids and row.position is not None:
                row.position = None
                report.absent.append(expert_id)
        await session.flush()
        for me in model:
            row = rows[me.id]
            if row.owner_id is None and me.owner:
                await _assign_declared_owner(session, row, me.owner, report)
        if not report.changed:
            ch.cancel()
        for expert_id in report.registered:
            row = rows[expert_id]
            await ch.record(
                "expert.registered",
                {
                    "expert": expert_id,
                    "position": row.position,
                    "declared_owner": row.declared_owner,
                    "description": row.description,
                },
            )
        for expert_id, owner in report.owners_assigned.items():
            await ch.record("expert.owner_assigned", {"expert": expert_id, "owner": owner})
        if report.updated or report.absent:
            await ch.record(
                "expert.updated",
                {
                    "updated": report.updated,
                    "absent": report.absent,
                    "positions": {e: rows[e].position for e in report.updated + report.absent},
                },
            )
        public = public_expert_id(model)
        if public in report.registered:
            report.public_license = await _grant_public(ch, public, now)
    for expert_id, owner in report.unknown_owners.items():
        log.info("expert %s: owner %r is not a principal yet", expert_id, owner)
    return report


async def _assign_declared_owner(
    session: AsyncSession, row: Expert, owner: str, report: SyncReport
) -> None:
    try:
        check_id(owner, "principal id")
    except InvalidId:
        report.unknown_owners[row.id] = owner
        return
    principal: Principal | None = await fresh(session, Principal, owner)
    if principal is None:
        report.unknown_owners[row.id] = owner
    elif "data_owner" not in principal.roles:
        report.owners_without_role[row.id] = owner
    else:
        row.owner_id = owner
        report.owners_assigned[row.id] = owner


async def _grant_public(ch: Change, expert_id: str, now: datetime) -> str:
    """On a model's first registration its public expert is licensed to everyone."""
    lic = License(
        id=new_id("lic"),
        expert_id=expert_id,
        grantee=ANY,
        purposes=[ANY],
        valid_from=None,
        expires_at=None,
        note="public expert, licensed to everyone on first registration",
        granted_by=ch.actor.id,
        granted_at=now,
    )
    ch.session.add(lic)
    rule = policy.license_rule(
        grantee=ANY, expert_id=expert_id, purposes=[ANY], valid_from=None, expires_at=None
    )
    await policy.adapter(ch.session).add_policy("p", "p", rule)
    await ch.record(
        "license.granted",
        {
            "license_id": lic.id,
            "expert": expert_id,
            "grantee": ANY,
            "purposes": [ANY],
            "valid_from": None,
            "expires_at": None,
            "note": lic.note,
        },
    )
    return lic.id


# -- owner, withdrawal, reinstatement -----------------------------------------------------


async def assign_owner(
    session: AsyncSession, *, actor: Identity, expert_id: str, owner_id: str
) -> Expert:
    """Make a data owner the owner of an expert (admin only)."""
    require_admin(actor, "assign expert owners")
    async with change(session, actor) as ch:
        row = await get_expert(session, expert_id)
        principal = await get_principal(session, owner_id)
        if "data_owner" not in principal.roles:
            raise InvalidInput(f"principal {owner_id} lacks the data_owner role")
        previous = row.owner_id
        if previous == owner_id:
            ch.cancel()
        row.owner_id = owner_id
        await ch.record(
            "expert.owner_assigned",
            {"expert": expert_id, "owner": owner_id, "previous_owner": previous},
        )
    return row


def on_withdrawal(listener: WithdrawalListener) -> Callable[[], None]:
    """Call `listener(expert_id, "withdrawn" | "reinstated")` after such a change commits.

    In this process only; other processes learn of it from PolicyWatcher's PolicyChange.
    Returns a function that unsubscribes.
    """
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def _notify(expert_id: str, status: str) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        for listener in list(_listeners):
            try:
                result = listener(expert_id, status)
                if result is not None:
                    await result
            except Exception:
                log.exception("withdrawal listener failed for %s", expert_id)

    return run


async def withdraw_expert(session: AsyncSession, *, actor: Identity, expert_id: str) -> Expert:
    """Opt an expert out for everyone (its owner or an admin); listeners then unload it."""
    async with change(session, actor) as ch:
        row = await get_expert(session, expert_id)
        require_owner(actor, row, "withdraw")
        if row.status == WITHDRAWN:
            raise InvalidState(f"expert {expert_id} is already withdrawn")
        row.status = WITHDRAWN
        row.withdrawn_at = datetime.now(UTC)
        await policy.adapter(session).add_policy("g", "g2", policy.withdrawal_link(expert_id))
        await ch.record("expert.withdrawn", {"expert": expert_id})
        ch.after_commit(_notify(expert_id, "withdrawn"))
    return row


async def reinstate_expert(session: AsyncSession, *, actor: Identity, expert_id: str) -> Expert:
    """Undo a withdrawal: the expert's licenses and deny rules apply again."""
    async with change(session, actor) as ch:
        row = await get_expert(session, expert_id)
        require_owner(actor, row, "reinstate")
        if row.status != WITHDRAWN:
            raise InvalidState(f"expert {expert_id} is not withdrawn")
        row.status = ACTIVE
        row.withdrawn_at = None
        await policy.adapter(session).remove_policy("g", "g2", policy.withdrawal_link(expert_id))
        await ch.record("expert.reinstated", {"expert": expert_id})
        ch.after_commit(_notify(expert_id, "reinstated"))
    return row
