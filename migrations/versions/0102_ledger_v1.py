"""Audit ledger format v1; the derived tables protected on PostgreSQL.

- Ledger format v1 (RFC 8785 canonical JSON, the versioned record hash
  `SHA-256("flexgate-record/v1\n" || prev_hash || JCS(body))`, docs/audit.md) cannot verify
  records written in the earlier format, and rewriting them would destroy the evidence. The
  upgrade therefore refuses a ledger whose first record is not v1 (a development ledger:
  export it with the earlier release, then start a new database); an empty ledger, or one
  already v1 (downgraded and upgraded again), passes.
- PostgreSQL: triggers on the tables derived from the records, which appends and folds
  change, refuse what neither ever does: deleting or truncating them, moving the chain head
  or the usage watermark backwards, making a usage cell smaller or renaming its key.
  (`audit verify` recomputes them in any case: a superuser can disable triggers.)

Revision ID: 0102
Revises: 0101_ledger_pipeline
Create Date: 2026-12-01
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0102"
down_revision: str | None = "0101_ledger_pipeline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# A frozen copy of the v1 record hash over stored columns (a migration never imports
# application code, which keeps changing after it); string fields go through json.dumps.
RECORD_DOMAIN = "flexgate-record/v1\n"

GUARDS = {
    "ledger_head": """
        IF TG_OP = 'UPDATE' AND NEW.id = OLD.id AND NEW.seq >= OLD.seq THEN RETURN NEW; END IF;
    """,
    "ledger_usage_mark": """
        IF TG_OP = 'UPDATE' AND NEW.id = OLD.id AND NEW.seq >= OLD.seq
           AND NEW.seq <= (SELECT seq FROM ledger_head WHERE id = 1) THEN RETURN NEW; END IF;
    """,
    "ledger_usage": """
        IF TG_OP = 'UPDATE'
           AND (NEW.hour, NEW.principal, NEW.purpose, NEW.expert)
               = (OLD.hour, OLD.principal, OLD.purpose, OLD.expert)
           AND NEW.requests >= OLD.requests AND NEW.tokens >= OLD.tokens
           AND NEW.weight >= OLD.weight THEN RETURN NEW; END IF;
    """,
}


def _v1_hash(row: sa.Row[tuple[int, str, str, str, str | None, str, str]]) -> str:
    import json

    seq, rid, kind, at, principal, payload, prev = row
    p = "null" if principal is None else json.dumps(principal, ensure_ascii=False)
    s = lambda v: json.dumps(v, ensure_ascii=False)  # noqa: E731
    body = (
        f'{{"at":{s(at)},"id":{s(rid)},"kind":{s(kind)},"payload":{payload},'
        f'"principal":{p},"seq":{seq}}}'
    )
    return hashlib.sha256((RECORD_DOMAIN + prev + body).encode("utf-8")).hexdigest()


def upgrade() -> None:
    bind = op.get_bind()
    first = bind.execute(
        sa.text(
            "SELECT seq, id, kind, at, principal, payload, prev_hash, hash FROM ledger_records "
            "ORDER BY seq LIMIT 1"
        )
    ).first()
    if first is not None and _v1_hash(first[:7]) != first[7]:
        count = bind.execute(sa.text("SELECT count(*) FROM ledger_records")).scalar()
        raise RuntimeError(
            f"this database's ledger holds {count} records in the format before v1, which "
            "this version cannot verify: export them with the release that wrote them "
            "(`flexgate audit export`), keep the export, and start a new database"
        )
    if bind.dialect.name != "postgresql":
        return
    for table, allowed in GUARDS.items():
        op.execute(
            f"""
            CREATE FUNCTION {table}_guard() RETURNS trigger AS $$
            BEGIN
                {allowed.strip()}
                RAISE EXCEPTION '%: % refused (derived from the ledger)', TG_TABLE_NAME, TG_OP;
            END;
            $$ LANGUAGE plpgsql
            """
        )
        op.execute(
            f"CREATE TRIGGER {table}_guard BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION {table}_guard()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {table}_guard()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table in GUARDS:
        op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        op.execute(f"DROP TRIGGER IF EXISTS {table}_guard ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {table}_guard()")
