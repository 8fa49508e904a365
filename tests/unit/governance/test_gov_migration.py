"""The models and the one Alembic history agree on every governance table, on both databases."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import AsyncEngine

import governance.models  # noqa: F401  (registers the tables)
from audit.db import Base, current_revision, downgrade, head_revision, make_engine, upgrade

GOVERNANCE_TABLES = {
    "principals",
    "api_keys",
    "experts",
    "licenses",
    "denials",
    "policy_state",
    "casbin_rule",
}


def _table_of(diff: Any) -> str | None:
    # diffs are tuples like ("add_column", schema, table, column) or ("add_table", Table) or
    # lists of such tuples for modified columns.
    if isinstance(diff, list):
        return _table_of(diff[0])
    for item in diff[1:]:
        name = getattr(item, "name", None) if not isinstance(item, str) else None
        table = getattr(item, "table", None)
        if table is not None and getattr(table, "name", None):
            return str(table.name)
        if hasattr(item, "columns") and name:
            return str(name)
        if isinstance(item, str) and item in GOVERNANCE_TABLES:
            return item
    return None


async def test_models_match_migrations(db_engine: AsyncEngine) -> None:
    def _diff(sync_conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))

    async with db_engine.connect() as conn:
        diffs = await conn.run_sync(_diff)
    ours = [d for d in diffs if _table_of(d) in GOVERNANCE_TABLES]
    assert ours == [], ours
    assert await current_revision(db_engine) == head_revision()


async def test_downgrade_and_upgrade_again(db_url: str) -> None:
    """0100_governance drops cleanly back to the ledger alone, and comes back."""
    await asyncio.to_thread(downgrade, db_url, "0001_ledger")
    engine = make_engine(db_url)
    try:
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert not tables & GOVERNANCE_TABLES and {"ledger_records", "ledger_head"} <= tables
        await asyncio.to_thread(upgrade, db_url)
        async with engine.connect() as conn:
            tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        assert tables >= GOVERNANCE_TABLES
        assert await current_revision(engine) == head_revision()
    finally:
        await engine.dispose()
