from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.db import ensure_schema_current, make_engine, make_sessionmaker
from audit.errors import DatabaseUnavailable, SchemaOutOfDate
from audit.ledger import append, head


async def test_append_chains_records(db_engine: AsyncEngine) -> None:
    sm = make_sessionmaker(db_engine)
    async with sm.begin() as s:
        first = await append(s, kind="test", principal="p", payload={"n": 1})
        second = await append(s, kind="test", principal=None, payload={"n": 2})
    assert (first.seq, second.seq) == (1, 2)
    assert second.prev_hash == first.hash
    async with sm() as s:
        assert await head(s) == (2, second.hash)


async def test_rolled_back_append_leaves_no_trace(db_engine: AsyncEngine) -> None:
    sm = make_sessionmaker(db_engine)
    with pytest.raises(RuntimeError):
        async with sm.begin() as s:
            await append(s, kind="test", principal="p", payload={"n": 1})
            raise RuntimeError("caller's change failed")
    async with sm() as s:
        assert (await head(s))[0] == 0


async def test_unhashable_payload_is_refused(db_engine: AsyncEngine) -> None:
    sm = make_sessionmaker(db_engine)
    with pytest.raises(ValueError):
        async with sm.begin() as s:
            await append(s, kind="test", principal="p", payload={"x": float("nan")})


@pytest.mark.parametrize("empty_db_url", ["sqlite", "postgresql"], indirect=True)
async def test_schema_check_names_the_command(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        with pytest.raises(SchemaOutOfDate, match="flexgate db upgrade"):
            await ensure_schema_current(engine)
    finally:
        await engine.dispose()


def _metadata_diff(sync_conn: Any) -> list[Any]:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    import audit.models  # noqa: F401  (the tables on Base.metadata)
    from audit.db import Base

    context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_models_and_migrations_agree(db_engine: AsyncEngine) -> None:
    """No autogenerate diff between the models and the migrated schema (both databases)."""
    async with db_engine.connect() as conn:
        diff = await conn.run_sync(_metadata_diff)
    assert diff == []


@pytest.mark.parametrize("empty_db_url", ["sqlite", "postgresql"], indirect=True)
async def test_downgrade_and_upgrade_again(empty_db_url: str) -> None:
    import asyncio

    from audit.db import downgrade, upgrade

    await asyncio.to_thread(upgrade, empty_db_url)
    await asyncio.to_thread(downgrade, empty_db_url, "base")
    await asyncio.to_thread(upgrade, empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        await ensure_schema_current(engine)
    finally:
        await engine.dispose()


CLOSED_PORT = "postgresql+asyncpg://postgres@127.0.0.1:1/flexgate"


@pytest.mark.parametrize(
    "url", [CLOSED_PORT, "sqlite+aiosqlite:////proc/flexgate-no-such-dir/x.db"]
)
async def test_unreachable_database_is_a_typed_error(url: str) -> None:
    from audit.query import RecordQuery, query_records
    from audit.verify import verify
    from audit.writer import LedgerWriter

    try:
        engine = make_engine(url)
    except DatabaseUnavailable:
        return  # SQLite: the folder cannot even be made
    try:
        with pytest.raises(DatabaseUnavailable):
            await ensure_schema_current(engine)
        sm = make_sessionmaker(engine)
        with pytest.raises(DatabaseUnavailable):
            async with sm() as s:
                await query_records(s, RecordQuery())
        with pytest.raises(DatabaseUnavailable):
            async with sm() as s:
                await verify(s, public_keys={})
        with pytest.raises(DatabaseUnavailable):
            async with sm.begin() as s:
                await append(s, kind="test", principal=None, payload={})
        writer = LedgerWriter(engine)
        writer._task = __import__("asyncio").create_task(writer._run())  # start without a head read
        with pytest.raises(DatabaseUnavailable):
            await writer.append(kind="test", principal=None, payload={})
        await writer.close()
    finally:
        await engine.dispose()


@pytest.mark.parametrize("empty_db_url", ["sqlite", "postgresql"], indirect=True)
async def test_downgrade_past_the_watermark_folds_the_tail(empty_db_url: str) -> None:
    """Before 0101 the summary held every record: going back folds the unfolded tail in."""
    import asyncio

    from sqlalchemy import text

    from audit.db import downgrade, upgrade

    await asyncio.to_thread(upgrade, empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        sm = make_sessionmaker(engine)
        async with sm.begin() as s:
            for i in range(5):
                payload = {"usage": {"e": {"tokens": i + 1, "weight": 0.5}}}
                await append(s, kind="inference", principal="p", payload=payload)
        await asyncio.to_thread(downgrade, empty_db_url, "0100_governance")
        async with engine.connect() as conn:
            totals = (
                await conn.execute(
                    text("SELECT requests, tokens FROM ledger_usage WHERE expert = ''")
                )
            ).all()
        assert [tuple(r) for r in totals] == [(5, 15)]
        await asyncio.to_thread(upgrade, empty_db_url)
        async with engine.connect() as conn:
            mark = await conn.scalar(text("SELECT seq FROM ledger_usage_mark"))
        assert mark == 5
    finally:
        await engine.dispose()
