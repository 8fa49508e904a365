"""Audit ledger: hash-chained records, chain head, append-only trigger on PostgreSQL.

Revision ID: 0001_ledger
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_ledger"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64
JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "ledger_records",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("principal", sa.String(length=255), nullable=True),
        sa.Column("payload", JSONType, nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_ledger_records")),
        sa.UniqueConstraint("id", name=op.f("uq_ledger_records_id")),
        sa.UniqueConstraint("hash", name=op.f("uq_ledger_records_hash")),
    )
    op.create_index(op.f("ix_ledger_records_kind"), "ledger_records", ["kind"])
    op.create_index(op.f("ix_ledger_records_at"), "ledger_records", ["at"])
    op.create_index(op.f("ix_ledger_records_principal"), "ledger_records", ["principal"])
    head = op.create_table(
        "ledger_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_head")),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH}])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION flexgate_ledger_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION 'ledger_records is append-only: % refused', TG_OP;
            END;
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            "CREATE TRIGGER ledger_records_append_only BEFORE UPDATE OR DELETE ON ledger_records "
            "FOR EACH ROW EXECUTE FUNCTION flexgate_ledger_append_only()"
        )
        op.execute(
            "CREATE TRIGGER ledger_records_no_truncate BEFORE TRUNCATE ON ledger_records "
            "FOR EACH STATEMENT EXECUTE FUNCTION flexgate_ledger_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS ledger_records_no_truncate ON ledger_records")
        op.execute("DROP TRIGGER IF EXISTS ledger_records_append_only ON ledger_records")
        op.execute("DROP FUNCTION IF EXISTS flexgate_ledger_append_only()")
    op.drop_table("ledger_head")
    op.drop_index(op.f("ix_ledger_records_principal"), table_name="ledger_records")
    op.drop_index(op.f("ix_ledger_records_at"), table_name="ledger_records")
    op.drop_index(op.f("ix_ledger_records_kind"), table_name="ledger_records")
    op.drop_table("ledger_records")
