"""Helpers of the audit tests (imported by name: the test folders are not packages)."""

from __future__ import annotations

import itertools
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.checkpoints import create_checkpoint
from audit.db import make_sessionmaker
from audit.ledger import NewRecord, append_many
from audit.signing import Signer


def inference(i: int, **over: Any) -> dict[str, Any]:
    """A small inference payload; expert `code` is used on even i, `news` always excluded."""
    payload: dict[str, Any] = {
        "request_id": f"req-{i}",
        "endpoint": "/v1/completions",
        "model": "demo",
        "purpose": "research" if i % 3 == 0 else "general",
        "policy_version": 1,
        "experts_allowed": ["public", "code"],
        "experts_excluded": {"news": "no-license"},
        "usage": {
            "public": {"tokens": 10 + i, "weight": 5.5},
            "code": {"tokens": 4 if i % 2 == 0 else 0, "weight": 1.25 if i % 2 == 0 else 0.0},
            "news": {"tokens": 0, "weight": 0.0},
        },
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "finish_reason": "stop",
        "status": "error" if i % 5 == 4 else "ok",
        "prompt_sha256": "0" * 64,
        "duration_ms": 12.5,
        "trace_id": None,
    }
    payload.update(over)
    return payload


def record(i: int) -> NewRecord:
    """The i-th record of a test ledger: inference, with a governance record every 7th."""
    if i % 7 == 6:
        return NewRecord("license.granted", "owner-1", {"expert": "code", "grantee": "app-1"})
    return NewRecord("inference", f"app-{i % 2}", inference(i))


async def fill(
    engine: AsyncEngine,
    n: int,
    *,
    signer: Signer | None = None,
    checkpoint_at: tuple[int, ...] = (),
) -> None:
    """Append n records (see `record`), with a signed checkpoint after the records whose
    1-based count is in `checkpoint_at`; a few transactions, so fixtures stay fast."""
    cuts = sorted({0, n, *checkpoint_at})
    sm = make_sessionmaker(engine)
    for lo, hi in itertools.pairwise(cuts):
        async with sm.begin() as session:
            await append_many(session, [record(i) for i in range(lo, hi)])
            if hi in checkpoint_at:
                assert signer is not None
                await create_checkpoint(session, signer)


async def tamper(engine: AsyncEngine, *statements: str, **params: Any) -> None:
    """Run raw SQL around the append-only triggers (PostgreSQL: disabled for the change)."""
    async with engine.begin() as conn:
        pg = conn.dialect.name == "postgresql"
        tables = ("ledger_records", "ledger_checkpoints", "ledger_merkle_nodes")
        if pg:
            for t in tables:
                await conn.execute(text(f"ALTER TABLE {t} DISABLE TRIGGER USER"))
        for stmt in statements:
            await conn.execute(text(stmt), params)
        if pg:
            for t in tables:
                await conn.execute(text(f"ALTER TABLE {t} ENABLE TRIGGER USER"))
