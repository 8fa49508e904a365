"""`flexgate principals | keys | experts | licenses …` for operators (DESIGN.md, "CLI contract").

The operator acts as an admin and is recorded in the ledger as `operator:cli`. Every command
opens the database named by FLEXGATE_DATABASE_URL (or the SQLite file in FLEXGATE_HOME) and
refuses a schema that is not at the migrations' head. `experts` and `licenses` commands first
register the served model's experts if that has not happened yet. Errors print one line and
exit 1; `keys create` prints the key alone on stdout (details go to stderr).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncSession

from audit.errors import AuditError
from governance.errors import GovernanceError, ModelError
from governance.identity import Identity

T = TypeVar("T")
OPERATOR = Identity.operator()


def _fmt(at: datetime | None) -> str:
    return "-" if at is None else at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _echo_err(message: str) -> None:
    click.echo(message, err=True)


async def _auto_register(session: AsyncSession) -> None:
    from governance.experts import ensure_registered

    try:
        report = await ensure_registered(session, actor=OPERATOR)
    except ModelError as exc:
        _echo_err(f"warning: expert registry not synced: {exc}")
        return
    if report is not None:
        _report_sync(report)


def _run(work: Callable[[AsyncSession], Awaitable[T]], *, register: bool = False) -> T:
    """Run one async unit of work against the configured database, errors as click errors."""
    from audit.db import ensure_schema_current, make_engine, make_sessionmaker

    async def main() -> T:
        engine = make_engine()
        try:
            await ensure_schema_current(engine)
            async with make_sessionmaker(engine)() as session:
                if register:
                    await _auto_register(session)
                return await work(session)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except (GovernanceError, AuditError) as exc:
        raise click.ClickException(str(exc)) from None


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(list(rows), indent=2, default=str))
        return
    if not rows:
        _echo_err("(none)")
        return
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
    for r in rows:
        click.echo("  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip())


def _utc_time(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """ISO 8601 time; without a zone it is taken as UTC."""
    if value is None:
        return None
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO 8601 time (e.g. 2026-12-01T00:00:00Z)"
        ) from None
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


# -- principals ---------------------------------------------------------------------------


@click.group()
def principals() -> None:
    """Create and list principals (applications, data owners, officers, admins)."""


@principals.command("add")
@click.argument("principal_id")
@click.option("--role", "roles", multiple=True, required=True, help="Repeatable.")
@click.option("--group", "groups", multiple=True, help="Repeatable.")
@click.option("--name", "display_name", default=None, help="Display name.")
def principals_add(
    principal_id: str, roles: tuple[str, ...], groups: tuple[str, ...], display_name: str | None
) -> None:
    """Create principal PRINCIPAL_ID with roles and groups."""
    from governance.principals import add_principal

    async def work(s: AsyncSession) -> None:
        p = await add_principal(
            s,
            actor=OPERATOR,
            principal_id=principal_id,
            roles=roles,
            groups=groups,
            display_name=display_name,
        )
        click.echo(f"principal {p.id} created (roles: {', '.join(p.roles)})")

    _run(work)


@principals.command("list")
@_json_option
def principals_list(as_json: bool) -> None:
    """List principals."""
    from governance.principals import list_principals

    async def work(s: AsyncSession) -> list[dict[str, Any]]:
        return [
            {
                "id": p.id,
                "roles": ",".join(p.roles),
                "groups": ",".join(p.groups) or "-",
                "name": p.display_name or "-",
                "created": _fmt(p.created_at),
            }
            for p in await list_principals(s)
        ]

    _table(_run(work), ["id", "roles", "groups", "name", "created"], as_json)


# -- keys ---------------------------------------------------------------------------------


@click.group()
def keys() -> None:
    """Create, list and revoke API keys."""


def _limit_options(command: Callable[..., None]) -> Callable[..., None]:
    """--rpm / --tpm / --max-parallel (a key's limits; see governance.key_limits)."""
    bound = click.IntRange(min=1, max=1_000_000_000)
    for name, help_text in reversed(
        [
            ("--rpm", "requests per minute"),
            ("--tpm", "tokens per minute (prompt + completion)"),
            ("--max-parallel", "requests running at once"),
        ]
    ):
        command = click.option(name, type=bound, metavar="N", help=help_text)(command)
    return command


async def _set_new_key_limits(
    s: AsyncSession, key_id: str, rpm: int | None, tpm: int | None, max_parallel: int | None
) -> None:
    from governance.key_limits import Limits, set_limits

    limits = Limits(rpm, tpm, max_parallel)
    if limits != Limits():
        await set_limits(s, actor=OPERATOR, key_id=key_id, limits=limits)
        _echo_err(f"limits of key {key_id}: {_limits_text(limits)}")


def _limits_text(limits: Any) -> str:
    return ", ".join(
        f"{name} {'default' if value is None else value}"
        for name, value in limits.as_dict().items()
    )


@keys.command("create")
@click.argument("principal_id")
@click.option("--expires-in", "expires_in", type=click.IntRange(min=1), metavar="DAYS")
@_limit_options
def keys_create(
    principal_id: str,
    expires_in: int | None,
    rpm: int | None,
    tpm: int | None,
    max_parallel: int | None,
) -> None:
    """Create a key for PRINCIPAL_ID and print it (shown once) alone on stdout."""
    from governance.keys import create_key

    async def work(s: AsyncSession) -> str:
        row, token = await create_key(
            s,
            actor=OPERATOR,
            principal_id=principal_id,
            expires_in=None if expires_in is None else timedelta(days=expires_in),
        )
        await _set_new_key_limits(s, row.id, rpm, tpm, max_parallel)
        _echo_err(
            f"key {row.id} for {principal_id}, expires {_fmt(row.expires_at)}; "
            "store it now, it is not shown again"
        )
        return token

    click.echo(_run(work))


@keys.command("list")
@click.argument("principal_id", required=False)
@_json_option
def keys_list(principal_id: str | None, as_json: bool) -> None:
    """List keys (never their secrets), optionally of one principal."""
    from governance.keys import list_keys

    now = datetime.now(UTC)

    def status(k: Any) -> str:
        if k.revoked_at is not None:
            return "revoked"
        if k.expires_at is not None and k.expires_at <= now:
            return "expired"
        return "active"

    async def work(s: AsyncSession) -> list[dict[str, Any]]:
        return [
            {
                "key_id": k.id,
                "principal": k.principal_id,
                "status": status(k),
                "created": _fmt(k.created_at),
                "expires": _fmt(k.expires_at),
                "last_used": _fmt(k.last_used_at),
            }
            for k in await list_keys(s, principal_id)
        ]

    cols = ["key_id", "principal", "status", "created", "expires", "last_used"]
    _table(_run(work), cols, as_json)


@keys.command("revoke")
@click.argument("key_id")
def keys_revoke(key_id: str) -> None:
    """Revoke key KEY_ID; requests with it fail from now on, in every worker."""
    from governance.keys import revoke_key

    async def work(s: AsyncSession) -> None:
        row = await revoke_key(s, actor=OPERATOR, key_id=key_id)
        click.echo(f"key {row.id} of {row.principal_id} revoked")

    _run(work)


@keys.command("limits")
@click.argument("key_id")
@_limit_options
@click.option("--reset", is_flag=True, help="Back to the server-wide defaults first.")
@_json_option
def keys_limits(
    key_id: str,
    rpm: int | None,
    tpm: int | None,
    max_parallel: int | None,
    reset: bool,
    as_json: bool,
) -> None:
    """Show KEY_ID's limits, or change those given (the others stay as they are)."""
    from governance.key_limits import Limits, get_limits, set_limits

    async def work(s: AsyncSession) -> Limits:
        current = Limits() if reset else await get_limits(s, key_id)
        wanted = Limits(
            current.rpm if rpm is None else rpm,
            current.tpm if tpm is None else tpm,
            current.max_parallel if max_parallel is None else max_parallel,
        )
        if reset or wanted != current:
            await set_limits(s, actor=OPERATOR, key_id=key_id, limits=wanted)
        return wanted

    limits = _run(work)
    if as_json:
        click.echo(json.dumps({"key_id": key_id, **limits.as_dict()}))
    else:
        click.echo(f"key {key_id}: {_limits_text(limits)}")


# -- experts ------------------------------------------------------------------------------


def _report_sync(report: Any) -> None:
    for e in report.registered:
        _echo_err(f"registered expert {e}")
    for e in report.updated:
        _echo_err(f"updated expert {e}")
    for e in report.absent:
        _echo_err(f"expert {e} is not in the served model")
    for e, owner in report.owners_assigned.items():
        _echo_err(f"expert {e}: owner {owner}")
    for e, owner in report.unknown_owners.items():
        _echo_err(
            f"expert {e}: owner {owner!r} is not a principal; create it "
            f"(flexgate principals add {owner} --role data_owner) and run `flexgate experts sync`"
        )
    for e, owner in report.owners_without_role.items():
        _echo_err(f"expert {e}: owner {owner!r} lacks the data_owner role; not assigned")
    if report.public_license:
        _echo_err(f"public expert licensed to everyone ({report.public_license})")


@click.group()
def experts() -> None:
    """The served model's experts: list, sync, owners, withdrawal."""


@experts.command("list")
@_json_option
def experts_list(as_json: bool) -> None:
    """List registered experts in router-row order."""
    from governance.experts import list_experts

    async def work(s: AsyncSession) -> list[dict[str, Any]]:
        return [
            {
                "id": e.id,
                "position": "-" if e.position is None else e.position,
                "owner": e.owner_id or (f"({e.declared_owner}?)" if e.declared_owner else "-"),
                "status": e.status,
                "description": e.description or "-",
            }
            for e in await list_experts(s)
        ]

    _table(_run(work, register=True), ["id", "position", "owner", "status", "description"], as_json)


@experts.command("sync")
def experts_sync() -> None:
    """Register the served model's experts (FLEXGATE_MODEL) and assign declared owners."""
    from governance.experts import sync_experts

    async def work(s: AsyncSession) -> None:
        report = await sync_experts(s, actor=OPERATOR)
        _report_sync(report)
        click.echo("registry changed" if report.changed else "registry up to date")

    _run(work)


@experts.command("assign-owner")
@click.argument("expert_id")
@click.argument("principal_id")
def experts_assign_owner(expert_id: str, principal_id: str) -> None:
    """Make data owner PRINCIPAL_ID the owner of EXPERT_ID."""
    from governance.experts import assign_owner

    async def work(s: AsyncSession) -> None:
        await assign_owner(s, actor=OPERATOR, expert_id=expert_id, owner_id=principal_id)
        click.echo(f"expert {expert_id} is owned by {principal_id}")

    _run(work, register=True)


@experts.command("withdraw")
@click.argument("expert_id")
def experts_withdraw(expert_id: str) -> None:
    """Withdraw EXPERT_ID for everyone (servers stop using it within a second)."""
    from governance.experts import withdraw_expert

    async def work(s: AsyncSession) -> None:
        await withdraw_expert(s, actor=OPERATOR, expert_id=expert_id)
        click.echo(f"expert {expert_id} withdrawn")

    _run(work, register=True)


@experts.command("reinstate")
@click.argument("expert_id")
def experts_reinstate(expert_id: str) -> None:
    """Reinstate a withdrawn EXPERT_ID (its licenses and deny rules apply again)."""
    from governance.experts import reinstate_expert

    async def work(s: AsyncSession) -> None:
        await reinstate_expert(s, actor=OPERATOR, expert_id=expert_id)
        click.echo(f"expert {expert_id} reinstated")

    _run(work, register=True)


# -- licenses -----------------------------------------------------------------------------


@click.group()
def licenses() -> None:
    """Grant, list and revoke licenses; add and lift deny rules."""


@licenses.command("grant")
@click.argument("expert_id")
@click.argument("grantee")
@click.option("--purpose", "purposes", multiple=True, help="Repeatable; default: every purpose.")
@click.option("--valid-from", metavar="TIME", callback=_utc_time, help="ISO 8601; UTC if no zone.")
@click.option("--expires-at", metavar="TIME", callback=_utc_time, help="ISO 8601, exclusive.")
@click.option("--note", default=None)
def licenses_grant(
    expert_id: str,
    grantee: str,
    purposes: tuple[str, ...],
    valid_from: datetime | None,
    expires_at: datetime | None,
    note: str | None,
) -> None:
    """Grant EXPERT_ID to GRANTEE (principal id, group:NAME, role:NAME or *)."""
    from governance.licenses import grant_license

    async def work(s: AsyncSession) -> None:
        lic = await grant_license(
            s,
            actor=OPERATOR,
            expert_id=expert_id,
            grantee=grantee,
            purposes=purposes or None,
            valid_from=valid_from,
            expires_at=expires_at,
            note=note,
        )
        click.echo(lic.id)

    _run(work, register=True)


@licenses.command("list")
@click.argument("expert_id", required=False)
@_json_option
def licenses_list(expert_id: str | None, as_json: bool) -> None:
    """List licenses and deny rules, optionally of one expert."""
    from governance.licenses import list_denials, list_licenses

    now = datetime.now(UTC)

    def status(lic: Any) -> str:
        if lic.revoked_at is not None:
            return "revoked"
        if lic.valid_from is not None and lic.valid_from > now:
            return "not-yet-valid"
        if lic.expires_at is not None and lic.expires_at <= now:
            return "expired"
        return "active"

    async def work(s: AsyncSession) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = [
            {
                "id": lic.id,
                "kind": "license",
                "expert": lic.expert_id,
                "grantee": lic.grantee,
                "purposes": ",".join(lic.purposes),
                "valid_from": _fmt(lic.valid_from),
                "expires_at": _fmt(lic.expires_at),
                "status": status(lic),
            }
            for lic in await list_licenses(s, expert_id)
        ]
        rows += [
            {
                "id": d.id,
                "kind": "deny",
                "expert": d.expert_id,
                "grantee": d.grantee,
                "purposes": "*",
                "valid_from": "-",
                "expires_at": "-",
                "status": "lifted" if d.lifted_at else "active",
            }
            for d in await list_denials(s, expert_id)
        ]
        return rows

    cols = ["id", "kind", "expert", "grantee", "purposes", "valid_from", "expires_at", "status"]
    _table(_run(work, register=True), cols, as_json)


@licenses.command("revoke")
@click.argument("license_id")
def licenses_revoke(license_id: str) -> None:
    """Revoke LICENSE_ID; it stops applying to the next request in every worker."""
    from governance.licenses import revoke_license

    async def work(s: AsyncSession) -> None:
        lic = await revoke_license(s, actor=OPERATOR, license_id=license_id)
        click.echo(f"license {lic.id} ({lic.expert_id} -> {lic.grantee}) revoked")

    _run(work, register=True)


@licenses.command("deny")
@click.argument("expert_id")
@click.argument("grantee")
def licenses_deny(expert_id: str, grantee: str) -> None:
    """Deny EXPERT_ID to GRANTEE, overriding every license; prints the deny rule's id."""
    from governance.licenses import deny

    async def work(s: AsyncSession) -> None:
        row = await deny(s, actor=OPERATOR, expert_id=expert_id, grantee=grantee)
        click.echo(row.id)

    _run(work, register=True)


@licenses.command("lift-deny")
@click.argument("denial_id")
def licenses_lift_deny(denial_id: str) -> None:
    """Remove deny rule DENIAL_ID (an addition to DESIGN.md's CLI)."""
    from governance.licenses import lift_denial

    async def work(s: AsyncSession) -> None:
        row = await lift_denial(s, actor=OPERATOR, denial_id=denial_id)
        click.echo(f"deny rule {row.id} ({row.expert_id} -> {row.grantee}) lifted")

    _run(work, register=True)
