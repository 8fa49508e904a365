"""Governance tables, declared on the shared `audit.db.Base` and created by migrations/ only.

The domain tables (principals, keys, experts, licenses, denials) are the human-readable record
with ids, authors and revocation times. `casbin_rule` holds the same decisions in Casbin form;
the enforcer loads it through the SQLAlchemy adapter, and every service writes both in one
transaction with the policy-version bump and the ledger record.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column

from audit.db import Base

# JSONB on PostgreSQL, JSON text on SQLite (the same choice as the ledger).
JSONType = JSON().with_variant(JSONB(), "postgresql")

POLICY_STATE_ID = 1


class UtcDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no time zone type and hands back naive values; comparing those with aware ones
    raises, so values are normalised to UTC on the way in and tagged UTC on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: pass an aware (UTC) datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Principal(Base):
    """An application, data owner, compliance officer or admin (DESIGN.md, "Roles")."""

    __tablename__ = "principals"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    display_name: Mapped[str | None] = mapped_column(String(255))
    roles: Mapped[list[str]] = mapped_column(JSONType)
    groups: Mapped[list[str]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    created_by: Mapped[str] = mapped_column(String(255))


class ApiKey(Base):
    """An API key: only the SHA-256 of the whole key is kept; `id` is its public lookup prefix."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    principal_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("principals.id", ondelete="RESTRICT"), index=True
    )
    secret_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    created_by: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    revoked_by: Mapped[str | None] = mapped_column(String(255))
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Expert(Base):
    """One expert of the served model, in router-row order (`position`; None when absent)."""

    __tablename__ = "experts"
    __table_args__ = (CheckConstraint("status IN ('active', 'withdrawn')", name="status"),)

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    position: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str] = mapped_column(Text)
    declared_owner: Mapped[str | None] = mapped_column(String(128))
    owner_id: Mapped[str | None] = mapped_column(
        String(128), ForeignKey("principals.id", ondelete="RESTRICT")
    )
    status: Mapped[str] = mapped_column(String(16))
    registered_at: Mapped[datetime] = mapped_column(UtcDateTime())
    withdrawn_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class License(Base):
    """A grant of one expert to a grantee for purposes within an optional validity window."""

    __tablename__ = "licenses"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    expert_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("experts.id", ondelete="RESTRICT"), index=True
    )
    grantee: Mapped[str] = mapped_column(String(140))
    purposes: Mapped[list[str]] = mapped_column(JSONType)
    valid_from: Mapped[datetime | None] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    note: Mapped[str | None] = mapped_column(Text)
    granted_by: Mapped[str] = mapped_column(String(255))
    granted_at: Mapped[datetime] = mapped_column(UtcDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    revoked_by: Mapped[str | None] = mapped_column(String(255))


class Denial(Base):
    """A deny rule: the grantee may not use the expert, whatever licenses say."""

    __tablename__ = "denials"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    expert_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("experts.id", ondelete="RESTRICT"), index=True
    )
    grantee: Mapped[str] = mapped_column(String(140))
    created_by: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime())
    lifted_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    lifted_by: Mapped[str | None] = mapped_column(String(255))


class PolicyState(Base):
    """One row: the policy version every change bumps in its own transaction.

    Its row lock (PostgreSQL) / the write lock it takes (SQLite) also serialises governance
    writers, so checks such as "duplicate grant" see every committed change.
    """

    __tablename__ = "policy_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger)
    changed_at: Mapped[datetime] = mapped_column(UtcDateTime())


class CasbinRule(Base):
    """The Casbin adapter's table (same columns as casbin_async_sqlalchemy_adapter.CasbinRule).

    Declared here so that Alembic owns it; the adapter gets this class as `db_class` and its
    own `create_table` is never called.
    """

    __tablename__ = "casbin_rule"
    __table_args__ = (Index("ix_casbin_rule_ptype_v0_v1", "ptype", "v0", "v1"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    ptype: Mapped[str | None] = mapped_column(String(255))
    v0: Mapped[str | None] = mapped_column(String(255))
    v1: Mapped[str | None] = mapped_column(String(255))
    v2: Mapped[str | None] = mapped_column(String(255))
    v3: Mapped[str | None] = mapped_column(String(255))
    v4: Mapped[str | None] = mapped_column(String(255))
    v5: Mapped[str | None] = mapped_column(String(255))

    def __str__(self) -> str:
        # The adapter parses this text back with casbin.persist.load_policy_line.
        values = [self.v0, self.v1, self.v2, self.v3, self.v4, self.v5]
        parts = [str(self.ptype)]
        for v in values:
            if v is None:
                break
            parts.append(v)
        return ", ".join(parts)
