"""Appending to the hash-chained ledger.

`append` joins the caller's transaction, so a governance change and its record commit
together or not at all. The chain head row is locked first, which serialises appenders across
coroutines and processes on both SQLite and PostgreSQL.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from audit.canonical import canonical_json, format_time, record_hash
from audit.models import GENESIS_HASH, LedgerHead, LedgerRecord

HEAD_ID = 1


@dataclass(frozen=True, slots=True)
class Entry:
    """A committed (or about to be committed) ledger record, as the contract shows it."""

    seq: int
    id: str
    kind: str
    at: datetime
    principal: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "id": self.id,
            "kind": self.kind,
            "at": format_time(self.at),
            "principal": self.principal,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class NewRecord:
    kind: str
    principal: str | None
    payload: dict[str, Any]


async def _lock_head(session: AsyncSession) -> tuple[int, str]:
    # A no-op UPDATE takes the row lock (PostgreSQL) / the write lock (SQLite) before we read.
    row = (
        await session.execute(
            update(LedgerHead)
            .where(LedgerHead.id == HEAD_ID)
            .values(seq=LedgerHead.seq)
            .returning(LedgerHead.seq, LedgerHead.hash)
        )
    ).first()
    if row is None:
        raise RuntimeError("ledger head row is missing: run `flexgate db upgrade`")
    return int(row[0]), str(row[1])


async def append_many(session: AsyncSession, records: list[NewRecord]) -> list[Entry]:
    """Append records in order inside the session's current transaction (not committed here)."""
    if not records:
        return []
    seq, prev = await _lock_head(session)
    entries: list[Entry] = []
    rows: list[dict[str, Any]] = []
    for rec in records:
        canonical_json(rec.payload)  # refuse what cannot be hashed before writing anything
        seq += 1
        at = datetime.now(UTC)
        rid = str(uuid.uuid4())
        digest = record_hash(
            prev_hash=prev,
            seq=seq,
            id=rid,
            kind=rec.kind,
            at=at,
            principal=rec.principal,
            payload=rec.payload,
        )
        entry = Entry(seq, rid, rec.kind, at, rec.principal, rec.payload, prev, digest)
        entries.append(entry)
        rows.append(
            {
                "seq": seq,
                "id": rid,
                "kind": rec.kind,
                "at": at,
                "principal": rec.principal,
                "payload": rec.payload,
                "prev_hash": prev,
                "hash": digest,
            }
        )
        prev = digest
    await session.execute(insert(LedgerRecord), rows)
    await session.execute(
        update(LedgerHead).where(LedgerHead.id == HEAD_ID).values(seq=seq, hash=prev)
    )
    return entries


async def append(
    session: AsyncSession, *, kind: str, principal: str | None, payload: dict[str, Any]
) -> Entry:
    """Append one record inside the caller's transaction; it commits with the caller's change."""
    (entry,) = await append_many(session, [NewRecord(kind, principal, payload)])
    return entry


async def head(session: AsyncSession) -> tuple[int, str]:
    row = (await session.execute(select(LedgerHead.seq, LedgerHead.hash))).first()
    return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))
