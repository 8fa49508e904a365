"""The hourly usage summary, folded from the records behind a watermark.

`ledger_usage` holds usage by (hour, principal, purpose, expert) of the inference records up
to seq `ledger_usage_mark.seq`; the records after it (the *tail*) are not in it yet. Keeping
the summary in every append's transaction cost PostgreSQL ~150 conflicting upserts per
32-record batch (~2 ms, more than half of the server's time per batch) and held the head lock
meanwhile; folding instead rolls a few thousand records into the summary at once, outside the
appends' critical section, so each summary row is touched once per fold rather than once per
batch.

- `fold_usage(conn)` folds the committed records after the mark into the summary and moves
  the mark, in one transaction: idempotent (the mark says what is already in), and safe with
  any number of folders and appenders (it takes the mark row's lock first; on PostgreSQL it
  skips if another transaction holds it, since that one is folding). Appenders fold when
  their batch crosses a multiple of `FOLD_EVERY` (the writer in a background transaction of
  its own; an in-transaction append in its caller's transaction), and the writer once more
  when it closes, so the tail stays near `FOLD_EVERY` records.
- `usage_cells(dialect)` is the summary as of now: the summary rows plus the tail aggregated
  from the records, in one statement (one snapshot, so a fold committing meanwhile can neither
  double-count nor drop records). Aggregation reads at most a few thousand records besides the
  summary, whatever the ledger's size.

Folding and the tail read the payloads with the database's JSON functions, the same reading
as `audit.ledger.inference_usage` (which every inference record passed before it was
appended): purpose (default `general`), and per expert tokens and weight; an expert counts
as used by a request when its tokens or weight are non-zero; `expert = ""` rows hold each
request's totals, `principal = ""` stands for none.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Double, String, select, text, union_all
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Subquery

from audit.models import LedgerUsage

FOLD_EVERY = 4096  # an appender whose batch crosses a multiple of this seq folds

# Per-expert cells and per-request totals of the inference records with lo < seq <= hi.
# `{lo}` and `{hi}` are SQL expressions (bind parameters or subqueries).
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

_MARK = "(SELECT seq FROM ledger_usage_mark WHERE id = 1)"
_ALL = "9223372036854775807"


def cells_sql(dialect: str, lo: str, hi: str) -> str:
    """The cells of the inference records with lo < seq <= hi (SQL expressions)."""
    return (_PG_CELLS if dialect == "postgresql" else _SQLITE_CELLS).format(lo=lo, hi=hi)


def usage_cells(dialect: str) -> Subquery:
    """(hour, principal, purpose, expert, requests, tokens, weight) of every inference record
    committed: the summary rows and the aggregated tail, unioned (a cell may appear twice)."""
    tail = (
        text(cells_sql(dialect, _MARK, _ALL))
        .columns(
            hour=String,
            principal=String,
            purpose=String,
            expert=String,
            requests=BigInteger,
            tokens=BigInteger,
            weight=Double,
        )
        .subquery("tail")
    )
    summary = select(
        LedgerUsage.hour,
        LedgerUsage.principal,
        LedgerUsage.purpose,
        LedgerUsage.expert,
        LedgerUsage.requests,
        LedgerUsage.tokens,
        LedgerUsage.weight,
    )
    return union_all(summary, select(*tail.c)).subquery("cells")


async def fold_usage(conn: AsyncConnection, *, wait: bool = False) -> int | None:
    """Fold the committed records after the mark into the summary, in `conn`'s transaction.

    Returns the new mark, or None when another transaction is folding (PostgreSQL: the mark
    row is locked) and `wait` is false; with `wait`, folds after that one, whatever it left.
    Commit to make it count; a rollback undoes it all.
    """
    pg = conn.dialect.name == "postgresql"
    if pg:
        lock = "SELECT seq FROM ledger_usage_mark WHERE id = 1 FOR UPDATE" + (
            "" if wait else " SKIP LOCKED"
        )
    else:  # a write first: takes SQLite's write lock before anything is read
        lock = "UPDATE ledger_usage_mark SET seq = seq WHERE id = 1 RETURNING seq"
    row = (await conn.execute(text(lock))).first()
    if row is None:
        return None
    mark = int(row[0])
    # Every record up to the committed head is committed (a record commits with the head
    # move that covers it), so (mark, head] is a gap-free run of committed records.
    head = int((await conn.execute(text("SELECT seq FROM ledger_head WHERE id = 1"))).scalar_one())
    if head <= mark:
        return mark
    # `WHERE true`: SQLite's grammar needs it to read ON CONFLICT as the upsert's.
    fold: Any = text(
        "INSERT INTO ledger_usage AS u (hour, principal, purpose, expert, requests, tokens, "
        "weight) "
        f"SELECT * FROM ({cells_sql(conn.dialect.name, ':lo', ':hi')}) AS c WHERE true "
        "ON CONFLICT (hour, principal, purpose, expert) DO UPDATE SET "
        "requests = u.requests + excluded.requests, tokens = u.tokens + excluded.tokens, "
        "weight = u.weight + excluded.weight"
    )
    await conn.execute(fold, {"lo": mark, "hi": head})
    await conn.execute(text("UPDATE ledger_usage_mark SET seq = :seq WHERE id = 1"), {"seq": head})
    return head


def fold_due(before: int, after: int) -> bool:
    """Whether a batch that moved the head from `before` to `after` should fold."""
    return before // FOLD_EVERY != after // FOLD_EVERY
