"""Per-key rate limits that hold across every worker sharing the database.

Three limits per key (governance.key_limits; unset ones take FLEXGATE_RATE_* defaults, 0 is
"off"): requests per minute and tokens per minute (prompt + completion) as token buckets, and
requests running at once. The bucket state lives in the database (`rate_buckets`, one row per
key) and each running request holds a lease row (`rate_leases`), so N workers of one server,
or servers on several hosts sharing one PostgreSQL, draw from the same buckets:

- admission is one short transaction that locks the key's bucket row (PostgreSQL: row lock;
  SQLite: the write lock, taken by the transaction's first statement), refills it for the time
  since it was last touched, checks the three limits and takes one request, the estimated
  tokens (prompt + max_tokens) and a lease;
- `Admission.release(actual_tokens)` drops the lease and settles the token bucket with what the
  request really used (refund or debt).

Clocks: refill uses each process's wall clock. Workers of one host share it; hosts must keep
their clocks in step (NTP), and a host whose clock runs behind refills a little late, never
more than the bucket holds. A worker that dies holding leases: its leases expire after
FLEXGATE_RATE_LEASE_SECONDS, and a server starting on the same host drops the leases of dead
processes at once (`reap_dead_leases`). The state is not ledger data: its transactions run
with relaxed durability (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off); a
crash can lose the last few milliseconds of bucket updates, which only errs towards the caller.
"""

from __future__ import annotations

import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, event, func, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit.db import is_sqlite, make_engine, make_sessionmaker
from contracts.settings import Settings
from gateway.errors import RATE_LIMIT, ApiError
from gateway.rate_state import RateBucket, RateLease
from governance.identity import Identity
from governance.key_limits import KeyLimit

WINDOW_S = 60.0  # rpm and tpm are per minute


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """The limits in force for one key (0: off)."""

    rpm: int
    tpm: int
    max_parallel: int

    @property
    def off(self) -> bool:
        return not (self.rpm or self.tpm or self.max_parallel)


def go_duration(seconds: float) -> str:
    """`x-ratelimit-reset-*` values as OpenAI writes them: 20ms, 1.5s, 6m0s."""
    seconds = max(0.0, seconds)
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(seconds, 60.0)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


def _refill(level: float, capacity: int, elapsed: float) -> float:
    return min(float(capacity), level + max(0.0, elapsed) * capacity / WINDOW_S)


def _headers(limits: EffectiveLimits, requests: float, tokens: float) -> dict[str, str]:
    out: dict[str, str] = {}
    if limits.rpm:
        out["x-ratelimit-limit-requests"] = str(limits.rpm)
        out["x-ratelimit-remaining-requests"] = str(max(0, math.floor(requests)))
        out["x-ratelimit-reset-requests"] = go_duration(
            (limits.rpm - requests) * WINDOW_S / limits.rpm
        )
    if limits.tpm:
        out["x-ratelimit-limit-tokens"] = str(limits.tpm)
        out["x-ratelimit-remaining-tokens"] = str(max(0, math.floor(tokens)))
        out["x-ratelimit-reset-tokens"] = go_duration((limits.tpm - tokens) * WINDOW_S / limits.tpm)
    return out


class RateLimited(ApiError):
    """A request over one of its key's limits: HTTP 429 with Retry-After and x-ratelimit-*.

    `limit` is "requests", "tokens" or "parallel"; `retry_after` whole seconds (None: the
    request can never pass, it asks for more tokens than a minute holds).
    """

    def __init__(
        self,
        message: str,
        *,
        limit: str,
        retry_after: int | None,
        headers: Mapping[str, str],
    ) -> None:
        out = dict(headers)
        if retry_after is not None:
            out["Retry-After"] = str(retry_after)
        super().__init__(
            429,
            message,
            type=RATE_LIMIT,
            code="rate_limit_exceeded" if retry_after is not None else "request_too_large",
            param="max_tokens" if retry_after is None else None,
            headers=out,
        )
        self.limit = limit
        self.retry_after = retry_after


@dataclass
class Admission:
    """A request admitted under its key's limits; `release` it when the request ends."""

    limiter: Limiter | None
    key: str
    limits: EffectiveLimits
    estimated_tokens: int
    lease_id: str | None
    _headers: dict[str, str] = field(default_factory=dict)
    _released: bool = False

    def headers(self) -> dict[str, str]:
        """The `x-ratelimit-*` headers of the response (as of admission)."""
        return dict(self._headers)

    async def release(self, actual_tokens: int | None = None) -> None:
        """Drop the lease; settle the token bucket with the tokens really used.

        `actual_tokens` None keeps the estimate. Idempotent: a second call does nothing.
        """
        if self._released:
            return
        self._released = True
        if self.limiter is not None:
            used = self.estimated_tokens if actual_tokens is None else max(0, int(actual_tokens))
            await self.limiter._release(self, used)

    async def __aenter__(self) -> Admission:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


def bucket_key(identity: Identity, key_id: str | None) -> str:
    """The bucket of a request: its API key, else (JWT callers) its principal."""
    return f"key:{key_id}" if key_id else f"principal:{identity.id}"


