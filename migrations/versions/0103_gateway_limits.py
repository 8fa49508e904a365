"""Gateway: per-key limits (governance.key_limits) and the shared rate-limit state (gateway.limits).

- `key_limits`: an admin's rpm / tpm / max_parallel for one key (null: the server default).
- `rate_buckets`: each key's two token buckets (requests, tokens) as of `at` (epoch seconds),
  shared by every worker so that a limit holds across processes.
- `rate_leases`: one row per running request of a limited key, with its process and expiry.

Revision ID: 0103_gateway_limits
Revises: 0102
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0103_gateway_limits"
down_revision: str | None = "0102"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "key_limits",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("rpm", sa.Integer(), nullable=True),
        sa.Column("tpm", sa.Integer(), nullable=True),
        sa.Column("max_parallel", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by", sa.String(length=255), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"],
            ["api_keys.id"],
            name=op.f("fk_key_limits_key_id_api_keys"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_key_limits")),
    )
    op.create_table(
        "rate_buckets",
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("requests", sa.Float(), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_rate_buckets")),
    )
    op.create_table(
        "rate_leases",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=160), nullable=False),
        sa.Column("owner", sa.String(length=300), nullable=False),
        sa.Column("started", sa.Float(), nullable=False),
        sa.Column("expires", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_leases")),
    )
    op.create_index(op.f("ix_rate_leases_key"), "rate_leases", ["key"])


def downgrade() -> None:
    op.drop_index(op.f("ix_rate_leases_key"), table_name="rate_leases")
    op.drop_table("rate_leases")
    op.drop_table("rate_buckets")
    op.drop_table("key_limits")
