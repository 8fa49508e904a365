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

# Tables with triggers on PostgreSQL (migrations 0001 and 0102), disabled by `tamper`.
GUARDED = (
    "ledger_records",
    "ledger_checkpoints",
    "ledger_merkle_nodes",
    "ledger_head",
    "ledger_usage",
    "ledger_usage_mark",
)


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
        tables = GUARDED
        if pg:
            for t in tables:
                await conn.execute(text(f"ALTER TABLE {t} DISABLE TRIGGER USER"))
        for stmt in statements:
            await conn.execute(text(stmt), params)
        if pg:
            for t in tables:
                await conn.execute(text(f"ALTER TABLE {t} ENABLE TRIGGER USER"))


async def records(engine: AsyncEngine) -> list[dict[str, Any]]:
    """Every ledger record as stored (payload as its text)."""
    async with engine.connect() as conn:
        result = await conn.execute(
            text(
                "SELECT seq, id, kind, at, principal, payload, prev_hash, hash "
                "FROM ledger_records ORDER BY seq"
            )
        )
        return [dict(r._mapping) for r in result]


async def rewrite_ledger(
    engine: AsyncEngine, rows: list[dict[str, Any]], *, drop_checkpoints: bool = True
) -> None:
    """What an attacker with write access does after editing `rows` (seq order, any seqs):
    renumber them 1..n, recompute every hash and prev_hash with the published format,
    rebuild the stored Merkle subtrees and the chain head, optionally delete the stored
    checkpoints; all as plain SQL around the triggers."""
    from audit.canonical import stored_record_hash
    from audit.ledger import NODE_MIN_LEVEL
    from audit.merkle import Frontier, leaf_hash
    from audit.models import GENESIS_HASH

    prev, frontier, nodes, out = GENESIS_HASH, Frontier(), [], []
    for seq, row in enumerate(rows, 1):
        digest = stored_record_hash(
            prev, seq, row["id"], row["kind"], row["at"], row["principal"], row["payload"]
        )
        out.append({**row, "seq": seq, "prev_hash": prev, "hash": digest})
        for level, idx, node in frontier.append(leaf_hash(bytes.fromhex(digest)), NODE_MIN_LEVEL):
            nodes.append({"level": level, "idx": idx, "hash": node.hex()})
        prev = digest
    statements = ["DELETE FROM ledger_records", "DELETE FROM ledger_merkle_nodes"]
    if drop_checkpoints:
        statements.append("DELETE FROM ledger_checkpoints")
    await tamper(engine, *statements)
    async with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            for t in GUARDED:
                await conn.execute(text(f"ALTER TABLE {t} DISABLE TRIGGER USER"))
        if out:
            await conn.execute(
                text(
                    "INSERT INTO ledger_records (seq, id, kind, at, principal, payload, "
                    "prev_hash, hash) VALUES (:seq, :id, :kind, :at, :principal, :payload, "
                    ":prev_hash, :hash)"
                ),
                out,
            )
        if nodes:
            await conn.execute(
                text(
                    "INSERT INTO ledger_merkle_nodes (level, idx, hash) "
                    "VALUES (:level, :idx, :hash)"
                ),
                nodes,
            )
        await conn.execute(
            text("UPDATE ledger_head SET seq = :seq, hash = :hash, at = :at, frontier = :f"),
            {"seq": len(out), "hash": prev, "at": out[-1]["at"] if out else None,
             "f": frontier.to_text()},
        )  # fmt: skip
        await conn.execute(text("UPDATE ledger_usage_mark SET seq = 0"))
        await conn.execute(text("DELETE FROM ledger_usage"))
        if conn.dialect.name == "postgresql":
            for t in GUARDED:
                await conn.execute(text(f"ALTER TABLE {t} ENABLE TRIGGER USER"))
