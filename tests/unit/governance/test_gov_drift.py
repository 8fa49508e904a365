"""Policy drift, written as the attacks: someone with SQL access edits the rules in force (or
the tables they come from) behind the application's back; replaying the ledger reports it,
on SQLite and PostgreSQL. An untouched database reports every table ok."""

from __future__ import annotations

import tomllib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from importlib import import_module
from pathlib import Path

import pytest
from gov_helpers import OLGA, OPERATOR, World
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.derived import DerivedFinding
from governance.drift import check_policy_drift
from governance.experts import assign_owner, reinstate_expert, withdraw_expert
from governance.keys import create_key, revoke_key
from governance.licenses import deny, grant_license, lift_denial, revoke_license
from governance.policy import TIME_MAX, TIME_MIN

ROOT = Path(__file__).resolve().parents[3]


async def _busy_history(world: World) -> dict[str, str]:
    """Every kind of governance change, so that replaying has something to get wrong."""
    ids: dict[str, str] = {}
    async with world.sm() as s:
        later = datetime.now(UTC) + timedelta(days=30)
        lic = await grant_license(
            s, actor=OLGA, expert_id="code", grantee="group:research", purposes=["research"],
            valid_from=datetime(2026, 1, 1, tzinfo=UTC), expires_at=later,
        )  # fmt: skip
        ids["license"] = lic.id
        gone = await grant_license(s, actor=OLGA, expert_id="code", grantee="app-3")
        await revoke_license(s, actor=OLGA, license_id=gone.id)
        ids["deny"] = (await deny(s, actor=OLGA, expert_id="code", grantee="app-2")).id
        lifted = await deny(s, actor=OLGA, expert_id="code", grantee="app-3")
        await lift_denial(s, actor=OLGA, denial_id=lifted.id)
        await withdraw_expert(s, actor=OLGA, expert_id="code")
        await reinstate_expert(s, actor=OLGA, expert_id="code")
        await assign_owner(s, actor=OPERATOR, expert_id="math", owner_id="oscar")
        await withdraw_expert(s, actor=OPERATOR, expert_id="math")
        key, _ = await create_key(
            s, actor=OPERATOR, principal_id="app-1", expires_in=timedelta(days=9)
        )
        await revoke_key(s, actor=OPERATOR, key_id=key.id)
        ids["key"] = key.id
        await create_key(s, actor=OPERATOR, principal_id="app-2")
    return ids


def _by_table(findings: list[DerivedFinding]) -> dict[str, DerivedFinding]:
    assert all(isinstance(f, DerivedFinding) for f in findings)
    return {f.table: f for f in findings}


async def _sql(engine: AsyncEngine, *statements: str) -> None:
    async with engine.begin() as conn:
        for statement in statements:
            await conn.execute(text(statement))


async def test_untouched_database_is_ok(world: World, db_engine: AsyncEngine) -> None:
    await _busy_history(world)
    findings = _by_table(await check_policy_drift(db_engine))
    assert set(findings) == {
        "casbin_rule", "principals", "api_keys", "experts", "licenses", "denials",
    }  # fmt: skip
    assert all(f.ok for f in findings.values()), findings


Attack = Callable[[AsyncEngine, dict[str, str]], Awaitable[None]]


