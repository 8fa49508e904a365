"""Audit ledger: the usage summary folds behind a watermark; the append compares the head hash.

- `ledger_usage_mark`: one row, the seq up to which `ledger_usage` holds the records
  (`audit.summary`). Appends no longer touch the summary (its ~150 upserts per 32-record batch
  were most of PostgreSQL's time per batch); folds roll thousands of records in at once.
- PostgreSQL: `flexgate_ledger_append` loses its usage arrays and checks the head's hash as
  well as its seq, so a batch chained onto another batch still in flight (the writer keeps two
  in flight) can commit only on top of exactly that batch, never beside a different one of
  the same length.

Revision ID: 0101_ledger_pipeline
Revises: 0100_governance
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0101_ledger_pipeline"
down_revision: str | None = "0100_governance"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_SIGNATURE = (
    "bigint, varchar, bigint[], varchar[], varchar[], varchar[], varchar[], text[], varchar[], "
    "varchar[], smallint[], bigint[], varchar[], bigint, varchar, varchar, text"
)
OLD_SIGNATURE = (
    "bigint, bigint[], varchar[], varchar[], varchar[], varchar[], text[], varchar[], "
    "varchar[], smallint[], bigint[], varchar[], varchar[], varchar[], varchar[], varchar[], "
    "bigint[], bigint[], float8[], bigint, varchar, varchar, text"
)

# One append of a batch in one round trip (audit.writer). The client chains the batch onto the
# head it expects (the last it saw, or the end of its batch still in flight); the function
# locks the head and writes only if the head is exactly that one (seq and hash), else writes
# nothing and returns the current head, for the client to re-chain onto.
APPEND_FUNCTION = """
CREATE FUNCTION flexgate_ledger_append(
    expected_seq bigint, expected_hash varchar,
    r_seq bigint[], r_id varchar[], r_kind varchar[], r_at varchar[], r_principal varchar[],
    r_payload text[], r_prev varchar[], r_hash varchar[],
    n_level smallint[], n_idx bigint[], n_hash varchar[],
    h_seq bigint, h_hash varchar, h_at varchar, h_frontier text
) RETURNS TABLE (head_seq bigint, head_hash varchar, head_at varchar, head_frontier text)
LANGUAGE plpgsql AS $$
DECLARE
    cur record;
BEGIN
    SELECT h.seq, h.hash, h.at, h.frontier INTO cur FROM ledger_head h WHERE h.id = 1 FOR UPDATE;
    IF cur.seq <> expected_seq OR cur.hash <> expected_hash THEN
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
    UPDATE ledger_head SET seq = h_seq, hash = h_hash, at = h_at, frontier = h_frontier
        WHERE id = 1;
END
$$
"""

# The function as 0001_ledger created it (restored by the downgrade).
OLD_APPEND_FUNCTION = """
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
        "ledger_usage_mark",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_usage_mark")),
    )
    # Until now the summary was kept in every append's transaction: it holds every record.
    op.execute(
        "INSERT INTO ledger_usage_mark (id, seq) SELECT 1, seq FROM ledger_head WHERE id = 1"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION flexgate_ledger_append({OLD_SIGNATURE})")
        op.execute(APPEND_FUNCTION)
        # A fold updates every summary row it touches: with room on each page the updates
        # are HOT and pages prune themselves. At the default (100) they were not, and a
        # million records' folds left ~25 MB of dead rows in a table of 1,350 (aggregation
        # 2 ms -> 53 ms); at 30 it stays ~0.4 MB.
        op.execute("ALTER TABLE ledger_usage SET (fillfactor = 30)")


# The usage cells of the inference records with lo < seq <= hi: a frozen copy of
# audit/summary.py's SQL as of this revision (a migration never imports application code,
# which keeps changing after it).
_PG_CELLS = """
WITH recs AS MATERIALIZED (
    SELECT seq, substr(at, 1, 13) AS hour, coalesce(principal, '') AS principal,
           payload::jsonb AS doc
    FROM ledger_records
    WHERE kind = 'inference' AND seq > {lo} AND seq <= {hi}
), items AS (
    SELECT r.seq, r.hour, r.principal, coalesce(r.doc ->> 'purpose', 'general') AS purpose,
           e.key AS expert, (e.value ->> 'tokens')::bigint AS tokens,
           (e.value ->> 'weight')::float8 AS weight
    FROM recs r LEFT JOIN LATERAL jsonb_each(r.doc -> 'usage') AS e ON true
)
SELECT hour, principal, purpose, expert, count(*) AS requests,
       sum(tokens)::bigint AS tokens, sum(weight) AS weight
FROM items WHERE expert IS NOT NULL AND (tokens <> 0 OR weight <> 0)
GROUP BY hour, principal, purpose, expert
UNION ALL
SELECT hour, principal, purpose, '' AS expert, count(DISTINCT seq) AS requests,
       coalesce(sum(tokens), 0)::bigint AS tokens, coalesce(sum(weight), 0) AS weight
FROM items GROUP BY hour, principal, purpose
"""

_SQLITE_CELLS = """
WITH recs AS MATERIALIZED (
    SELECT seq, substr(at, 1, 13) AS hour, coalesce(principal, '') AS principal,
           payload AS doc
    FROM ledger_records
    WHERE kind = 'inference' AND seq > {lo} AND seq <= {hi}
), items AS (
    SELECT r.seq, r.hour, r.principal,
           coalesce(json_extract(r.doc, '$.purpose'), 'general') AS purpose,
           e.key AS expert, json_extract(e.value, '$.tokens') AS tokens,
           json_extract(e.value, '$.weight') AS weight
    FROM recs r LEFT JOIN json_each(r.doc, '$.usage') AS e
)
SELECT hour, principal, purpose, expert, count(*) AS requests,
       sum(tokens) AS tokens, total(weight) AS weight
FROM items WHERE expert IS NOT NULL AND (tokens <> 0 OR weight <> 0)
GROUP BY hour, principal, purpose, expert
UNION ALL
SELECT hour, principal, purpose, '' AS expert, count(DISTINCT seq) AS requests,
       coalesce(sum(tokens), 0) AS tokens, total(weight) AS weight
FROM items GROUP BY hour, principal, purpose
"""


def downgrade() -> None:
    bind = op.get_bind()
    # The old schema keeps the summary whole: fold the tail in before the mark goes.
    cells = _PG_CELLS if bind.dialect.name == "postgresql" else _SQLITE_CELLS
    mark = "(SELECT seq FROM ledger_usage_mark WHERE id = 1)"
    head = "(SELECT seq FROM ledger_head WHERE id = 1)"
    op.execute(
        "INSERT INTO ledger_usage AS u (hour, principal, purpose, expert, requests, tokens, "
        f"weight) SELECT * FROM ({cells.format(lo=mark, hi=head)}) AS c WHERE true "
        "ON CONFLICT (hour, principal, purpose, expert) DO UPDATE SET "
        "requests = u.requests + excluded.requests, tokens = u.tokens + excluded.tokens, "
        "weight = u.weight + excluded.weight"
    )
    if bind.dialect.name == "postgresql":
        op.execute("ALTER TABLE ledger_usage RESET (fillfactor)")
        op.execute(f"DROP FUNCTION flexgate_ledger_append({NEW_SIGNATURE})")
        op.execute(OLD_APPEND_FUNCTION)
    op.drop_table("ledger_usage_mark")