def process_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _relaxed_sqlite(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class Limiter:
    """The limits of one process; one per worker, sharing state through the database."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: AsyncEngine | None = None,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self._own_engine = engine is None
        self.engine = engine if engine is not None else make_engine(settings.database_url)
        if self._own_engine and is_sqlite(settings.database_url):
            event.listen(self.engine.sync_engine, "connect", _relaxed_sqlite)
        self._sessions: async_sessionmaker[AsyncSession] = make_sessionmaker(self.engine)
        self._pg = not is_sqlite(settings.database_url)
        self.clock = clock
        self.owner = owner or process_owner()
        self.defaults = EffectiveLimits(
            settings.rate_rpm, settings.rate_tpm, settings.rate_max_parallel
        )

    async def close(self) -> None:
        if self._own_engine:
            await self.engine.dispose()

    async def _begin(self, session: AsyncSession) -> None:
        if self._pg:
            await session.execute(text("SET LOCAL synchronous_commit = off"))

    async def limits_for(self, session: AsyncSession, key_id: str | None) -> EffectiveLimits:
        row = None if key_id is None else await session.get(KeyLimit, key_id)
        d = self.defaults
        if row is None:
            return d
        return EffectiveLimits(
            d.rpm if row.rpm is None else row.rpm,
            d.tpm if row.tpm is None else row.tpm,
            d.max_parallel if row.max_parallel is None else row.max_parallel,
        )

    async def admit(
        self, identity: Identity, key_id: str | None, estimated_tokens: int
    ) -> Admission:
        """Admit one request of `estimated_tokens` (prompt + max_tokens), or RateLimited."""
        key = bucket_key(identity, key_id)
        estimated = max(0, int(estimated_tokens))
        insert = pg_insert if self._pg else sqlite_insert
        async with self._sessions() as session, session.begin():
            await self._begin(session)
            # A write first: it takes SQLite's write lock before anything is read, so the
            # read below cannot go stale (the same order as governance.changes).
            await session.execute(
                insert(RateBucket)
                .values(key=key, requests=0.0, tokens=0.0, at=0.0)
                .on_conflict_do_nothing(index_elements=["key"])
            )
            limits = await self.limits_for(session, key_id)
            if limits.off:
                return Admission(None, key, limits, estimated, None)
            row = (
                await session.execute(
                    select(RateBucket.requests, RateBucket.tokens, RateBucket.at)
                    .where(RateBucket.key == key)
                    .with_for_update()
                )
            ).one()
            now = self.clock()
            elapsed = now - float(row.at)
            requests = _refill(float(row.requests), limits.rpm, elapsed) if limits.rpm else 0.0
            tokens = _refill(float(row.tokens), limits.tpm, elapsed) if limits.tpm else 0.0
            headers = _headers(limits, requests, tokens)
            if limits.max_parallel:
                running = await session.scalar(
                    select(func.count())
                    .select_from(RateLease)
                    .where(RateLease.key == key, RateLease.expires > now)
                )
                if int(running or 0) >= limits.max_parallel:
                    raise RateLimited(
                        f"too many requests at once: this key may run {limits.max_parallel} "
                        "at a time",
                        limit="parallel",
                        retry_after=1,
                        headers=headers,
                    )
            if limits.rpm and requests < 1.0:
                wait = (1.0 - requests) * WINDOW_S / limits.rpm
                raise RateLimited(
                    f"rate limit reached: {limits.rpm} requests per minute for this key",
                    limit="requests",
                    retry_after=max(1, math.ceil(wait)),
                    headers=headers,
                )
            if limits.tpm and estimated > limits.tpm:
                raise RateLimited(
                    f"request too large: it may use {estimated} tokens (prompt + max_tokens), "
                    f"this key's limit is {limits.tpm} tokens per minute",
                    limit="tokens",
                    retry_after=None,
                    headers=headers,
                )
            if limits.tpm and tokens < estimated:
                wait = (estimated - tokens) * WINDOW_S / limits.tpm
                raise RateLimited(
                    f"rate limit reached: {limits.tpm} tokens per minute for this key "
                    f"(this request may use {estimated})",
                    limit="tokens",
                    retry_after=max(1, math.ceil(wait)),
                    headers=headers,
                )
            if limits.rpm:
                requests -= 1.0
            if limits.tpm:
                tokens -= estimated
            await session.execute(
                update(RateBucket)
                .where(RateBucket.key == key)
                .values(requests=requests, tokens=tokens, at=now)
            )
            lease_id: str | None = None
            if limits.max_parallel:
                lease_id = uuid.uuid4().hex
                session.add(
                    RateLease(
                        id=lease_id,
                        key=key,
                        owner=self.owner,
                        started=now,
                        expires=now + self.settings.rate_lease_seconds,
                    )
                )
        return Admission(self, key, limits, estimated, lease_id, _headers(limits, requests, tokens))

    async def _release(self, admission: Admission, used: int) -> None:
        delta = admission.estimated_tokens - used
        if admission.lease_id is None and not (admission.limits.tpm and delta):
            return
        async with self._sessions() as session, session.begin():
            await self._begin(session)
            if admission.lease_id is not None:
                await session.execute(delete(RateLease).where(RateLease.id == admission.lease_id))
            if admission.limits.tpm and delta:
                await session.execute(
                    update(RateBucket)
                    .where(RateBucket.key == admission.key)
                    .values(tokens=RateBucket.tokens + delta)
                )

    async def reap_dead_leases(self) -> int:
        """Drop leases held by processes of this host that no longer run (server start)."""
        host = self.owner.rsplit(":", 1)[0]
        async with self._sessions() as session, session.begin():
            owners = (
                await session.execute(
                    select(RateLease.owner).where(RateLease.owner.like(f"{host}:%")).distinct()
                )
            ).scalars()
            dead = [o for o in owners if not _alive(o)]
            if not dead:
                return 0
            result = await session.execute(delete(RateLease).where(RateLease.owner.in_(dead)))
            return int(getattr(result, "rowcount", 0) or 0)


def _alive(owner: str) -> bool:
    try:
        pid = int(owner.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


__all__ = [
    "Admission",
    "EffectiveLimits",
    "Limiter",
    "RateBucket",
    "RateLease",
    "RateLimited",
    "bucket_key",
    "go_duration",
]
