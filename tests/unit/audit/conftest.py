"""Fixtures of the audit tests: a signing key in a temporary FLEXGATE_HOME, ledgers with
records and checkpoints, and raw SQL access for tampering (PostgreSQL's append-only triggers
disabled as the superuser, as an attacker with database access could)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit.db import make_sessionmaker
from audit.signing import Signer
from audit.writer import LedgerWriter


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("FLEXGATE_HOME", str(path))
    return path


@pytest.fixture
def signer(home: Path) -> Signer:
    return Signer.load_or_create(home)


@pytest.fixture
def sm(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(db_engine)


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


async def fill(
    engine: AsyncEngine,
    n: int,
    *,
    signer: Signer | None = None,
    checkpoint_at: tuple[int, ...] = (),
) -> None:
    """Append n records (inference, with a governance record every 7th) through the writer,
    checkpointing after the records whose 1-based count is in `checkpoint_at`."""
    async with LedgerWriter(engine, signer=signer) as writer:
        for i in range(n):
            if i % 7 == 6:
                await writer.append(
                    kind="license.granted", principal="owner-1", payload={"expert": "code"}
                )
            else:
                await writer.append(
                    kind="inference", principal=f"app-{i % 2}", payload=inference(i)
                )
            if i + 1 in checkpoint_at:
                await writer.checkpoint()


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


@pytest.fixture
async def writer(db_engine: AsyncEngine, signer: Signer) -> AsyncIterator[LedgerWriter]:
    async with LedgerWriter(db_engine, signer=signer) as w:
        yield w
