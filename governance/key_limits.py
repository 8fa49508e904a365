"""Per-key limits an admin sets: requests per minute, tokens per minute, parallel requests.

The limits are governance data (who may use how much), so they live here beside the keys and
are changed like every other governance change: admin only, one transaction with the ledger
record `key.limits_set`. A key without a row, or a limit left null, takes the server-wide
default from `contracts.settings` (FLEXGATE_RATE_*). Enforcing them is the gateway's job
(`gateway.limits`); the bucket state it keeps is not governance data and has its own table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from audit.db import Base
from governance.changes import change, fresh
from governance.errors import InvalidInput, UnknownKey
from governance.identity import Identity
from governance.models import ApiKey, UtcDateTime
from governance.principals import require_admin

# Far above anything one server serves; refuses typos such as an extra row of zeros.
MAX_LIMIT = 1_000_000_000
LIMIT_NAMES = ("rpm", "tpm", "max_parallel")


class KeyLimit(Base):
    """The limits of one key; a null column means "the server-wide default"."""

    __tablename__ = "key_limits"

    key_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    rpm: Mapped[int | None] = mapped_column(Integer)
    tpm: Mapped[int | None] = mapped_column(Integer)
    max_parallel: Mapped[int | None] = mapped_column(Integer)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime())
    updated_by: Mapped[str] = mapped_column(String(255))


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's own limits (None: the default applies)."""

    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return {"rpm": self.rpm, "tpm": self.tpm, "max_parallel": self.max_parallel}


def check_limits(limits: Limits) -> Limits:
    """InvalidInput unless every limit given is a whole number in 1..MAX_LIMIT."""
    for name in LIMIT_NAMES:
        value = getattr(limits, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInput(f"{name} must be a whole number")
        if not 1 <= value <= MAX_LIMIT:
            raise InvalidInput(f"{name} must be between 1 and {MAX_LIMIT}, not {value}")
    return limits


async def get_limits(session: AsyncSession, key_id: str) -> Limits:
    """The key's own limits (all None when it has none); UnknownKey if there is no such key."""
    if await fresh(session, ApiKey, key_id) is None:
        raise UnknownKey(f"unknown key {key_id!r}")
    row: KeyLimit | None = await fresh(session, KeyLimit, key_id)
    if row is None:
        return Limits()
    return Limits(row.rpm, row.tpm, row.max_parallel)


async def set_limits(
    session: AsyncSession, *, actor: Identity, key_id: str, limits: Limits
) -> Limits:
    """Replace a key's limits (admin only); None fields return to the server default.

    Applies from the key's next admission in every worker (the gateway reads the row then).
    """
    require_admin(actor, "set key limits")
    check_limits(limits)
    async with change(session, actor) as ch:
        key: ApiKey | None = await fresh(session, ApiKey, key_id)
        if key is None:
            raise UnknownKey(f"unknown key {key_id!r}")
        row: KeyLimit | None = await fresh(session, KeyLimit, key_id)
        now = datetime.now(UTC)
        if row is None:
            row = KeyLimit(key_id=key_id, updated_at=now, updated_by=actor.id)
            session.add(row)
        row.rpm, row.tpm, row.max_parallel = limits.rpm, limits.tpm, limits.max_parallel
        row.updated_at, row.updated_by = now, actor.id
        await ch.record(
            "key.limits_set",
            {"key_id": key_id, "principal_id": key.principal_id, **limits.as_dict()},
        )
    return limits


__all__ = [
    "LIMIT_NAMES",
    "MAX_LIMIT",
    "KeyLimit",
    "Limits",
    "check_limits",
    "get_limits",
    "set_limits",
]
