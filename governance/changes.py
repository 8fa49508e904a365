"""One governance change = one transaction: policy-version bump, domain rows, Casbin rules and
the ledger record commit together or not at all.

The version row is bumped first. That takes the write lock (SQLite) or the row lock
(PostgreSQL) before anything is read, which serialises governance writers across coroutines
and processes: checks such as "duplicate grant" then see every committed change, and no
SQLite writer can fail on a stale read snapshot. Ledger appends lock the chain head after it,
always in that order, so writers cannot deadlock.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from audit import ledger
from audit.ledger import Entry
from governance.errors import GovernanceError
from governance.identity import Identity
from governance.models import POLICY_STATE_ID, PolicyState

log = logging.getLogger(__name__)

AfterCommit = Callable[[], Awaitable[None] | None]


class _NothingToDo(Exception):
    """Raised by Change.cancel(): roll back quietly (the version bump included)."""


@dataclass
class Change:
    """The open transaction of one change, at the policy version it will commit."""

    session: AsyncSession
    version: int
    actor: Identity
    entries: list[Entry] = field(default_factory=list)
    _after: list[AfterCommit] = field(default_factory=list)

    async def record(self, kind: str, payload: dict[str, Any]) -> Entry:
        """Append the ledger record of this change inside its transaction."""
        body = {**payload, "policy_version": self.version, "actor_via": self.actor.via}
        entry = await ledger.append(self.session, kind=kind, principal=self.actor.id, payload=body)
        self.entries.append(entry)
        return entry

    def after_commit(self, hook: AfterCommit) -> None:
        """Run `hook` once the change has committed (never if it rolls back)."""
        self._after.append(hook)

    def cancel(self) -> None:
        """Nothing needs changing after all: roll back without error or version bump."""
        raise _NothingToDo


_VERSION = select(PolicyState.__table__.c.version).where(
    PolicyState.__table__.c.id == POLICY_STATE_ID
)
"""Built once: every request reads the version, and building the statement (ORM attribute
comparisons, coercions) cost more than running it."""


async def read_version(session: AsyncSession) -> int:
    return _version((await session.execute(_VERSION)).scalar_one_or_none())


def read_version_sync(connection: Connection) -> int:
    """`read_version` on a synchronous connection (gateway.versions' SQLite path)."""
    return _version(connection.execute(_VERSION).scalar_one_or_none())


def _version(value: int | None) -> int:
    if value is None:
        raise RuntimeError("policy_state row is missing: run `flexgate db upgrade`")
    return int(value)


async def _bump(session: AsyncSession) -> int:
    value = (
        await session.execute(
            update(PolicyState)
            .where(PolicyState.id == POLICY_STATE_ID)
            .values(version=PolicyState.version + 1, changed_at=datetime.now(UTC))
            .returning(PolicyState.version)
        )
    ).scalar_one_or_none()
    if value is None:
        raise RuntimeError("policy_state row is missing: run `flexgate db upgrade`")
    return int(value)


async def _end_read_transaction(session: AsyncSession) -> None:
    """Close a read-only transaction the caller left open (authentication reads, say)."""
    if not session.in_transaction():
        return
    if session.new or session.dirty or session.deleted:
        raise GovernanceError(
            "the session holds uncommitted changes; a governance change runs in its own transaction"
        )
    await session.commit()


@asynccontextmanager
async def change(session: AsyncSession, actor: Identity) -> AsyncIterator[Change]:
    """Open the transaction of one change; it commits when the block ends without error."""
    await _end_read_transaction(session)
    hooks: list[AfterCommit] = []
    try:
        async with session.begin():
            ch = Change(session=session, version=await _bump(session), actor=actor)
            yield ch
            await session.flush()
            hooks = ch._after
    except _NothingToDo:
        return
    for hook in hooks:
        try:
            result = hook()
            if result is not None:
                await result
        except Exception:  # the change is committed; a failing listener must not undo it
            log.exception("after-commit hook failed")


async def fresh(session: AsyncSession, model: type[Any], key: Any) -> Any:
    """`session.get` that re-reads the row even if the session has it cached.

    Sessions keep objects across commits (expire_on_commit=False), so a plain `get` could
    answer from a copy older than another process's committed change.
    """
    return await session.get(model, key, populate_existing=True)
