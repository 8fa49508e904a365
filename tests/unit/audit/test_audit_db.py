from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.db import ensure_schema_current, make_engine, make_sessionmaker
from audit.errors import SchemaOutOfDate
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


async def test_schema_check_names_the_command(empty_db_url: str) -> None:
    engine = make_engine(empty_db_url)
    try:
        with pytest.raises(SchemaOutOfDate, match="flexgate db upgrade"):
            await ensure_schema_current(engine)
    finally:
        await engine.dispose()
