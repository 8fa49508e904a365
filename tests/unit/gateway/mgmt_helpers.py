"""Helpers of the management-route tests (experts, audit, admin, metrics)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from audit.checkpoints import create_checkpoint
from audit.db import make_engine, make_sessionmaker
from audit.ledger import head
from audit.models import LedgerRecord
from audit.signing import Signer


@asynccontextmanager
async def session_on(url: str) -> AsyncIterator[AsyncSession]:
    """A session on its own engine, made in the running loop (asyncpg connections are bound
    to the loop that opened them; the fixtures' pools may belong to another)."""
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as s:
            yield s
    finally:
        await engine.dispose()


async def ledger_head(url: str) -> int:
    async with session_on(url) as s:
        seq, _ = await head(s)
        return seq


async def seq_of(url: str, kind: str, expert: str) -> int:
    """The seq of the first record of `kind` whose payload names `expert`."""
    async with session_on(url) as s:
        rows = (
            await s.execute(
                select(LedgerRecord.seq, LedgerRecord.payload)
                .where(LedgerRecord.kind == kind)
                .order_by(LedgerRecord.seq)
            )
        ).all()

    for seq, payload in rows:
        body: Any = json.loads(payload) if isinstance(payload, str) else payload
        if body.get("expert") == expert:
            return int(seq)
    raise AssertionError(f"no {kind} record about {expert}")


def is_openai_error(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and set(body) == {"error"}
        and set(body["error"]) == {"message", "type", "code", "param"}
        and isinstance(body["error"]["message"], str)
        and "Traceback" not in body["error"]["message"]
    )


async def checkpoint(url: str, home: Path) -> int:
    """Sign a checkpoint over the ledger as it is (with the server's key in `home`)."""
    async with session_on(url) as s:
        async with s.begin():
            cp = await create_checkpoint(s, Signer.load_or_create(home))
        return cp.size
