"""Per-key rate limits that hold across every worker sharing the database.

Three limits per key (governance.key_limits; unset ones take FLEXGATE_RATE_* defaults, 0 is
"off"): requests per minute and tokens per minute (prompt + completion) as token buckets, and
requests running at once. The bucket state lives in the database (`rate_buckets`, one row per
key) and each running request holds a lease row (`rate_leases`), so N workers of one server,
or servers on several hosts sharing one PostgreSQL, draw from the same buckets:

- admission locks the key's bucket row (PostgreSQL: row lock; SQLite: the write lock, taken
  by the transaction's first statement), refills it for the time since it was last touched,
  checks the three limits and takes one request, the estimated tokens (prompt + max_tokens)
  and a lease;
- `Admission.release(actual_tokens)` drops the lease and settles the token bucket with what the
  request really used (refund or debt). The gateway calls `release_soon` once the record is
  durable, so the response does not wait for it.

Each worker queues its admissions and releases and applies all those waiting at once in one
short transaction (`Limiter`), in arrival order, so a release is always applied before the
same worker's later admissions, and under load a worker pays one transaction per batch.

A key's limits are read once per policy version (`policy_version` of `admit`): setting them
is a governance change, which moves the version. A key whose three limits are off costs no
database work at all.

Clocks: refill uses each process's wall clock. Workers of one host share it; hosts must keep
their clocks in step (NTP), and a host whose clock runs behind refills a little late, never
more than the bucket holds. A worker that dies holding leases: its leases expire after
FLEXGATE_RATE_LEASE_SECONDS, and a server starting on the same host drops the leases of dead
processes at once (`reap_dead_leases`). The state is not ledger data: its transactions run
with relaxed durability (SQLite synchronous=NORMAL, PostgreSQL synchronous_commit=off); a
crash can lose the last few milliseconds of bucket updates, which only errs towards the caller.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit.db import (
    SqliteThread,
    is_sqlite,
    make_engine,
    make_sessionmaker,
    translate_errors,
)
from contracts.settings import Settings
from gateway.errors import RATE_LIMIT, ApiError
from gateway.rate_state import RateBucket, RateLease
from governance.identity import Identity
from governance.key_limits import KeyLimit

log = logging.getLogger(__name__)

WINDOW_S = 60.0  # rpm and tpm are per minute
_LIMITS_MEMO = 4096


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
        done = self._queue_release(actual_tokens)
        if done is not None:
            await done

    def release_soon(self, actual_tokens: int | None = None) -> None:
        """`release` without waiting for it, so that a response need not wait: it is queued
        at once, before any later admission of this process (a client's next request never
        meets its own lease); other processes see the lease go a few milliseconds later,
        which can only refuse too much, never admit it. A failure is logged."""
        done = self._queue_release(actual_tokens)
        if done is not None:
            done.add_done_callback(_log_failure)

    def _queue_release(self, actual_tokens: int | None) -> asyncio.Future[None] | None:
        if self._released:
            return None
        self._released = True
        if self.limiter is None:
            return None
        used = self.estimated_tokens if actual_tokens is None else max(0, int(actual_tokens))
        return self.limiter._release(self, used)

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


_EMPTY = {"requests": 0.0, "tokens": 0.0, "at": 0.0}


class _Statements:
    """The limiter's statements, built once (Core, on the tables; only parameters vary)."""

    def __init__(self, postgresql: bool) -> None:
        buckets = cast(Table, RateBucket.__table__)
        leases = cast(Table, RateLease.__table__)
        insert = pg_insert if postgresql else sqlite_insert
        upsert = insert(buckets)
        self.lock = upsert.on_conflict_do_update(
            index_elements=[buckets.c.key], set_={"at": buckets.c.at}
        ).returning(buckets.c.requests, buckets.c.tokens, buckets.c.at)
        self.store = (
            update(buckets)
            .where(buckets.c.key == bindparam("b_key"))
            .values(
                requests=bindparam("b_requests"),
                tokens=bindparam("b_tokens"),
                at=bindparam("b_at"),
            )
        )
        self.running = (
            select(func.count())
            .select_from(leases)
            .where(leases.c.key == bindparam("key"), leases.c.expires > bindparam("now"))
        )
        self.drop = delete(leases).where(leases.c.id.in_(bindparam("ids", expanding=True)))
        self.lease = leases.insert()


@dataclass
class _Release:
    key: str
    lease_id: str | None
    refund: int
    """Tokens to give back (negative: debt), when the key has a tpm limit."""
    done: asyncio.Future[None]


@dataclass
class _Admit:
    key: str
    limits: EffectiveLimits
    estimated: int
    done: asyncio.Future[Admission]


