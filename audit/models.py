"""Tables of the audit ledger (created by migrations/, never by create_all)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Integer, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from audit.db import Base

# JSONB on PostgreSQL for indexed queries; plain JSON (text) on SQLite.
JSONType = JSON().with_variant(JSONB(), "postgresql")

GENESIS_HASH = "0" * 64


class LedgerRecord(Base):
    """One record of the append-only, hash-chained ledger (DESIGN.md, "Ledger record contract")."""

    __tablename__ = "ledger_records"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    id: Mapped[str] = mapped_column(String(36), unique=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    principal: Mapped[str | None] = mapped_column(String(255), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class LedgerHead(Base):
    """The chain head: one row whose lock serialises appenders on every database.

    Appenders take it with `UPDATE ... RETURNING` first, which on PostgreSQL is a row lock and on
    SQLite acquires the single write lock before anything is read, so no two appenders can read
    the same head.
    """

    __tablename__ = "ledger_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))
