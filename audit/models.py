"""Tables of the audit ledger (created by migrations/, never by create_all).

`ledger_records` is the ledger itself; every other table here is derived from it. The chain
head (with the Merkle frontier), the stored Merkle subtrees for proofs and the signed
checkpoints are kept in the same transaction as each append, so that what they say is always
true of the committed records; the usage summary, which makes aggregation independent of the
ledger's size, covers the records up to a watermark and is folded up behind the appends
(`audit.summary`).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import (
    BigInteger,
    Dialect,
    Double,
    Index,
    Integer,
    SmallInteger,
    String,
    Text,
    type_coerce,
)
from sqlalchemy.orm import Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from audit.canonical import canonical_json
from audit.db import Base

GENESIS_HASH = "0" * 64
SEQ_TYPE = BigInteger().with_variant(Integer(), "sqlite")


class CanonicalJSON(TypeDecorator[Any]):
    """A JSON object kept as its canonical text (the hashed bytes); a dict in Python.

    ORM users (`record.payload["x"]`) see a dict; the ledger's own hot paths read the text
    itself through `PAYLOAD_TEXT` and never re-encode it. Text already given is stored as is.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None or isinstance(value, str):
            return value
        return canonical_json(value).decode("utf-8")

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else json.loads(value)


class LedgerRecord(Base):
    """One record of the append-only, hash-chained ledger (DESIGN.md, "Ledger record contract").

    `at` and `payload` hold the exact text that was hashed (RFC 3339 UTC with microseconds;
    canonical JSON), not a database timestamp or JSONB: what is queried is then byte for byte
    what is verified, nothing is lost in a round trip through a driver's types, and
    verification hashes the stored text without re-encoding it. Queries read the payload with
    the database's JSON functions; the fixed-width time text sorts in time order, and the
    ledger keeps `at` non-decreasing along seq.
    """

    __tablename__ = "ledger_records"

    # INTEGER on SQLite makes seq the rowid itself (one b-tree, not a table plus an index).
    seq: Mapped[int] = mapped_column(SEQ_TYPE, primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(36))
    kind: Mapped[str] = mapped_column(String(64))
    at: Mapped[str] = mapped_column(String(27), index=True)
    principal: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(CanonicalJSON())
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    # (kind, seq) and (principal, seq): a filtered page `WHERE kind = ? AND seq > ? ORDER BY
    # seq LIMIT n` reads exactly the rows it returns, however rare the kind.
    __table_args__ = (
        Index("ix_ledger_records_kind_seq", "kind", "seq"),
        Index("ix_ledger_records_principal_seq", "principal", "seq"),
    )


class LedgerHead(Base):
    """The chain head: one row whose lock serialises appenders on every database.

    Appenders lock it first (PostgreSQL: `SELECT ... FOR UPDATE`; SQLite: a no-op
    `UPDATE ... RETURNING`, which takes the single write lock before anything is read), so no
    two appenders can read the same head. It also carries the latest `at` (so time never runs
    backwards along the chain) and the Merkle frontier over all record hashes (so a checkpoint
    is O(log n)).
    """

    __tablename__ = "ledger_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
    at: Mapped[str | None] = mapped_column(String(27))
    frontier: Mapped[str] = mapped_column(Text)


class LedgerMerkleNode(Base):
    """A complete perfect subtree of 2**level record hashes (level >= 8), for fast proofs.

    Node (level, idx) covers leaves [idx * 2**level, (idx + 1) * 2**level). Smaller subtrees
    are recomputed from at most 256 record hashes; storing them would cost a row per record.
    """

    __tablename__ = "ledger_merkle_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[str] = mapped_column(String(64))


class LedgerCheckpoint(Base):
    """A signed checkpoint over the first `size` records; its own `checkpoint` ledger record
    is record `size + 1` (appended in the same transaction)."""

    __tablename__ = "ledger_checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root: Mapped[str] = mapped_column(String(64))
    at: Mapped[str] = mapped_column(String(27))
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))


class LedgerUsage(Base):
    """Usage of experts by hour, principal and purpose, summed from `inference` records.

    Holds the records up to `LedgerUsageMark.seq`, folded in a few thousand at a time
    (`audit.summary`), so aggregating over a million records reads a few hundred summary rows
    and a short tail of records; hours (not days) keep a time bound inside a day cheap, since
    only the part-hours at the edges are summed from the records themselves. `expert = ""`
    rows hold the request totals (every expert's tokens and weight together, and each request
    counted once); `principal = ""` stands for none. On PostgreSQL the table has
    `fillfactor = 30` (migration 0101), so that folds update it in place (HOT) without bloat.
    """

    __tablename__ = "ledger_usage"

    hour: Mapped[str] = mapped_column(String(13), primary_key=True)  # YYYY-MM-DDTHH (UTC)
    principal: Mapped[str] = mapped_column(String(255), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(64), primary_key=True)
    expert: Mapped[str] = mapped_column(String(128), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger)
    weight: Mapped[float] = mapped_column(Double)


class LedgerUsageMark(Base):
    """One row: the summary holds the inference records with `seq <= seq` (the watermark)."""

    __tablename__ = "ledger_usage_mark"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)


# The stored payload text, selected without decoding (hashing, export, verification).
PAYLOAD_TEXT = type_coerce(LedgerRecord.payload, Text).label("payload")

RECORD_COLUMNS = (
    LedgerRecord.seq,
    LedgerRecord.id,
    LedgerRecord.kind,
    LedgerRecord.at,
    LedgerRecord.principal,
    PAYLOAD_TEXT,
    LedgerRecord.prev_hash,
    LedgerRecord.hash,
)
"""A record's columns in contract order, as the readers (query, verify, export) select them."""