@dataclass
class _Bucket:
    requests: float
    tokens: float
    at: float
    running: int | None = None
    """Leases of the key that have not expired (counted only when a parallel limit asks)."""


class Limiter:
    """The limits of one process; one per worker, sharing state through the database.

    Admissions and releases are queued and applied by one task, all those waiting at once in
    one transaction (keys locked in sorted order, so transactions of different workers never
    deadlock): under load a worker pays one locked transaction per batch, not two per
    request, and its own requests never queue on the database's write lock behind each
    other. Each admission is decided in arrival order, exactly as if it had its own
    transaction at the same instant.
    """

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
        self._limits_version: int | None = None
        self._known_limits: dict[str | None, EffectiveLimits] = {}
        self._queue: list[_Release | _Admit] = []
        self._runner: asyncio.Task[None] | None = None
        self._sql = _Statements(self._pg)
        self._sqlite = SqliteThread.of(self.engine, "rate-limiter")
        if self._sqlite is not None:  # the same relaxed durability as the async engine's
            event.listen(self._sqlite.engine, "connect", _relaxed_sqlite)

    async def close(self) -> None:
        """Apply what is queued, then let go of the database."""
        while self._runner is not None and not self._runner.done():
            await asyncio.wait({self._runner})
        if self._sqlite is not None:
            await self._sqlite.close()
        if self._own_engine:
            await self.engine.dispose()

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

    async def _limits(self, key_id: str | None, version: int | None) -> EffectiveLimits:
        """The key's limits, read once per policy version (`set_limits` is a governance
        change: it moves the version, which drops what was read before)."""
        if version is not None and version == self._limits_version:
            known = self._known_limits.get(key_id)
            if known is not None:
                return known
        async with self._sessions() as session:
            limits = await self.limits_for(session, key_id)
        if version is not None:
            if version != self._limits_version:
                self._known_limits.clear()
                self._limits_version = version
            if len(self._known_limits) >= _LIMITS_MEMO:
                self._known_limits.clear()
            self._known_limits[key_id] = limits
        return limits

    async def admit(
        self,
        identity: Identity,
        key_id: str | None,
        estimated_tokens: int,
        *,
        policy_version: int | None = None,
    ) -> Admission:
        """Admit one request of `estimated_tokens` (prompt + max_tokens), or RateLimited.

        `policy_version`: the version the request was admitted at; the key's limits are then
        read once per version instead of on every request (None: read them now)."""
        key = bucket_key(identity, key_id)
        estimated = max(0, int(estimated_tokens))
        limits = await self._limits(key_id, policy_version)
        if limits.off:
            return Admission(None, key, limits, estimated, None)
        done: asyncio.Future[Admission] = asyncio.get_running_loop().create_future()
        self._enqueue(_Admit(key, limits, estimated, done))
        return await done

    def _release(self, admission: Admission, used: int) -> asyncio.Future[None] | None:
        """Queue the release of `admission` (None: nothing to write)."""
        refund = admission.estimated_tokens - used if admission.limits.tpm else 0
        if admission.lease_id is None and not refund:
            return None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Release(admission.key, admission.lease_id, refund, done))
        return done

    # -- the one task that writes -------------------------------------------------------------

    def _enqueue(self, op: _Release | _Admit) -> None:
        self._queue.append(op)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.get_running_loop().create_task(self._run(), name="rate-limiter")

    async def _run(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                outcomes = await self._apply(batch)
            except Exception as exc:  # the database failed: every waiting request fails
                for op in batch:
                    if not op.done.done():
                        op.done.set_exception(exc)
                continue
            for op, outcome in zip(batch, outcomes, strict=True):
                if op.done.done():  # its request went away meanwhile
                    if isinstance(outcome, Admission):
                        outcome.release_soon(0)  # admitted for nobody: give it all back
                    continue
                if isinstance(outcome, BaseException):
                    op.done.set_exception(outcome)
                else:
                    op.done.set_result(outcome)

    async def _apply(self, batch: list[_Release | _Admit]) -> list[Any]:
        """One transaction for `batch` (see `_apply_in`). On a SQLite file it runs whole on the
        limiter's own thread and synchronous connection: one thread hand-off per batch instead
        of several per statement through aiosqlite (each waits for the GIL the engine's
        scheduler thread holds while it decodes). PostgreSQL's driver is natively async: the
        same function runs there through `run_sync`, as it does on an in-memory SQLite
        database (which another connection could not see)."""
        async with translate_errors():
            if self._sqlite is not None:
                return await self._sqlite.run(lambda engine: self._apply_sqlite(engine, batch))
            async with self.engine.begin() as conn:
                if self._pg:
                    await conn.execute(text("SET LOCAL synchronous_commit = off"))
                return await conn.run_sync(self._apply_in, batch)

    def _apply_sqlite(self, engine: Engine, batch: list[_Release | _Admit]) -> list[Any]:
        with engine.begin() as conn:
            return self._apply_in(conn, batch)

    def _apply_in(self, conn: Connection, batch: list[_Release | _Admit]) -> list[Any]:
        """`batch` in the transaction of `conn`: releases first (they only free), then
        admissions in arrival order. Returns, per op, None (release), an Admission or a
        RateLimited. Runs off the event loop's coroutines (no awaits): its futures are
        settled by `_run` afterwards."""
        sql = self._sql
        keys = sorted({op.key for op in batch})
        outcomes: list[Any] = [None] * len(batch)
        buckets: dict[str, _Bucket] = {}
        for key in keys:
            # One statement creates the key's row or locks it, and reads it: a write, so
            # on SQLite it takes the write lock before anything is read (the read cannot
            # go stale; the same order as governance.changes), on PostgreSQL the row lock.
            row = conn.execute(sql.lock, {"key": key, **_EMPTY}).one()
            buckets[key] = _Bucket(float(row.requests), float(row.tokens), float(row.at))
        now = self.clock()
        dropped = [op.lease_id for op in batch if isinstance(op, _Release) and op.lease_id]
        if dropped:
            conn.execute(sql.drop, {"ids": dropped})
        for op in batch:
            if isinstance(op, _Release):
                buckets[op.key].tokens += op.refund  # refilled (and capped) when next read
        leases: list[dict[str, Any]] = []
        for i, op in enumerate(batch):
            if not isinstance(op, _Admit):
                continue
            bucket = buckets[op.key]
            if op.limits.max_parallel and bucket.running is None:
                counted = conn.scalar(sql.running, {"key": op.key, "now": now})
                bucket.running = int(counted or 0)
            outcome = outcomes[i] = self._decide(op, bucket, now)
            if isinstance(outcome, Admission) and outcome.lease_id is not None:
                leases.append(
                    {
                        "id": outcome.lease_id,
                        "key": op.key,
                        "owner": self.owner,
                        "started": now,
                        "expires": now + self.settings.rate_lease_seconds,
                    }
                )
        conn.execute(
            sql.store,
            [
                {"b_key": k, "b_requests": b.requests, "b_tokens": b.tokens, "b_at": b.at}
                for k, b in buckets.items()
            ],
        )
        if leases:
            conn.execute(sql.lease, leases)
        return outcomes

    def _decide(self, op: _Admit, bucket: _Bucket, now: float) -> Admission | RateLimited:
        """Refill the key's buckets to `now`, check the three limits, take this request."""
        limits, estimated = op.limits, op.estimated
        elapsed = now - bucket.at
        bucket.at = max(bucket.at, now)
        requests = _refill(bucket.requests, limits.rpm, elapsed) if limits.rpm else 0.0
        tokens = _refill(bucket.tokens, limits.tpm, elapsed) if limits.tpm else 0.0
        if limits.rpm:
            bucket.requests = requests
        if limits.tpm:
            bucket.tokens = tokens
        headers = _headers(limits, requests, tokens)
        if limits.max_parallel and (bucket.running or 0) >= limits.max_parallel:
            return RateLimited(
                f"too many requests at once: this key may run {limits.max_parallel} at a time",
                limit="parallel",
                retry_after=1,
                headers=headers,
            )
        if limits.rpm and requests < 1.0:
            wait = (1.0 - requests) * WINDOW_S / limits.rpm
            return RateLimited(
                f"rate limit reached: {limits.rpm} requests per minute for this key",
                limit="requests",
                retry_after=max(1, math.ceil(wait)),
                headers=headers,
            )
        if limits.tpm and estimated > limits.tpm:
            return RateLimited(
                f"request too large: it may use {estimated} tokens (prompt + max_tokens), "
                f"this key's limit is {limits.tpm} tokens per minute",
                limit="tokens",
                retry_after=None,
                headers=headers,
            )
        if limits.tpm and tokens < estimated:
            wait = (estimated - tokens) * WINDOW_S / limits.tpm
            return RateLimited(
                f"rate limit reached: {limits.tpm} tokens per minute for this key "
                f"(this request may use {estimated})",
                limit="tokens",
                retry_after=max(1, math.ceil(wait)),
                headers=headers,
            )
        if limits.rpm:
            bucket.requests -= 1.0
        if limits.tpm:
            bucket.tokens -= estimated
        lease_id: str | None = None
        if limits.max_parallel:
            lease_id = uuid.uuid4().hex
            bucket.running = (bucket.running or 0) + 1
        return Admission(
            self,
            op.key,
            limits,
            estimated,
            lease_id,
            _headers(limits, bucket.requests, bucket.tokens),
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


def _log_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("rate-limit release failed: %s", done.exception())


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