async def _added_grant(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(
        engine,
        "INSERT INTO casbin_rule (ptype, v0, v1, v2, v3, v4, v5) VALUES "
        f"('p', 'app-3', 'news', '*', '{TIME_MIN}', '{TIME_MAX}', 'allow')",
    )


async def _deleted_deny(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(engine, "DELETE FROM casbin_rule WHERE ptype = 'p' AND v5 = 'deny'")


async def _altered_purpose(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(engine, "UPDATE casbin_rule SET v2 = 'research|general' WHERE v2 = 'research'")


async def _extended_window(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(engine, f"UPDATE casbin_rule SET v4 = '{TIME_MAX}' WHERE v2 = 'research'")


async def _withdrawal_flipped_back(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(
        engine,
        "DELETE FROM casbin_rule WHERE ptype = 'g2' AND v0 = 'math'",
        "UPDATE experts SET status = 'active', withdrawn_at = NULL WHERE id = 'math'",
    )


async def _role_escalation(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(
        engine, "INSERT INTO casbin_rule (ptype, v0, v1) VALUES ('g', 'app-1', 'role:admin')"
    )


async def _key_unrevoked(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(engine, f"UPDATE api_keys SET revoked_at = NULL WHERE id = '{ids['key']}'")


async def _owner_swapped(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(engine, "UPDATE experts SET owner_id = 'oscar' WHERE id = 'code'")


async def _license_unrevoked_in_table(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(engine, "UPDATE licenses SET revoked_at = NULL, revoked_by = NULL")


async def _deny_lifted_in_table(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(engine, f"UPDATE denials SET lifted_at = '2026-01-01' WHERE id = '{ids['deny']}'")


async def _principal_roles_edited(engine: AsyncEngine, ids: dict[str, str]) -> None:
    await _sql(engine, """UPDATE principals SET roles = '["admin"]' WHERE id = 'app-1'""")


ATTACKS: list[tuple[Attack, dict[str, str]]] = [
    (_added_grant, {"casbin_rule": "rule added [p, app-3, news, *"}),
    (_deleted_deny, {"casbin_rule": "rule deleted [p, app-2, code, *"}),
    (_altered_purpose, {"casbin_rule": "research|general"}),
    (_extended_window, {"casbin_rule": f"research, 2026-01-01T00:00:00.000000Z, {TIME_MAX}, "}),
    (_withdrawal_flipped_back, {"casbin_rule": "rule deleted [g2, math, status:withdrawn]",
                                "experts": "expert math is ('oscar', 'active')"}),
    (_role_escalation, {"casbin_rule": "rule added [g, app-1, role:admin]"}),
    (_key_unrevoked, {"api_keys": "key "}),
    (_owner_swapped, {"experts": "expert code is ('oscar', 'active')"}),
    (_license_unrevoked_in_table, {"licenses": "the records say ('revoked', None)"}),
    (_deny_lifted_in_table, {"denials": "is ('lifted', None)"}),
    (_principal_roles_edited, {"principals": "principal app-1"}),
]  # fmt: skip


@pytest.mark.parametrize(("attack", "expected"), ATTACKS, ids=lambda v: getattr(v, "__name__", ""))
async def test_edit_behind_the_apps_back_is_reported(
    world: World, db_engine: AsyncEngine, attack: Attack, expected: dict[str, str]
) -> None:
    ids = await _busy_history(world)
    await attack(db_engine, ids)
    findings = _by_table(await check_policy_drift(db_engine))
    for table, finding in findings.items():
        if table in expected:
            assert not finding.ok and expected[table] in finding.detail, finding
        else:
            assert finding.ok, finding


async def test_many_differences_are_counted(world: World, db_engine: AsyncEngine) -> None:
    await _sql(
        db_engine,
        *(
            "INSERT INTO casbin_rule (ptype, v0, v1, v2, v3, v4, v5) VALUES "
            f"('p', 'app-{n}', 'news', '*', '{TIME_MIN}', '{TIME_MAX}', 'allow')"
            for n in range(10, 19)
        ),
    )
    (casbin,) = [f for f in await check_policy_drift(db_engine) if f.table == "casbin_rule"]
    assert not casbin.ok and casbin.detail.startswith("9 not in the ledger")
    assert "(and 4 more)" in casbin.detail


def test_entry_point_names_this_function() -> None:
    """The registration audit verify discovers (discovery itself is tested once installed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["entry-points"]["flexgate.derived_checks"]["governance-policy"]
    module, attr = target.split(":")
    assert getattr(import_module(module), attr) is check_policy_drift


async def test_audit_verify_discovers_this_check(world: World, db_engine: AsyncEngine) -> None:
    """What `flexgate audit verify` runs: audit's own checks, then every installed plugin,
    found through the entry point (not imported by name)."""
    from audit.derived import check_derived, plugin_checks

    assert ("governance-policy", check_policy_drift) in plugin_checks()
    ids = await _busy_history(world)
    clean = await check_derived(db_engine)
    assert {f.table for f in clean} >= {"ledger_usage", "casbin_rule", "licenses"}
    assert all(f.ok for f in clean), clean
    await _added_grant(db_engine, ids)
    findings = _by_table(await check_derived(db_engine))
    assert not findings["casbin_rule"].ok
