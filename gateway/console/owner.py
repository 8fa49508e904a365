"""Data owner pages: my experts, their licenses and deny rules, withdrawal, usage.

Every read and write goes through the governance services the API uses (so the same ledger
records and the same errors); which expert a principal may manage is decided there
(`governance.experts.require_owner`), never by what the page shows, so editing a URL or a
form by hand to name another owner's expert gets the services' 403.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from litestar import get, post
from litestar.response import Redirect, Template
from sqlalchemy.ext.asyncio import AsyncSession

from audit.canonical import format_time
from gateway.console.common import (
    AnyRequest,
    csrf_form,
    field_of,
    flash,
    render,
    see_other,
    user_message,
)
from governance import experts as experts_service
from governance import licenses as licenses_service
from governance.errors import GovernanceError, InvalidWindow, NotPermitted, UnknownDenial
from governance.identity import Identity
from governance.models import Denial, Expert, License
from governance.names import DEFAULT_PURPOSE
from governance.principals import list_principals
from governance.store import PolicySnapshot

T = TypeVar("T")


def owned(identity: Identity, rows: list[Expert]) -> list[Expert]:
    """The experts this principal manages: its own (all of them for an admin)."""
    if identity.is_admin:
        return rows
    return [e for e in rows if e.owner_id is not None and e.owner_id == identity.id]


async def owned_expert_ids(db: AsyncSession, identity: Identity) -> list[str]:
    return [e.id for e in owned(identity, list(await experts_service.list_experts(db)))]


async def users_now(db: AsyncSession, snapshot: PolicySnapshot) -> dict[str, int]:
    """Per expert: how many principals may use it now, for at least one purpose."""
    purposes = {DEFAULT_PURPOSE}
    for lic in await licenses_service.list_licenses(db, include_revoked=False):
        purposes.update(p for p in lic.purposes if p != "*")
    counts = dict.fromkeys(snapshot.expert_ids, 0)
    for principal in await list_principals(db):
        allowed: set[str] = set()
        for purpose in sorted(purposes):
            allowed.update(snapshot.allowed_experts(principal.id, purpose).allowed)
        for expert_id in allowed:
            counts[expert_id] = counts.get(expert_id, 0) + 1
    return counts


@get("/console/experts", name="console:experts")
async def experts_page(
    request: AnyRequest, db_session: AsyncSession, snapshot: PolicySnapshot, identity: Identity
) -> Template:
    rows = owned(identity, list(await experts_service.list_experts(db_session)))
    counts = await users_now(db_session, snapshot)
    return render(request, "experts.html", title="My experts", experts=rows, counts=counts)


async def _expert_for(db: AsyncSession, identity: Identity, expert_id: str) -> Expert:
    expert = await experts_service.get_expert(db, expert_id)
    experts_service.require_owner(identity, expert, "view the licenses of")
    return expert


async def _expert_context(
    db: AsyncSession, expert: Expert, counts: Mapping[str, int]
) -> dict[str, Any]:
    now = datetime.now(UTC)
    licenses = list(await licenses_service.list_licenses(db, expert.id))
    denials = list(await licenses_service.list_denials(db, expert.id))

    def state(lic: Any) -> str:
        if lic.revoked_at is not None:
            return "revoked"
        if lic.expires_at is not None and lic.expires_at <= now:
            return "expired"
        if lic.valid_from is not None and lic.valid_from > now:
            return "not yet valid"
        return "active"

    return {
        "expert": expert,
        "licenses": sorted(licenses, key=lambda lic: (lic.revoked_at is not None, lic.granted_at)),
        "license_state": {lic.id: state(lic) for lic in licenses},
        "denials": [d for d in denials if d.lifted_at is None],
        "lifted": [d for d in denials if d.lifted_at is not None],
        "users_now": counts.get(expert.id, 0),
    }


@get("/console/experts/{expert_id:str}", name="console:expert")
async def expert_page(
    request: AnyRequest,
    db_session: AsyncSession,
    snapshot: PolicySnapshot,
    identity: Identity,
    expert_id: str,
) -> Template:
    expert = await _expert_for(db_session, identity, expert_id)
    counts = await users_now(db_session, snapshot)
    ctx = await _expert_context(db_session, expert, counts)
    return render(request, "expert.html", title=f"Expert {expert.id}", **ctx)


async def _rerender(
    request: AnyRequest,
    db: AsyncSession,
    identity: Identity,
    expert_id: str,
    exc: GovernanceError,
    form: Mapping[str, Any],
    which: str,
) -> Template:
    """The expert page again with the error beside the field that caused it."""
    if isinstance(exc, NotPermitted):
        raise exc
    expert = await _expert_for(db, identity, expert_id)
    snapshot = await request.app.state.policy.snapshot(db)
    ctx = await _expert_context(db, expert, await users_now(db, snapshot))
    field = f"{which}.{field_of(exc)}"
    return render(
        request,
        "expert.html",
        status_code=409
        if exc.code in ("duplicate_grant", "duplicate_denial", "invalid_state")
        else 400,
        title=f"Expert {expert.id}",
        errors={field: user_message(exc)},
        form={which: dict(form)},
        **ctx,
    )


def parse_utc(value: Any, what: str) -> datetime | None:
    """A form's date-time (the page says UTC) as an aware datetime; blank is None."""
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip().replace(" ", "T")
    try:
        at = datetime.fromisoformat(text.removesuffix("Z"))
    except ValueError:
        raise InvalidWindow(
            f"{what} {value!r} is not a date and time (e.g. 2026-12-31T18:00)"
        ) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def parse_purposes(value: Any) -> list[str] | None:
    if not isinstance(value, str) or not value.strip():
        return None
    return [p.strip() for p in value.replace(",", " ").split() if p.strip()]


