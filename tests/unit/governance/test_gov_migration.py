"""The models and the one Alembic history agree on every governance table, on both databases."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import AsyncEngine

import governance.models  # noqa: F401  (registers the tables)
from audit.db import Base, current_revision, head_revision

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
    assert await current_revision(db_engine) == head_revision() == "0100_governance"
