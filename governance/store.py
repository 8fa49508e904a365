"""Per-process policy snapshots, reloaded when the policy version moves.

Every request asks `PolicyStore.snapshot(session)`: one `SELECT version` against the database,
and only when another change has committed since the last load (in this process or any other)
a reload through the Casbin adapter. So a change that has returned to its caller applies to
every request admitted afterwards, in every worker. The snapshot is immutable: a request keeps
deciding with the version it started with, and records that version in its audit record.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from governance import policy
from governance.changes import read_version
from governance.decisions import AllowedSet, CompiledPolicy, Narrowing, decide, identity_subjects
from governance.identity import Identity
from governance.models import Expert
from governance.names import DEFAULT_PURPOSE, ROLE_PREFIX

_ROUTE_MEMO_LIMIT = 4096
_RELOAD_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class ExpertInfo:
    id: str
    position: int
    owner: str | None
    status: str
    description: str


class PolicySnapshot:
    """Everything a request needs to decide, at one policy version."""

    def __init__(self, version: int, experts: Sequence[ExpertInfo], enforcer: Any) -> None:
        self.version = version
        self.experts: tuple[ExpertInfo, ...] = tuple(experts)
        self.expert_ids: tuple[str, ...] = tuple(e.id for e in experts)
        self.enforcer = enforcer
        self.compiled = CompiledPolicy(enforcer, self.expert_ids)
        self._route_ctx = enforcer.new_enforce_context("2")
        self._routes: dict[tuple[frozenset[str], str, str], bool] = {}

    def allowed_experts(
        self,
        principal: str | Identity,
        purpose: str = DEFAULT_PURPOSE,
        at: datetime | None = None,
        narrowing: Narrowing | None = None,
    ) -> AllowedSet:
        """(allowed, excluded) for a principal id, or an Identity whose token carries roles.

        Raises InvalidPurpose / InvalidNarrowing (HTTP 400) on bad input.
        """
        if isinstance(principal, Identity):
            extra = identity_subjects(principal.roles, principal.groups)
            return decide(self.compiled, principal.id, purpose, at, narrowing, extra_subjects=extra)
        return decide(self.compiled, principal, purpose, at, narrowing)

    def authorize(self, roles: Iterable[str], method: str, path: str) -> bool:
        """May a caller with these roles call `method path`? (route policy, p2 rules)."""
        key = (frozenset(roles), method.upper(), path)
        hit = self._routes.get(key)
        if hit is not None:
            return hit
        subjects = [ROLE_PREFIX + r for r in sorted(key[0])] or ["anonymous"]
        allowed = any(
            bool(self.enforcer.enforce(self._route_ctx, sub, path, key[1])) for sub in subjects
        )
        if len(self._routes) >= _ROUTE_MEMO_LIMIT:
            self._routes.clear()
        self._routes[key] = allowed
        return allowed

    def enforce(self, principal: str, expert_id: str, purpose: str, at: datetime) -> bool:
        """Plain Casbin `enforce` for one expert: the reference the fast path must agree with."""
        t = policy.encode_time(at, policy.TIME_MIN)
        return bool(self.enforcer.enforce(principal, expert_id, purpose, t))


async def load_snapshot(
    session: AsyncSession, routes: Sequence[policy.Rule] | None = None
) -> PolicySnapshot:
    """Read experts and rules at one consistent version (re-read if a change slips between)."""
    for _ in range(_RELOAD_ATTEMPTS):
        before = await read_version(session)
        rows = (
            await session.execute(
                select(Expert)
                .where(Expert.position.is_not(None))
                .order_by(Expert.position)
                .execution_options(populate_existing=True)
            )
        ).scalars()
        experts = [
            ExpertInfo(e.id, int(e.position or 0), e.owner_id, e.status, e.description)
            for e in rows
        ]
        enforcer = await policy.load_enforcer(session, routes)
        if await read_version(session) == before:
            # Indexing is CPU work (~0.2 s at 10,000 licenses): keep it off the event loop.
            return await asyncio.to_thread(PolicySnapshot, before, experts, enforcer)
    raise RuntimeError("policy kept changing while loading; try again")


class PolicyStore:
    """The process's current snapshot; one per worker process."""

    def __init__(self, routes: Sequence[policy.Rule] | None = None) -> None:
        self._routes = list(policy.route_rules() if routes is None else routes)
        self._snapshot: PolicySnapshot | None = None
        self._lock = asyncio.Lock()

    @property
    def latest(self) -> PolicySnapshot | None:
        """The last loaded snapshot, without asking the database (None before the first)."""
        return self._snapshot

    async def snapshot(self, session: AsyncSession) -> PolicySnapshot:
        """The snapshot at the database's current version (reloading if it moved)."""
        version = await read_version(session)
        current = self._snapshot
        if current is not None and current.version == version:
            return current
        async with self._lock:
            current = self._snapshot
            if current is not None and current.version >= version:
                return current
            fresh = await load_snapshot(session, self._routes)
            if self._snapshot is None or fresh.version > self._snapshot.version:
                self._snapshot = fresh
            return self._snapshot
