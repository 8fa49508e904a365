"""Group commit: one writer task per process turns concurrent appends into few transactions.

For callers without a transaction of their own (the gateway's inference records). Each
`await writer.append(...)` returns only once its record has committed. While one batch
commits, the appends that arrive queue up and go together in the next transaction (up to
`max_batch`), so under load many records share one head lock, one round of statements and
one fsync, and with a single caller nothing waits for company (no added latency). A batch
commits whole or not at all: if its transaction fails, every caller in it gets the error and
none of its records exists. A bad record is refused in the caller, before it is queued, so it
can never fail a batch of others.

Each batch is one transaction on a connection of the writer's own, kept between batches. On
PostgreSQL it is one call of a function that locks the head, checks it is exactly the one the
batch was chained onto (seq and hash), and writes everything (one round trip; on a lost race
it returns the new head and the batch is re-chained; after three lost races in a row it takes
the head lock and waits its turn, so every batch makes progress). Two batches are in flight
at once, on two connections: the second is chained onto the end of the first and sent while
the first commits, so the client's work on one overlaps the server's on the other (with 32
closed-loop appenders, ~15-25 % more appends/s than one batch at a time on the 2-core
benchmark machine); it can only commit on top of exactly that batch, so a batch that fails
or loses a race takes the one after it down with it, never a fork, and both are re-chained
(see `_loop_pipelined`). On SQLite a batch runs on the writer's own sqlite3 connection in a
worker thread, one thread hop per batch (aiosqlite would cost one per statement). Both
measured several times faster than the same work through SQLAlchemy sessions
(bench/audit.py).

The usage summary is not written by appends: when a batch crosses a multiple of
`audit.summary.FOLD_EVERY` the writer folds the records since the summary's watermark in, in
a background transaction of its own (one at a time), and once more on close.

The writer also takes signed checkpoints every `checkpoint_every` records or
`checkpoint_interval_s` seconds (decided under the head lock, so several processes sharing
the database do not duplicate them), in a transaction of its own: a checkpoint failure is
logged and never fails an append. A checkpoint is signed only when the ledger provably
extends the last one anchored outside the database, and anchored once it commits
(`audit.anchor`); a refusal is logged as an error and turns `audit.anchor.health()`
not-ready, while appends go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit.checkpoints import create_checkpoint, latest_checkpoint, maybe_checkpoint
from audit.db import SQLITE_PRAGMAS, make_sessionmaker, translate_errors
from audit.errors import AuditError, DatabaseUnavailable
from audit.format import Checkpoint
from audit.ledger import (
    PG_APPEND_SQL,
    PG_LOCK_SQL,
    PG_WRITE_SQL,
    Batch,
    Entry,
    HeadState,
    Prepared,
    build_batch,
    head_state,
    lock_connection,
    pg_write_args,
    prepare,
    write_batch,
)
from audit.signing import Signer
from audit.summary import fold_due, fold_usage
from contracts.settings import Settings

log = logging.getLogger(__name__)

_Item = tuple[Prepared, "asyncio.Future[Entry]"]
CAS_TRIES = 3  # compare-and-set attempts before waiting for the head lock
PG_HEAD_SQL = "SELECT seq, hash, at, frontier FROM ledger_head WHERE id = 1"


class LedgerWriter:
    """The process's ledger writer; use as `async with LedgerWriter(engine) as w: ...`.

    `signer=None` disables automatic checkpoints (on-demand `checkpoint()` then needs one).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        max_batch: int = 1000,
        signer: Signer | None = None,
        checkpoint_every: int | None = None,
        checkpoint_interval_s: float | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._engine = engine
        self._sessionmaker = make_sessionmaker(engine)
        self._conn: AsyncConnection | None = None
        self._head: HeadState | None = None  # PostgreSQL: the head after our last batch
        self._sqlite: _SqliteBatchWriter | None = None
        self._max_batch = max_batch
        self._signer = signer
        auto = signer is not None
        self._every = (
            (checkpoint_every or Settings.from_env().audit_checkpoint_every) if auto else None
        )
        self._interval = (
            (checkpoint_interval_s or Settings.from_env().audit_checkpoint_seconds)
            if auto
            else None
        )
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False  # no more appends
        self._shut = False  # close() has run
        self._last_checkpoint_record = 0  # seq of the latest checkpoint's own record, as known
        self._last_checkpoint_time = time.monotonic()
        self._fold_task: asyncio.Task[None] | None = None
        self._slots: dict[int, AsyncConnection] = {}  # PostgreSQL pipeline slots 1, 2, ...
        self._wake = asyncio.Event()  # PostgreSQL pipeline: an append queued, a batch landed
        self._unfolded = False  # records committed since the last fold began

    async def __aenter__(self) -> LedgerWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        if self._task is not None:
            return
        if self._signer is not None:
            async with translate_errors(), self._sessionmaker() as session:
                last = await latest_checkpoint(session)
            self._last_checkpoint_record = last.size + 1 if last else 0
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    async def close(self) -> None:
        """Commit everything queued so far, then stop; later appends raise RuntimeError."""
        if self._shut:
            return
        self._shut = self._closed = True
        if self._task is None:
            return
        if not self._task.done():  # else it was cancelled or crashed: release what it held
            await self._queue.put(None)
            await self._task
        if self._fold_task is not None:
            await self._fold_task
        if self._unfolded and not self._uses_own_sqlalchemy_connection():
            # Leave the tail short for whoever aggregates next: after any fold in progress
            # elsewhere (which may have begun before this writer's last records committed).
            await self._fold(wait=True)
        for conn in (self._conn, *self._slots.values()):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._conn = None
        self._slots.clear()
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None

    async def append(self, *, kind: str, principal: str | None, payload: dict[str, Any]) -> Entry:
        """Append one record in the next group commit; returns once it has committed.

        ValueError for a record that cannot be appended (nothing queued); DatabaseUnavailable
        (or the database's error) if its batch could not commit, in which case it does not
        exist. Cancelling the caller does not withdraw a record already queued.
        """
        if self._closed or self._task is None:
            raise RuntimeError("the ledger writer is not running")
        item = prepare(kind, principal, payload)
        future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        self._wake.set()
        # Not shielded (a shield costs ~15 µs of event-loop work per record): cancelling the
        # caller cancels this future, and the writer, finding it done, just does not report.
        return await future

    async def checkpoint(self) -> Checkpoint:
        """Make a signed checkpoint now (on demand), over every record committed so far."""
        if self._signer is None:
            raise RuntimeError("this ledger writer has no signing key")
        async with translate_errors(), self._sessionmaker.begin() as session:
            cp = await create_checkpoint(session, self._signer)
        self._note_checkpoint(cp)
        return cp

    def _note_checkpoint(self, cp: Checkpoint) -> None:
        self._last_checkpoint_record = max(self._last_checkpoint_record, cp.size + 1)
        self._last_checkpoint_time = time.monotonic()

    async def _run(self) -> None:
        try:
            await self._loop()
        finally:  # cancelled or stopped: nobody may wait forever on a record never written
            self._closed = True
            while not self._queue.empty():
                item = self._queue.get_nowait()
                if item is not None and not item[1].done():
                    item[1].set_exception(RuntimeError("the ledger writer stopped"))

    def _take(self, first: _Item, limit: int | None = None) -> tuple[list[_Item], bool]:
        """`first` and what else is queued (up to `limit` or max_batch); and whether close()
        was asked."""
        limit = self._max_batch if limit is None else min(limit, self._max_batch)
        batch: list[_Item] = [first]
        while len(batch) < limit and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    async def _loop(self) -> None:
        if self._engine.dialect.name == "postgresql" and self._engine.dialect.driver == "asyncpg":
            return await self._loop_pipelined()
        stopping = False
        while not stopping:
            first = await self._next_item()
            if first is None:
                break
            batch, stopping = self._take(first)
            last_seq = await self._commit(batch)
            if last_seq is not None:
                await self._checkpoint_if_due(last_seq)

    async def _loop_pipelined(self) -> None:
        """PostgreSQL: up to PIPELINE batches in flight, each on its own connection.

        The next batch is chained onto the end of the one still in flight and sent at once,
        so building and encoding it (client CPU) overlaps the other's commit (server CPU and
        WAL flush). The append function writes a batch only if the head is exactly the one
        it was chained onto (seq and hash): a batch after one that failed or lost a race
        therefore writes nothing and can never fork the chain. Batches land in order; on the
        first that did not commit, the pipeline drains and its records and those of every
        batch after it are re-chained one batch at a time (`_commit`: compare-and-set on the
        current head, then the head lock). A batch that overtook the one it was chained onto
        is only resent (`_land`).
        """
        flights: deque[_Flight] = deque()
        try:
            stopping = False
            while True:
                room = not stopping and len(flights) < PIPELINE
                if room and (not flights or self._queue.qsize()):
                    # Idle: wait for an append (or an interval checkpoint); else take what
                    # is queued.
                    item = await self._next_item() if not flights else self._queue.get_nowait()
                    if item is None:
                        stopping = True
                    else:
                        # What is queued is shared among the free slots, so that the batches
                        # overlap from the start rather than one taking everything.
                        free = PIPELINE - len(flights)
                        share = -(-(self._queue.qsize() + 1) // free)
                        batch, stopping = self._take(item, share)
                        busy = {f.slot for f in flights}
                        slot = next(i for i in range(PIPELINE) if i not in busy)
                        flight = await self._send(batch, slot)
                        if flight is not None:
                            flights.append(flight)
                        continue
                if not flights:
                    if stopping:
                        return
                    continue
                oldest = flights[0]
                if not oldest.task.done():
                    self._wake.clear()
                    if stopping or len(flights) >= PIPELINE:
                        await asyncio.wait([oldest.task])
                    else:
                        await self._wake.wait()  # an append queued, or a batch landed
                    continue
                flights.popleft()
                last_seq = await self._land(oldest, flights)
                if last_seq is not None:
                    await self._checkpoint_if_due(last_seq)
        finally:  # cancelled: nobody may wait forever on a batch that will never land
            for f in flights:
                self._fail(f.items, RuntimeError("the ledger writer stopped"))

    async def _raw(self, slot: int) -> Any:
        """The asyncpg connection of pipeline slot `slot` (kept between batches; slot 0 is
        also the connection of `_write`)."""
        conn = self._conn if slot == 0 else self._slots.get(slot)
        if conn is None:
            async with translate_errors():
                conn = await self._engine.connect()
            if slot == 0:
                self._conn = conn
            else:
                self._slots[slot] = conn
        return (await conn.get_raw_connection()).driver_connection

    async def _send(self, items: list[_Item], slot: int) -> _Flight | None:
        """Chain `items` onto the head expected after the batches in flight and send them."""
        try:
            raw = await self._raw(slot)
            if self._head is None:  # nothing in flight (the pipeline drains on any failure)
                self._head = head_state(await raw.fetchrow(PG_HEAD_SQL))
        except Exception as exc:
            await self._drop_slot(slot)  # this slot's connection only: others may be in flight
            self._fail(items, _pg_error(exc))
            return None
        base = self._head
        state = HeadState(base.seq, base.hash, base.at, base.frontier.copy())
        try:
            batch = build_batch(state, [item for item, _ in items])
        except Exception as exc:  # nothing sent; the head expected is unchanged
            self._fail(items, _pg_error(exc))
            return None
        flight = _Flight(items, batch, self._issue(raw, base.seq, base.hash, batch), slot)
        self._head = _advanced(state, batch)
        return flight

    def _issue(self, raw: Any, seq: int, digest: str, batch: Batch) -> asyncio.Future[list[Any]]:
        """Send `batch`, chained onto the head (`seq`, `digest`), on connection `raw`."""
        task: asyncio.Future[list[Any]] = asyncio.ensure_future(
            raw.fetch(PG_APPEND_SQL, seq, digest, *pg_write_args(batch))
        )
        task.add_done_callback(self._wake_up)
        return task

    def _wake_up(self, _task: object) -> None:
        self._wake.set()

    async def _land(self, flight: _Flight, later: deque[_Flight]) -> int | None:
        """Report a landed batch; if it did not commit, drain and re-chain (see above)."""
        if _committed(flight):
            return self._resolve(flight.items, flight.batch.entries)
        exc = flight.task.exception()
        if exc is None and _overtook(flight):
            # It reached the server before the batch it was chained onto (they travel on two
            # connections, and the server may take the later one's head lock first), so it
            # found the head before that batch and wrote nothing. That batch has committed
            # since (batches land in order; had it failed, this one would have been drained
            # with it): the same batch, sent again unchanged, now extends the head it expects.
            try:
                raw = await self._raw(flight.slot)
            except Exception as err:  # its connection is gone: fail it as any error
                exc = err
            else:
                first = flight.batch.entries[0]
                flight.task = self._issue(raw, first.seq - 1, first.prev_hash, flight.batch)
                later.appendleft(flight)
                return None
        retry: list[list[_Item]] = []
        if exc is not None:
            self._fail(flight.items, _pg_error(exc))
            await self._drop_slot(flight.slot)
        else:  # lost a race to another process
            retry.append(flight.items)
        # Every batch after it was chained onto it: none can commit on top of a batch that
        # did not. Let them land, then start again from the head as it is.
        rest = list(later)
        later.clear()
        if rest:
            await asyncio.wait([f.task for f in rest])
        self._head = None
        last_seq = None
        for f in rest:
            if _committed(f):  # only if `flight` committed after all (a reply lost on the way)
                last_seq = self._resolve(f.items, f.batch.entries)
            else:
                retry.append(f.items)
        for items in retry:
            last_seq = await self._commit(items) or last_seq
        return last_seq

    async def _next_item(self) -> _Item | None:
        """The next queued item; wakes up for interval checkpoints while idle."""
        while True:
            if self._interval is None:
                return await self._queue.get()
            wait = self._last_checkpoint_time + self._interval - time.monotonic()
            try:
                return await asyncio.wait_for(self._queue.get(), timeout=max(wait, 0.001))
            except TimeoutError:
                await self._checkpoint_if_due(None)

    async def _commit(self, batch: list[_Item]) -> int | None:
        try:
            entries = await self._write([item for item, _ in batch])
        except Exception as exc:
            self._fail(batch, exc)
            return None
        return self._resolve(batch, entries)

    @staticmethod
    def _fail(batch: list[_Item], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    def _resolve(self, batch: list[_Item], entries: list[Entry]) -> int:
        """Report a committed batch to its callers; start a fold when one is due."""
        for (_, future), entry in zip(batch, entries, strict=True):
            if not future.done():
                future.set_result(entry)
        self._unfolded = True
        if fold_due(entries[0].seq - 1, entries[-1].seq):
            self._start_fold()
        return entries[-1].seq

    def _start_fold(self) -> None:
        """Fold the usage summary in a transaction of its own, beside the appends (one fold
        at a time per writer; writers in other processes may fold too, see audit.summary)."""
        if self._uses_own_sqlalchemy_connection():
            return  # that path folds inside its batch's transaction (write_batch)
        if self._fold_task is None or self._fold_task.done():
            self._fold_task = asyncio.create_task(self._fold(), name="ledger-usage-fold")

    async def _fold(self, *, wait: bool = False) -> None:
        self._unfolded = False
        try:
            async with translate_errors(), self._engine.begin() as conn:
                await fold_usage(conn, wait=wait)
        except Exception:
            log.exception("usage summary fold failed; the next one will take its records")

    def _uses_own_sqlalchemy_connection(self) -> bool:
        """True where batches go through the generic SQLAlchemy path (in-memory SQLite,
        drivers other than asyncpg), on the engine's connection that no fold may share."""
        url = self._engine.url
        if url.get_backend_name() == "sqlite":
            return (url.database or "") in ("", ":memory:")
        return url.get_driver_name() != "asyncpg"

    async def _write(self, records: list[Prepared]) -> list[Entry]:
        """One transaction on the writer's own connection: lock the head, chain, write.

        The connection is kept between batches (no pool checkout or ping per batch) and
        dropped after any error, so the next batch starts on a fresh one.
        """
        database = self._engine.url.database or ""
        if self._engine.dialect.name == "sqlite" and database not in ("", ":memory:"):
            return await self._write_sqlite(records)
        if self._conn is None:
            async with translate_errors():
                self._conn = await self._engine.connect()
        conn = self._conn
        try:
            if conn.dialect.name == "postgresql" and conn.dialect.driver == "asyncpg":
                return await self._write_asyncpg(conn, records)
            async with translate_errors(), conn.begin():
                state = await lock_connection(conn)
                before = state.seq
                batch = build_batch(state, records)
                await write_batch(conn, batch, before)  # folds the summary itself when due
            return batch.entries
        except BaseException:
            self._head = None
            await self._drop_connections()
            raise

    async def _drop_slot(self, slot: int) -> None:
        conn = self._conn if slot == 0 else self._slots.pop(slot, None)
        if slot == 0:
            self._conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
                await conn.close()

    async def _drop_connections(self) -> None:
        """After an error: the next batch starts on fresh connections."""
        for slot in (0, *list(self._slots)):
            await self._drop_slot(slot)

    async def _write_asyncpg(self, conn: AsyncConnection, records: list[Prepared]) -> list[Entry]:
        """PostgreSQL: one round trip per batch in the common case (see APPEND_FUNCTION in
        the migration): chain onto the head last seen, and if another appender moved it
        meanwhile, chain onto the head the function returns and try again."""
        raw: Any = (await conn.get_raw_connection()).driver_connection
        try:
            for _ in range(CAS_TRIES):
                if self._head is None:
                    self._head = head_state(await raw.fetchrow(PG_HEAD_SQL))
                base = self._head
                state = HeadState(base.seq, base.hash, base.at, base.frontier.copy())
                batch = build_batch(state, records)
                current = await raw.fetch(PG_APPEND_SQL, base.seq, base.hash, *pg_write_args(batch))
                if not current:  # written and committed
                    self._head = _advanced(state, batch)
                    return batch.entries
                self._head = head_state(current[0])
            # Other processes keep winning: take the head lock and wait for our turn, so
            # every batch makes progress however busy the ledger is.
            async with raw.transaction():
                state = head_state(await raw.fetchrow(PG_LOCK_SQL))
                batch = build_batch(state, records)
                await raw.execute(PG_WRITE_SQL, *pg_write_args(batch))
            self._head = _advanced(state, batch)
            return batch.entries
        except Exception as exc:
            raise _pg_error(exc) from exc

    async def _write_sqlite(self, records: list[Prepared]) -> list[Entry]:
        """SQLite: the whole batch in one hop to a thread, on the writer's own sqlite3
        connection (aiosqlite would cost one thread hop per statement)."""
        if self._sqlite is None:
            self._sqlite = _SqliteBatchWriter(self._engine.url.database or "")  # a file
        try:
            return await asyncio.to_thread(self._sqlite.write, records)
        except (sqlite3.Error, OSError) as exc:
            self._sqlite.close()
            self._sqlite = None
            if isinstance(exc, sqlite3.OperationalError | OSError):  # locked, unopenable, I/O
                raise DatabaseUnavailable(f"database unavailable: {exc}") from exc
            raise AuditError(f"ledger write failed: {exc}") from exc

    async def _checkpoint_if_due(self, last_seq: int | None) -> None:
        if self._signer is None:
            return
        pending_estimate = (last_seq or 0) - self._last_checkpoint_record
        by_count = self._every is not None and pending_estimate >= self._every
        by_time = (
            self._interval is not None
            and time.monotonic() - self._last_checkpoint_time >= self._interval
        )
        if not (by_count or by_time):
            return
        try:
            async with translate_errors(), self._sessionmaker.begin() as session:
                cp = await maybe_checkpoint(
                    session, self._signer, every=self._every, interval_s=self._interval
                )
                latest = cp or await latest_checkpoint(session)
        except Exception:
            log.exception("ledger checkpoint failed; appends go on")
            self._last_checkpoint_time = time.monotonic()
            return
        if latest is not None:
            self._note_checkpoint(latest)
        else:
            self._last_checkpoint_time = time.monotonic()


class _SqliteBatchWriter:
    """The writer's own sqlite3 connection (WAL, busy_timeout, synchronous=FULL as
    `audit.db.make_engine` sets them); used by one thread at a time."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in SQLITE_PRAGMAS:
            self.conn.execute(pragma)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.close()

    def write(self, records: list[Prepared]) -> list[Entry]:
        db = self.conn
        # IMMEDIATE takes the write lock first (waiting up to busy_timeout for other
        # processes), so the head read next is the head this batch extends.
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute(
                "SELECT seq, hash, at, frontier FROM ledger_head WHERE id = 1"
            ).fetchone()
            batch = build_batch(head_state(row), records)
            db.executemany(
                "INSERT INTO ledger_records (seq, id, kind, at, principal, payload, prev_hash, "
                "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                zip(*batch.columns, strict=True),
            )
            if batch.nodes:
                db.executemany(
                    "INSERT INTO ledger_merkle_nodes (level, idx, hash) VALUES (?, ?, ?)",
                    batch.nodes,
                )
            db.execute(
                "UPDATE ledger_head SET seq = ?, hash = ?, at = ?, frontier = ? WHERE id = 1",
                batch.head,
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return batch.entries


PIPELINE = 2  # PostgreSQL: batches in flight at once


@dataclass(slots=True)
class _Flight:
    """A batch sent on pipeline connection `slot`; `task` returns [] once it has committed,
    or the current head when the head was not the one it was chained onto."""

    items: list[_Item]
    batch: Batch
    task: asyncio.Future[list[Any]]
    slot: int


def _committed(flight: _Flight) -> bool:
    return flight.task.exception() is None and not flight.task.result()


def _overtook(flight: _Flight) -> bool:
    """Whether a batch that did not commit found the head *before* the one it was chained onto:
    only a batch of this writer still in flight can be there (the head never goes back)."""
    rows = flight.task.result()
    return bool(rows) and int(rows[0][0]) < flight.batch.entries[0].seq - 1


def _pg_error(exc: BaseException) -> Exception:
    """The error a caller sees for an asyncpg failure (as `translate_errors` does)."""
    import asyncpg

    if isinstance(exc, AuditError):
        return exc
    if isinstance(
        exc, OSError | TimeoutError | asyncpg.InterfaceError | asyncpg.PostgresConnectionError
    ):
        return DatabaseUnavailable(f"database unreachable: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return AuditError(f"ledger write failed: {exc}")
    return exc if isinstance(exc, Exception) else AuditError(str(exc))


def _advanced(state: HeadState, batch: Batch) -> HeadState:
    """`state` (whose frontier `build_batch` advanced) moved to the batch's new head."""
    state.seq, state.hash, state.at = batch.head[0], batch.head[1], batch.head[2]
    return state
