"""Group commit: one writer task per process turns concurrent appends into few transactions.

For callers without a transaction of their own (the gateway's inference records). Each
`await writer.append(...)` returns only once its record has committed. While one batch
commits, the appends that arrive queue up and go together in the next transaction (up to
`max_batch`), so under load many records share one head lock, one round of statements and
one fsync, and with a single caller nothing waits for company (no added latency). A batch
commits whole or not at all: if its transaction fails, every caller in it gets the error and
none of its records exists. A bad record is refused in the caller, before it is queued, so it
can never fail a batch of others.

Each batch is one transaction on the writer's own connection, kept between batches: on
PostgreSQL one call of a function that locks the head, checks it is still the one the batch
was chained onto, and writes everything (one round trip; on a lost race it returns the new
head and the batch is re-chained; after three lost races in a row it takes the head lock and
waits its turn, so every batch makes progress); on SQLite on its own sqlite3 connection in a worker
thread, one thread hop per batch (aiosqlite would cost one per statement). Both measured
several times faster than the same work through SQLAlchemy sessions (bench/audit.py).

The usage summary is not written by appends: when a batch crosses a multiple of
`audit.summary.FOLD_EVERY` the writer folds the records since the summary's watermark in, in
a background transaction of its own (one at a time), and once more on close.

The writer also takes signed checkpoints every `checkpoint_every` records or
`checkpoint_interval_s` seconds (decided under the head lock, so several processes sharing
the database do not duplicate them), in a transaction of its own: a checkpoint failure is
logged and never fails an append.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from audit import settings
from audit.checkpoints import Checkpoint, create_checkpoint, latest_checkpoint, maybe_checkpoint
from audit.db import SQLITE_PRAGMAS, make_sessionmaker, translate_errors
from audit.errors import AuditError, DatabaseUnavailable
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
        self._every = (checkpoint_every or settings.checkpoint_every()) if auto else None
        self._interval = (
            (checkpoint_interval_s or settings.checkpoint_interval_s()) if auto else None
        )
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._last_checkpoint_record = 0  # seq of the latest checkpoint's own record, as known
        self._last_checkpoint_time = time.monotonic()
        self._fold_task: asyncio.Task[None] | None = None
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
        if self._closed:
            return
        self._closed = True
        if self._task is None:
            return
        await self._queue.put(None)
        await self._task
        if self._fold_task is not None:
            await self._fold_task
        if self._unfolded and not self._uses_own_sqlalchemy_connection():
            # Leave the tail short for whoever aggregates next: after any fold in progress
            # elsewhere (which may have begun before this writer's last records committed).
            await self._fold(wait=True)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.close()
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

    async def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = await self._next_item()
            if first is None:
                break
            batch: list[_Item] = [first]
            while len(batch) < self._max_batch and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            last_seq = await self._commit(batch)
            if last_seq is not None:
                await self._checkpoint_if_due(last_seq)

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
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return None
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
            self._conn, self._head = None, None
            with contextlib.suppress(Exception):
                await conn.invalidate()
                await conn.close()
            raise

    async def _write_asyncpg(self, conn: AsyncConnection, records: list[Prepared]) -> list[Entry]:
        """PostgreSQL: one round trip per batch in the common case (see APPEND_FUNCTION in
        the migration): chain onto the head last seen, and if another appender moved it
        meanwhile, chain onto the head the function returns and try again."""
        import asyncpg

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
        except (
            OSError,
            TimeoutError,
            asyncpg.InterfaceError,
            asyncpg.PostgresConnectionError,
        ) as exc:
            raise DatabaseUnavailable(f"database unreachable: {exc}") from exc
        except asyncpg.PostgresError as exc:
            raise AuditError(f"ledger write failed: {exc}") from exc

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


def _advanced(state: HeadState, batch: Batch) -> HeadState:
    """`state` (whose frontier `build_batch` advanced) moved to the batch's new head."""
    state.seq, state.hash, state.at = batch.head[0], batch.head[1], batch.head[2]
    return state
