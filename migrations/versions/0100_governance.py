"""Governance: principals, API keys, experts, licenses, denials, policy version, casbin rules.

Revision ID: 0100_governance
Revises: 0001_ledger
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0100_governance"
down_revision: str | None = "0001_ledger"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "principals",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=True),
        sa.Column("roles", JSONType, nullable=False),
        sa.Column("groups", JSONType, nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_principals")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("principal_id", sa.String(length=128), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.Column("revoked_by", sa.String(length=255), nullable=True),
        sa.Column("last_used_at", _ts(), nullable=True),
        sa.ForeignKeyConstraint(
            ["principal_id"],
            ["principals.id"],
            name=op.f("fk_api_keys_principal_id_principals"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
    )
    op.create_index(op.f("ix_api_keys_principal_id"), "api_keys", ["principal_id"])
    op.create_table(
        "experts",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=True),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("declared_owner", sa.String(length=128), nullable=True),
        sa.Column("owner_id", sa.String(length=128), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("registered_at", _ts(), nullable=False),
        sa.Column("withdrawn_at", _ts(), nullable=True),
        sa.CheckConstraint("status IN ('active', 'withdrawn')", name=op.f("ck_experts_status")),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["principals.id"],
            name=op.f("fk_experts_owner_id_principals"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experts")),
    )
    op.create_table(
        "licenses",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("expert_id", sa.String(length=128), nullable=False),
        sa.Column("grantee", sa.String(length=140), nullable=False),
        sa.Column("purposes", JSONType, nullable=False),
        sa.Column("valid_from", _ts(), nullable=True),
        sa.Column("expires_at", _ts(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("granted_by", sa.String(length=255), nullable=False),
        sa.Column("granted_at", _ts(), nullable=False),
        sa.Column("revoked_at", _ts(), nullable=True),
        sa.Column("revoked_by", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_licenses_expert_id_experts"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_licenses")),
    )
    op.create_index(op.f("ix_licenses_expert_id"), "licenses", ["expert_id"])
    op.create_table(
        "denials",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("expert_id", sa.String(length=128), nullable=False),
        sa.Column("grantee", sa.String(length=140), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.Column("created_at", _ts(), nullable=False),
        sa.Column("lifted_at", _ts(), nullable=True),
        sa.Column("lifted_by", sa.String(length=255), nullable=True),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name=op.f("fk_denials_expert_id_experts"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_denials")),
    )
    op.create_index(op.f("ix_denials_expert_id"), "denials", ["expert_id"])
    state = op.create_table(
        "policy_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("changed_at", _ts(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_policy_state")),
    )
    op.bulk_insert(state, [{"id": 1, "version": 0, "changed_at": datetime.now(UTC)}])
    op.create_table(
        "casbin_rule",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ptype", sa.String(length=255), nullable=True),
        sa.Column("v0", sa.String(length=255), nullable=True),
        sa.Column("v1", sa.String(length=255), nullable=True),
        sa.Column("v2", sa.String(length=255), nullable=True),
        sa.Column("v3", sa.String(length=255), nullable=True),
        sa.Column("v4", sa.String(length=255), nullable=True),
        sa.Column("v5", sa.String(length=255), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_casbin_rule")),
    )
    op.create_index("ix_casbin_rule_ptype_v0_v1", "casbin_rule", ["ptype", "v0", "v1"])


def downgrade() -> None:
    op.drop_index("ix_casbin_rule_ptype_v0_v1", table_name="casbin_rule")
    op.drop_table("casbin_rule")
    op.drop_table("policy_state")
    op.drop_index(op.f("ix_denials_expert_id"), table_name="denials")
    op.drop_table("denials")
    op.drop_index(op.f("ix_licenses_expert_id"), table_name="licenses")
    op.drop_table("licenses")
    op.drop_table("experts")
    op.drop_index(op.f("ix_api_keys_principal_id"), table_name="api_keys")
    op.drop_table("api_keys")
    op.drop_table("principals")
