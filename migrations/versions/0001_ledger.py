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


# PostgreSQL: one append of a batch in one round trip and one statement (audit.writer).
# The client chains the batch onto the head it last saw; the function locks the head first
# and writes only if the head is still at `expected_seq`, else writes nothing and returns the
# current head, so the client re-chains onto it and tries again (compare-and-set).
APPEND_FUNCTION = """
CREATE FUNCTION flexgate_ledger_append(
    expected_seq bigint,
    r_seq bigint[], r_id varchar[], r_kind varchar[], r_at varchar[], r_principal varchar[],
    r_payload text[], r_prev varchar[], r_hash varchar[],
    n_level smallint[], n_idx bigint[], n_hash varchar[],
    u_hour varchar[], u_principal varchar[], u_purpose varchar[], u_expert varchar[],
    u_requests bigint[], u_tokens bigint[], u_weight float8[],
    h_seq bigint, h_hash varchar, h_at varchar, h_frontier text
) RETURNS TABLE (head_seq bigint, head_hash varchar, head_at varchar, head_frontier text)
LANGUAGE plpgsql AS $$
DECLARE
    cur record;
BEGIN
    SELECT h.seq, h.hash, h.at, h.frontier INTO cur FROM ledger_head h WHERE h.id = 1 FOR UPDATE;
    IF cur.seq <> expected_seq THEN
        head_seq := cur.seq;
        head_hash := cur.hash;
        head_at := cur.at;
        head_frontier := cur.frontier;
        RETURN NEXT;
        RETURN;
    END IF;
    INSERT INTO ledger_records (seq, id, kind, at, principal, payload, prev_hash, hash)
        SELECT * FROM unnest(r_seq, r_id, r_kind, r_at, r_principal, r_payload, r_prev, r_hash);
    INSERT INTO ledger_merkle_nodes (level, idx, hash)
        SELECT * FROM unnest(n_level, n_idx, n_hash);
    INSERT INTO ledger_usage AS u (hour, principal, purpose, expert, requests, tokens, weight)
        SELECT * FROM unnest(u_hour, u_principal, u_purpose, u_expert, u_requests, u_tokens,
                             u_weight)
        ON CONFLICT (hour, principal, purpose, expert) DO UPDATE SET
            requests = u.requests + excluded.requests,
            tokens = u.tokens + excluded.tokens,
            weight = u.weight + excluded.weight;
    UPDATE ledger_head SET seq = h_seq, hash = h_hash, at = h_at, frontier = h_frontier
        WHERE id = 1;
END
$$
"""


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
        op.execute(APPEND_FUNCTION)
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
    # The records are the evidence: dropping them needs the operator's explicit consent
    # (`flexgate db downgrade … --i-understand-this-destroys-the-ledger`, audit.db.downgrade).
    if not op.get_context().config.attributes.get("flexgate_destroy_ledger"):
        count = op.get_bind().execute(sa.text("SELECT count(*) FROM ledger_records")).scalar()
        if count:
            raise RuntimeError(
                f"refusing to drop the audit ledger and its {count} records: "
                "`flexgate db downgrade` needs --i-understand-this-destroys-the-ledger"
            )
    if op.get_bind().dialect.name == "postgresql":
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
        op.execute("DROP FUNCTION IF EXISTS flexgate_ledger_append_only()")
        op.execute(
            "DROP FUNCTION IF EXISTS flexgate_ledger_append(bigint, bigint[], varchar[], "
            "varchar[], varchar[], varchar[], text[], varchar[], varchar[], smallint[], "
            "bigint[], varchar[], varchar[], varchar[], varchar[], varchar[], bigint[], "
            "bigint[], float8[], bigint, varchar, varchar, text)"
        )
    op.drop_table("ledger_usage")
    op.drop_table("ledger_checkpoints")
    op.drop_table("ledger_merkle_nodes")
    op.drop_table("ledger_head")
    op.drop_index("ix_ledger_records_principal_seq", table_name="ledger_records")
    op.drop_index("ix_ledger_records_kind_seq", table_name="ledger_records")
    op.drop_index(op.f("ix_ledger_records_at"), table_name="ledger_records")
    op.drop_table("ledger_records")