async def _act(
    request: AnyRequest,
    db: AsyncSession,
    identity: Identity,
    expert_id: str,
    which: str,
    action: Callable[[Mapping[str, Any]], Awaitable[T]],
    done: Callable[[T], str],
) -> Template | Redirect:
    """One form post on an expert's page: check the CSRF token, run the service call, then
    back to the page with `done(result)` flashed, or the page again with the error beside
    the form `which` that caused it (GovernanceError)."""
    form = await csrf_form(request)
    try:
        result = await action(form)
    except GovernanceError as exc:
        return await _rerender(request, db, identity, expert_id, exc, form, which)
    await flash(request, done(result))
    return see_other(f"/console/experts/{expert_id}")


def _text(form: Mapping[str, Any], name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


@post("/console/experts/{expert_id:str}/licenses", name="console:grant")
async def grant(
    request: AnyRequest, db_session: AsyncSession, identity: Identity, expert_id: str
) -> Template | Redirect:
    async def call(form: Mapping[str, Any]) -> License:
        return await licenses_service.grant_license(
            db_session,
            actor=identity,
            expert_id=expert_id,
            grantee=_text(form, "grantee"),
            purposes=parse_purposes(form.get("purposes")),
            valid_from=parse_utc(form.get("valid_from"), "valid from"),
            expires_at=parse_utc(form.get("expires_at"), "expires at"),
            note=_text(form, "note") or None,
        )

    return await _act(
        request,
        db_session,
        identity,
        expert_id,
        "grant",
        call,
        lambda lic: f"Granted {expert_id} to {lic.grantee} (license {lic.id}).",
    )


@post("/console/experts/{expert_id:str}/licenses/{license_id:str}/revoke", name="console:revoke")
async def revoke(
    request: AnyRequest,
    db_session: AsyncSession,
    identity: Identity,
    expert_id: str,
    license_id: str,
) -> Template | Redirect:
    async def call(_form: Mapping[str, Any]) -> License:
        return await licenses_service.revoke_license(
            db_session, actor=identity, license_id=license_id, expert_id=expert_id
        )

    return await _act(
        request,
        db_session,
        identity,
        expert_id,
        "revoke",
        call,
        lambda lic: f"Revoked license {lic.id} ({lic.grantee}).",
    )


@post("/console/experts/{expert_id:str}/denials", name="console:deny")
async def deny(
    request: AnyRequest, db_session: AsyncSession, identity: Identity, expert_id: str
) -> Template | Redirect:
    async def call(form: Mapping[str, Any]) -> Denial:
        return await licenses_service.deny(
            db_session, actor=identity, expert_id=expert_id, grantee=_text(form, "grantee")
        )

    return await _act(
        request,
        db_session,
        identity,
        expert_id,
        "deny",
        call,
        lambda row: f"Denied {expert_id} to {row.grantee}.",
    )


@post("/console/experts/{expert_id:str}/denials/{denial_id:str}/lift", name="console:lift")
async def lift(
    request: AnyRequest,
    db_session: AsyncSession,
    identity: Identity,
    expert_id: str,
    denial_id: str,
) -> Template | Redirect:
    async def call(_form: Mapping[str, Any]) -> Denial:
        denials = {d.id for d in await licenses_service.list_denials(db_session, expert_id)}
        if denial_id not in denials:
            raise UnknownDenial(f"expert {expert_id} has no deny rule {denial_id!r}")
        return await licenses_service.lift_denial(db_session, actor=identity, denial_id=denial_id)

    return await _act(
        request,
        db_session,
        identity,
        expert_id,
        "lift",
        call,
        lambda row: f"Lifted the deny rule for {row.grantee}.",
    )


ACTIONS = {
    "withdraw": (
        experts_service.withdraw_expert,
        "Withdraw",
        "Nobody will be able to use this expert — whatever its licenses say — from the next "
        "request on, and running requests stop using it. You can reinstate it later.",
        "Withdrew {id}: it is now excluded for everyone.",
    ),
    "reinstate": (
        experts_service.reinstate_expert,
        "Reinstate",
        "Its licenses and deny rules apply again from the next request on.",
        "Reinstated {id}: its licenses apply again.",
    ),
}


@get(
    ["/console/experts/{expert_id:str}/withdraw", "/console/experts/{expert_id:str}/reinstate"],
    name="console:confirm",
)
async def confirm_page(
    request: AnyRequest, db_session: AsyncSession, identity: Identity, expert_id: str
) -> Template:
    action = request.url.path.rsplit("/", 1)[1]
    expert = await experts_service.get_expert(db_session, expert_id)
    experts_service.require_owner(identity, expert, action)
    _fn, label, consequence, _done = ACTIONS[action]
    return render(
        request,
        "confirm.html",
        title=f"{label} {expert.id}?",
        expert=expert,
        action=action,
        label=label,
        consequence=consequence,
    )


@post(
    ["/console/experts/{expert_id:str}/withdraw", "/console/experts/{expert_id:str}/reinstate"],
    name="console:confirmed",
)
async def confirmed(
    request: AnyRequest, db_session: AsyncSession, identity: Identity, expert_id: str
) -> Template | Redirect:
    action = request.url.path.rsplit("/", 1)[1]
    fn, _label, _consequence, done = ACTIONS[action]

    async def call(_form: Mapping[str, Any]) -> Expert:
        return await fn(db_session, actor=identity, expert_id=expert_id)

    return await _act(
        request,
        db_session,
        identity,
        expert_id,
        "status",
        call,
        lambda _row: done.format(id=expert_id),
    )


def when(value: datetime | None) -> str:
    return "" if value is None else format_time(value)[:19].replace("T", " ") + " UTC"


HANDLERS = [experts_page, expert_page, grant, revoke, deny, lift, confirm_page, confirmed]
