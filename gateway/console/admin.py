"""Admin pages: principals with their roles and groups, API keys, experts and their owners.

The same governance services as /v1/admin/* and the CLI (`add_principal`, `create_key`,
`revoke_key`, `set_limits`, `assign_owner`), so the same checks, errors and ledger records.
A new key is shown once, on the response page of its creation, and never again.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from litestar import get, post
from litestar.response import Redirect, Template
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from contracts.settings import Settings
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
from governance.errors import GovernanceError, InvalidInput
from governance.identity import Identity
from governance.key_limits import LIMIT_NAMES, KeyLimit, Limits, get_limits, set_limits
from governance.keys import create_key, list_keys, revoke_key
from governance.names import ROLES
from governance.principals import add_principal, list_principals


def _text(form: Any, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _all(form: Any, name: str) -> list[str]:
    getall = getattr(form, "getall", None)
    values = getall(name, []) if getall is not None else [form.get(name)]
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


async def _principals_page(request: AnyRequest, db: AsyncSession, **extra: Any) -> Template:
    return render(
        request,
        "principals.html",
        title="Principals",
        principals=await list_principals(db),
        roles=sorted(ROLES),
        **extra,
    )


@get("/console/admin/principals", name="console:principals")
async def principals_page(request: AnyRequest, db_session: AsyncSession) -> Template:
    return await _principals_page(request, db_session)


@post("/console/admin/principals", name="console:principal-add")
async def principal_add(
    request: AnyRequest, db_session: AsyncSession, identity: Identity
) -> Template | Redirect:
    form = await csrf_form(request)
    principal_id, groups = _text(form, "id"), _text(form, "groups")
    roles, display_name = _all(form, "roles"), _text(form, "display_name")
    values: dict[str, Any] = {
        "id": principal_id,
        "roles": roles,
        "groups": groups,
        "display_name": display_name,
    }
    try:
        await add_principal(
            db_session,
            actor=identity,
            principal_id=principal_id,
            roles=roles,
            groups=[g for g in groups.replace(",", " ").split() if g],
            display_name=display_name or None,
        )
    except GovernanceError as exc:
        field = field_of(exc)
        if "group" in str(exc):
            field = "groups"
        elif "role" in str(exc):
            field = "roles"
        return await _principals_page(
            request,
            db_session,
            status_code=409 if exc.code == "already_exists" else 400,
            errors={field if field != "form" else "id": user_message(exc)},
            form=values,
        )
    await flash(request, f"Created principal {values['id']}.")
    return see_other("/console/admin/principals")


async def _keys_page(request: AnyRequest, db: AsyncSession, **extra: Any) -> Template:
    own = {row.key_id: row for row in (await db.execute(select(KeyLimit))).scalars()}
    return render(
        request,
        "keys.html",
        title="API keys",
        keys=await list_keys(db),
        principals=await list_principals(db),
        limits=own,
        **extra,
    )


@get("/console/admin/keys", name="console:keys")
async def keys_page(request: AnyRequest, db_session: AsyncSession) -> Template:
    return await _keys_page(request, db_session)


@post("/console/admin/keys", name="console:key-create")
async def key_create(request: AnyRequest, db_session: AsyncSession, identity: Identity) -> Template:
    form = await csrf_form(request)
    principal = _text(form, "principal")
    days = _text(form, "expires_in_days")
    try:
        expires = None
        if days:
            if not days.isdigit() or int(days) < 1 or int(days) > 36500:
                raise InvalidInput("the lifetime must be a whole number of days from 1 to 36500")
            expires = timedelta(days=int(days))
        row, token = await create_key(
            db_session, actor=identity, principal_id=principal, expires_in=expires
        )
    except GovernanceError as exc:
        field = (
            "expires_in_days"
            if isinstance(exc, InvalidInput) and "lifetime" in str(exc)
            else "principal"
        )
        return await _keys_page(
            request,
            db_session,
            status_code=400 if field == "expires_in_days" else 404,
            errors={field: user_message(exc)},
            form={"principal": principal, "expires_in_days": days},
        )
    return render(request, "key_created.html", title="Key created", key=row, token=token)


@post("/console/admin/keys/{key_id:str}/revoke", name="console:key-revoke")
async def key_revoke(
    request: AnyRequest, db_session: AsyncSession, identity: Identity, key_id: str
) -> Template | Redirect:
    await csrf_form(request)
    try:
        row = await revoke_key(db_session, actor=identity, key_id=key_id)
    except GovernanceError as exc:
        return await _keys_page(
            request, db_session, status_code=409, errors={f"revoke.{key_id}": user_message(exc)}
        )
    await flash(request, f"Revoked key {row.id} of {row.principal_id}.")
    return see_other("/console/admin/keys")


def _defaults(settings: Settings) -> dict[str, int]:
    return {
        "rpm": settings.rate_rpm,
        "tpm": settings.rate_tpm,
        "max_parallel": settings.rate_max_parallel,
    }


@get("/console/admin/keys/{key_id:str}/limits", name="console:key-limits")
async def key_limits_page(
    request: AnyRequest, db_session: AsyncSession, settings: Settings, key_id: str
) -> Template:
    limits = await get_limits(db_session, key_id)
    return render(
        request,
        "key_limits.html",
        title=f"Limits of key {key_id}",
        key_id=key_id,
        form={k: "" if v is None else str(v) for k, v in limits.as_dict().items()},
        defaults=_defaults(settings),
    )


@post("/console/admin/keys/{key_id:str}/limits", name="console:key-limits-set")
async def key_limits_set(
    request: AnyRequest,
    db_session: AsyncSession,
    identity: Identity,
    settings: Settings,
    key_id: str,
) -> Template | Redirect:
    form = await csrf_form(request)
    values = {name: _text(form, name) for name in LIMIT_NAMES}
    errors: dict[str, str] = {}
    parsed: dict[str, int | None] = {}
    for name, text in values.items():
        if not text:
            parsed[name] = None
        elif text.isdigit():
            parsed[name] = int(text)
        else:
            errors[name] = "Enter a whole number, or leave it empty for the server default."
    if not errors:
        try:
            await set_limits(db_session, actor=identity, key_id=key_id, limits=Limits(**parsed))
        except GovernanceError as exc:
            message = user_message(exc)
            name = next((n for n in LIMIT_NAMES if message.lower().startswith(n)), "form")
            errors[name] = message
    if errors:
        return render(
            request,
            "key_limits.html",
            status_code=400,
            title=f"Limits of key {key_id}",
            key_id=key_id,
            form=values,
            defaults=_defaults(settings),
            errors=errors,
        )
    await flash(request, f"Limits of key {key_id} saved.")
    return see_other("/console/admin/keys")


async def _experts_page(request: AnyRequest, db: AsyncSession, **extra: Any) -> Template:
    principals = await list_principals(db)
    return render(
        request,
        "admin_experts.html",
        title="Experts and owners",
        experts=await experts_service.list_experts(db),
        owners=[p for p in principals if "data_owner" in p.roles],
        **extra,
    )


@get("/console/admin/experts", name="console:admin-experts")
async def admin_experts_page(request: AnyRequest, db_session: AsyncSession) -> Template:
    return await _experts_page(request, db_session)


@post("/console/admin/experts/{expert_id:str}/owner", name="console:assign-owner")
async def assign_owner(
    request: AnyRequest, db_session: AsyncSession, identity: Identity, expert_id: str
) -> Template | Redirect:
    form = await csrf_form(request)
    owner = _text(form, "owner")
    try:
        await experts_service.assign_owner(
            db_session, actor=identity, expert_id=expert_id, owner_id=owner
        )
    except GovernanceError as exc:
        return await _experts_page(
            request, db_session, status_code=400, errors={f"owner.{expert_id}": user_message(exc)}
        )
    await flash(request, f"{owner} now owns {expert_id}.")
    return see_other("/console/admin/experts")


HANDLERS = [
    principals_page,
    principal_add,
    keys_page,
    key_create,
    key_revoke,
    key_limits_page,
    key_limits_set,
    admin_experts_page,
    assign_owner,
]
