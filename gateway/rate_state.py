"""The rate limiter's shared state (tables of migration 0103; gateway.limits uses them).

Kept apart from gateway.limits so that the migration environment can register these tables
without importing the web framework.
"""

from __future__ import annotations

from sqlalchemy import Float, String
from sqlalchemy.orm import Mapped, mapped_column

from audit.db import Base


class RateBucket(Base):
    """A key's two token buckets as of `at` (epoch seconds); levels may go below zero (debt)."""

    __tablename__ = "rate_buckets"

    key: Mapped[str] = mapped_column(String(160), primary_key=True)
    requests: Mapped[float] = mapped_column(Float)
    tokens: Mapped[float] = mapped_column(Float)
    at: Mapped[float] = mapped_column(Float)


class RateLease(Base):
    """One running request of a key, held by the process `owner` (host:pid) until `expires`."""

    __tablename__ = "rate_leases"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    key: Mapped[str] = mapped_column(String(160), index=True)
    owner: Mapped[str] = mapped_column(String(300))
    started: Mapped[float] = mapped_column(Float)
    expires: Mapped[float] = mapped_column(Float)
