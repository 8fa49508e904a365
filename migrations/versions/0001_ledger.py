"""Audit ledger: hash-chained records, chain head with Merkle frontier, stored Merkle subtrees,
signed checkpoints, usage summary; append-only triggers on PostgreSQL.

Revision ID: 0001_ledger
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001_ledger"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS_HASH = "0" * 64
SEQ_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Tables whose rows, once written, are never changed or removed: the ledger, its checkpoints
# and its stored Merkle subtrees. The head and the usage summary are updated by every append.
APPEND_ONLY = ("ledger_records", "ledger_checkpoints", "ledger_merkle_nodes")


def upgrade() -> None:
    op.create_table(
        "ledger_records",
        # INTEGER on SQLite: seq is then the rowid itself (one b-tree instead of two).
        sa.Column("seq", SEQ_TYPE, autoincrement=False, nullable=False),
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("at", sa.String(length=27), nullable=False),
        sa.Column("principal", sa.String(length=255), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_ledger_records")),
        sa.UniqueConstraint("id", name=op.f("uq_ledger_records_id")),
    )
    op.create_index(op.f("ix_ledger_records_at"), "ledger_records", ["at"])
    op.create_index("ix_ledger_records_kind_seq", "ledger_records", ["kind", "seq"])
    op.create_index("ix_ledger_records_principal_seq", "ledger_records", ["principal", "seq"])
    head = op.create_table(
        "ledger_head",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("at", sa.String(length=27), nullable=True),
        sa.Column("frontier", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_head")),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": GENESIS_HASH, "at": None, "frontier": ""}])
    op.create_table(
        "ledger_merkle_nodes",
        sa.Column("level", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("idx", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("level", "idx", name=op.f("pk_ledger_merkle_nodes")),
    )
    op.create_table(
        "ledger_checkpoints",
        sa.Column("size", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("root", sa.String(length=64), nullable=False),
        sa.Column("at", sa.String(length=27), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("size", name=op.f("pk_ledger_checkpoints")),
    )
    op.create_table(
        "ledger_usage",
        sa.Column("hour", sa.String(length=13), nullable=False),
        sa.Column("principal", sa.String(length=255), nullable=False),
        sa.Column("purpose", sa.String(length=64), nullable=False),
        sa.Column("expert", sa.String(length=128), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("weight", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint(
            "hour", "principal", "purpose", "expert", name=op.f("pk_ledger_usage")
        ),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION flexgate_ledger_append_only() RETURNS trigger AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
            END;
            $$ LANGUAGE plpgsql
            """
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION flexgate_ledger_append_only()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION flexgate_ledger_append_only()"
            )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        op.execute("DROP FUNCTION IF EXISTS flexgate_ledger_append_only()")
    op.drop_table("ledger_usage")
    op.drop_table("ledger_checkpoints")
    op.drop_table("ledger_merkle_nodes")
    op.drop_table("ledger_head")
    op.drop_index("ix_ledger_records_principal_seq", table_name="ledger_records")
    op.drop_index("ix_ledger_records_kind_seq", table_name="ledger_records")
    op.drop_index(op.f("ix_ledger_records_at"), table_name="ledger_records")
    op.drop_table("ledger_records")
