"""Verification of the whole ledger: chain, checkpoints, derived state (`flexgate audit verify`).

Streams records in seq order by keyset pagination (`seq > last ORDER BY seq LIMIT n`), so
memory stays constant at any ledger size and no long server-side cursor is held; the next page
is fetched while the current one is checked, so the database works beside the verifier. For
every record it checks that no seq is missing, that prev_hash is the previous record's hash,
that the stored hash is the hash of the stored contents and that time does not run backwards;
it grows the Merkle tree as it goes and, at each checkpoint, checks the Ed25519 signature
against the trusted key and the root against the records. Each `checkpoint` record must match
a row of `ledger_checkpoints` and each row its record. At the end it checks the chain head
(hash and Merkle frontier), that nothing lies beyond it, and that no checkpoint covers records
that no longer exist (a truncated tail).

Every hash is computed here, never by the database: verification must not trust the server
it checks. The inner loop is written for speed (locals, one escape check for all string
fields, the canonical body built by one f-string); `audit.canonical.record_hash` remains the
definition and a test holds them equal.

With more than one worker (default: one per CPU, at most 8) and at least two chunks of
records, the records are checked by worker processes (`python -m audit.verify_worker`, each
with its own connection), in chunks of `chunk` records (a power of two, 32,768 by default)
starting at multiples of it, so a chunk's Merkle subtrees are those of the whole tree. This
process takes the results in order and stitches them: each chunk's first prev_hash and time
against the last of the chunk before, its checkpoints against the frontier before the chunk
grown by the chunk's subtrees. Memory stays constant (a result is a few subtree hashes). A
chunk in which a worker saw a fault (or that a worker could not check) is checked again from
its start in this process, page by page, so the first bad seq and the reason are those of a
one-process run. SQLite files and PostgreSQL (asyncpg) are checked this way; an in-memory
SQLite database, or fewer than two chunks of records, in this process alone. Measured over
1 M records on a 2-CPU machine shared with the database server and other work: two workers
give 2.3x (SQLite) and 1.8x (PostgreSQL) the records/s of one process; three or four, no more
than two (bench/audit.py --verify-workers).

Checkpoints kept outside the database (the anchor file and directory witnesses,
`audit.anchor`, and `--checkpoint FILE`) pin the tree: when the scan reaches the size of one,
the root of the records so far must be its root and the next record its checkpoint record.
What it cannot see, by construction: records appended after the latest anchored checkpoint
can be rewritten consistently by someone with write access to the database until the next
checkpoint covers them.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import pickle
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import URL, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from audit import merkle
from audit.anchor import AnchorError, Anchors
from audit.canonical import RECORD_DOMAIN, canonical_json, stored_record_hash
from audit.checkpoints import StoredTree
from audit.db import db_errors
from audit.derived import DerivedFinding, check_derived
from audit.errors import AuditError, InvalidQuery
from audit.format import Checkpoint
from audit.ledger import CHECKPOINT, HEAD_ID
from audit.models import (
    GENESIS_HASH,
    RECORD_COLUMNS,
    LedgerCheckpoint,
    LedgerHead,
    LedgerRecord,
)
from audit.signing import PRIVATE_KEY_FILE, trusted_public_keys
from audit.verify_worker import Chunk, ChunkResult

PAGE = 5000
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `audit` imports from
CHUNK = 1 << 15  # records per worker task (a power of two)
MAX_DEFAULT_WORKERS = 8  # each is a database connection

_CHECKPOINT_COLUMNS = (
    LedgerCheckpoint.size,
    LedgerCheckpoint.root,
    LedgerCheckpoint.at,
    LedgerCheckpoint.key_id,
    LedgerCheckpoint.signature,
)
_PG_PAGE_SQL = (
    "SELECT seq, id, kind, at, principal, payload, prev_hash, hash FROM ledger_records "
    "WHERE seq > $1 AND seq <= $2 ORDER BY seq"
)

_SQLITE_PAGE_SQL = _PG_PAGE_SQL.replace("$1", "?").replace("$2", "?")


@dataclass(frozen=True, slots=True)
class VerifyReport:
    ok: bool
    records: int  # records checked
    first_bad_seq: int | None
    reason: str | None
    checkpoints: int  # checkpoints whose signature and root were checked against records
    head_seq: int
    # chunks checked by worker processes whose results were taken (not in as_dict: how the
    # work was done, not what was found)
    worker_chunks: int = 0
    anchored_size: int | None = None  # the latest checkpoint anchored outside the database
    derived: tuple[DerivedFinding, ...] = ()  # derived tables recomputed and compared

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "checkpoints": self.checkpoints,
            "head_seq": self.head_seq,
            "anchored_size": self.anchored_size,
            "derived": [{"table": f.table, "ok": f.ok, "detail": f.detail} for f in self.derived],
        }


class _Tampered(Exception):
    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.seq = seq
        self.reason = reason


@db_errors
async def verify(
    session: AsyncSession,
    *,
    from_seq: int = 1,
    public_keys: Mapping[str, Ed25519PublicKey] | None = None,
    page_size: int = PAGE,
    workers: int | None = None,
    chunk: int = CHUNK,
    anchors: Anchors | None = None,
    checkpoints: Sequence[Checkpoint] = (),
    derived: bool = True,
) -> VerifyReport:
    """Verify the ledger from `from_seq` (the records before it are trusted as stored).

    `public_keys` (key_id -> key) defaults to FLEXGATE_HOME's key. `workers` (default: the
    CPU count, at most 8) worker processes check chunks of `chunk` records (a power of two)
    when there are at least two chunks; 1 checks everything in this process. Returns a
    report; raises only for bad arguments (InvalidQuery) or an unreachable database
    (DatabaseUnavailable when wrapped in `audit.db.translate_errors`, as the CLI does).

    The records are also checked against every checkpoint anchored outside the database
    (`anchors`, default FLEXGATE_HOME's anchor file and directory witnesses) and against
    `checkpoints` an auditor kept: the database fails when it is behind one, forked from one
    (its records hash to another root at that size) or lost its checkpoint record. A signing
    key in FLEXGATE_HOME with no anchored checkpoint at all means the checkpoints were lost.
    With `derived`, the tables derived from the records are recomputed and compared
    (`audit.derived`); drift fails the report.
    """
    if from_seq < 1:
        raise InvalidQuery("from_seq must be >= 1")
    keys = dict(trusted_public_keys() if public_keys is None else public_keys)
    anchors = anchors or Anchors.from_settings()
    head = (
        await session.execute(
            select(LedgerHead.seq, LedgerHead.hash, LedgerHead.frontier).where(
                LedgerHead.id == HEAD_ID
            )
        )
    ).first()
    if head is None:
        return VerifyReport(False, 0, None, "the chain head row is missing", 0, 0)
    upper, head_hash, head_frontier = int(head[0]), str(head[1]), str(head[2])
    if from_seq > upper + 1:
        raise InvalidQuery(f"from_seq {from_seq} is beyond the last record ({upper})")
    if chunk < 1 or chunk & (chunk - 1):
        raise InvalidQuery("chunk must be a power of two")
    if workers is not None and workers < 1:
        raise InvalidQuery("workers must be >= 1")
    run = _Run(session, keys, from_seq, upper, page_size)
    conn = await session.connection()
    run.workers = min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS) if workers is None else workers
    run.chunk, run.target = chunk, _worker_target(conn.engine.url)
    anchored_size = None
    try:
        anchored_size = run.pin(anchors, checkpoints)
        await run.records()
        await run.finish(head_hash, head_frontier)
    except _Tampered as bad:
        return VerifyReport(
            False,
            run.count,
            bad.seq,
            bad.reason,
            run.checked,
            upper,
            run.by_workers,
            anchored_size,
        )
    findings = tuple(await check_derived(conn.engine)) if derived else ()
    drift = [f for f in findings if not f.ok]
    return VerifyReport(
        not drift,
        run.count,
        None,
        None
        if not drift
        else "derived state does not match the records: "
        + "; ".join(f"{f.table}: {f.detail}" for f in drift),
        run.checked,
        upper,
        run.by_workers,
        anchored_size,
        findings,
    )


def _worker_target(url: URL) -> tuple[str, str] | None:
    """What a worker process connects to: a SQLite file, or an asyncpg DSN; None if neither."""
    if url.get_backend_name() == "sqlite":
        path = url.database or ""
        return (
            ("sqlite", path)
            if path and path != ":memory:" and "mode=memory" not in str(url)
            else None
        )
    if url.get_backend_name() == "postgresql":
        return (
            "postgresql",
            url.set(drivername="postgresql").render_as_string(hide_password=False),
        )
    return None


def worker_command() -> list[str]:
    """How a verification worker is started: isolated (`-I`: no PYTHON* variables, no user
    site, and neither the working directory nor the script's folder on sys.path), importing
    `audit` from exactly where this process imported it. A folder named `audit` (or
    `asyncpg`, `hashlib`, …) in the working directory can then never stand in for the
    verifier's code."""
    boot = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from audit.verify_worker import _serve; _serve()"
    )
    return [sys.executable, "-I", "-c", boot, _ROOT]


class _Workers:
    """`n` worker processes (`python -m audit.verify_worker`) checking `tasks`; `next()`
    gives the results in the tasks' order. Each worker takes the next task when it is done
    with its last, so a slow chunk does not hold the others back."""

    def __init__(self, n: int, tasks: list[Chunk]) -> None:
        self.n = min(n, len(tasks))
        self.tasks = tasks
        self.taken = 0
        self.results: list[asyncio.Future[ChunkResult]] = []
        self.procs: list[asyncio.subprocess.Process] = []
        self.feeders: list[asyncio.Task[None]] = []
        self.done = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.results = [loop.create_future() for _ in self.tasks]
        for _ in range(self.n):
            try:
                proc = await asyncio.create_subprocess_exec(
                    *worker_command(),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            except OSError:  # no more processes: those started do the work
                if not self.procs:
                    raise
                break
            self.procs.append(proc)
            self.feeders.append(asyncio.ensure_future(self._feed(proc)))

    async def _feed(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        while self.taken < len(self.tasks):
            i = self.taken
            self.taken += 1
            try:
                data = pickle.dumps(self.tasks[i], protocol=pickle.HIGHEST_PROTOCOL)
                proc.stdin.write(len(data).to_bytes(4, "big") + data)
                await proc.stdin.drain()
                size = int.from_bytes(await proc.stdout.readexactly(4), "big")
                result = pickle.loads(await proc.stdout.readexactly(size))
                if not isinstance(result, ChunkResult):
                    result = ChunkResult(False)
            except Exception:  # the worker died or answered nonsense: the chunk is checked here
                result = ChunkResult(False)
            if not self.results[i].done():
                self.results[i].set_result(result)

    async def next(self) -> ChunkResult:
        result = await self.results[self.done]
        self.done += 1
        return result

    async def stop(self) -> None:
        for feeder in self.feeders:
            feeder.cancel()
        await asyncio.gather(*self.feeders, return_exceptions=True)
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        """After the last result: the workers are idle; end their input and they exit."""
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in self.procs:
            await proc.wait()


class _Run:
    def __init__(
        self,
        session: AsyncSession,
        keys: dict[str, Ed25519PublicKey],
        from_seq: int,
        upper: int,
        page: int,
    ) -> None:
        self.session = session
        self.keys = keys
        self.from_seq = from_seq
        self.upper = upper
        self.page = page
        self.workers = 1
        self.chunk = CHUNK
        self.target: tuple[str, str] | None = None  # what a worker connects to
        self.by_workers = 0  # chunks whose worker results were taken
        self.count = 0
        self.checked = 0
        self.frontier = merkle.Frontier()
        self.prev = GENESIS_HASH
        self.before: str | None = None
        self.prev_at = ""
        self.expected = from_seq
        self.good_size = 0  # size of the latest checkpoint found good
        self.pins: dict[int, Checkpoint] = {}  # checkpoints kept outside the database

    def pin(self, anchors: Anchors, auditor: Sequence[Checkpoint]) -> int | None:
        """Take the checkpoints kept outside the database (anchored, and the auditor's):
        each must be signed by a trusted key and, once the scan reaches its size, match the
        records' root. Returns the latest anchored size."""
        try:
            anchored = anchors.checkpoints(self.keys)
        except AnchorError as exc:
            raise _Tampered(None, f"the anchor outside the database is corrupt: {exc}") from exc
        if not anchored and (anchors.home / PRIVATE_KEY_FILE).exists():
            raise _Tampered(
                None,
                f"no checkpoint is anchored in {anchors.path} although a signing key exists: "
                "the checkpoints were lost (if this ledger predates anchoring, check it and run "
                "`flexgate audit checkpoint --reanchor`)",
            )
        for cp in auditor:
            reason = cp.check_signature(self.keys)
            if reason is not None:
                raise _Tampered(None, f"the checkpoint given to check against: {reason}")
        for cp in (*anchored, *auditor):
            if cp.size > 0 and cp.size >= self.from_seq - 1:
                self.pins[cp.size] = cp
        if self.pins:
            top = max(self.pins)
            if top + 1 > self.upper:
                raise _Tampered(
                    self.upper + 1,
                    f"the database ends at record {self.upper} but the checkpoint of size "
                    f"{top} kept outside it covers {top} records and its checkpoint record "
                    f"{top + 1} (the database is behind it: restored from an older copy, or "
                    "its tail was truncated)",
                )
        return anchored[-1].size if anchored else None

    # --- fetching ---

    async def _fetch(self, after: int) -> Sequence[Any]:
        # A page is a seq range, not a LIMIT: seqs are dense, and a bounded range keeps each
        # query small whatever plan the server picks (even before it has statistics).
        until = min(after + self.page, self.upper)
        conn = await self.session.connection()
        if conn.dialect.name == "postgresql" and conn.dialect.driver == "asyncpg":
            # asyncpg's own records: no per-row Python wrapper, the largest cost of a scan.
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            return list(await driver.fetch(_PG_PAGE_SQL, after, until))
        if conn.dialect.name == "sqlite" and conn.dialect.driver == "aiosqlite":
            # sqlite3's own tuples, fetched in one hop to aiosqlite's thread.
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            return list(await driver.execute_fetchall(_SQLITE_PAGE_SQL, (after, until)))
        result = await conn.execute(
            select(*RECORD_COLUMNS)
            .where(LedgerRecord.seq > after, LedgerRecord.seq <= until)
            .order_by(LedgerRecord.seq)
        )
        return result.all()

    async def _checkpoints_between(self, low: int, high: int) -> dict[int, Checkpoint]:
        rows = (
            await self.session.execute(
                select(*_CHECKPOINT_COLUMNS).where(
                    LedgerCheckpoint.size >= low, LedgerCheckpoint.size <= high
                )
            )
        ).all()
        return {int(r[0]): Checkpoint(*r) for r in rows}

    async def _checkpoints_before(self, size: int) -> AsyncIterator[Checkpoint]:
        last = -1
        while True:
            rows = (
                await self.session.execute(
                    select(*_CHECKPOINT_COLUMNS)
                    .where(LedgerCheckpoint.size > last, LedgerCheckpoint.size < size)
                    .order_by(LedgerCheckpoint.size)
                    .limit(self.page)
                )
            ).all()
            for row in rows:
                yield Checkpoint(*row)
            if len(rows) < self.page:
                return
            last = rows[-1][0]

    # --- checking ---

    def _signature(self, cp: Checkpoint) -> None:
        reason = cp.check_signature(self.keys)
        if reason is not None:
            if not self.keys:
                reason += " (no trusted public key: none in FLEXGATE_HOME; pass --public-key)"
            raise _Tampered(cp.size + 1, reason)

    async def records(self) -> None:
        start = self.from_seq - 1
        if start:
            row = (
                await self.session.execute(
                    select(LedgerRecord.hash, LedgerRecord.at).where(LedgerRecord.seq == start)
                )
            ).first()
            if row is None:
                raise _Tampered(start, f"record {start} is missing (deleted)")
            self.prev, self.prev_at = str(row[0]), str(row[1])
            try:
                self.frontier = await StoredTree(self.session).frontier(start)
            except AuditError as exc:
                raise _Tampered(start, str(exc)) from exc
            # Checkpoints wholly before the range: signatures only (records trusted).
            async for cp in self._checkpoints_before(start):
                self._signature(cp)
        if self.target is not None and self.workers > 1 and self.upper - start >= 2 * self.chunk:
            await self._parallel(start)
        else:
            await self._pages(start)

    async def _parallel(self, start: int) -> None:
        """Check the records in chunks on worker processes (`audit.verify_worker`), then stitch
        them in order: each chunk's first prev_hash and time against the previous chunk's
        last, its checkpoints against the Merkle frontier before them (the frontier before
        the chunk, which starts at a multiple of `chunk`, plus the chunk's own subtrees).
        A chunk with a fault, or one that could not be checked, is checked again from its
        start by `_pages`, so the first fault and its wording are those of one process."""
        assert self.target is not None
        backend, target = self.target
        chunk = self.chunk
        bounds = [start, *range((start // chunk + 1) * chunk, self.upper, chunk), self.upper]
        tasks = [
            Chunk(
                backend,
                target,
                lo,
                hi,
                self.page,
                tuple(self.frontier.nodes) if i == 0 else (),
                tuple(s for s in self.pins if lo <= s < hi),
            )
            for i, (lo, hi) in enumerate(itertools.pairwise(bounds))
        ]
        workers = _Workers(self.workers, tasks)
        try:
            await workers.start()
        except OSError:  # no worker process could start: all in this process
            await self._pages(start)
            return
        try:
            for task in tasks:
                result = await workers.next()
                if not (
                    result.ok and result.first_prev == self.prev and result.first_at >= self.prev_at
                ):
                    await workers.stop()
                    await self._pages(task.lo)
                    return
                await self._stitch(task, result)
            await workers.close()
        finally:
            await workers.stop()  # whatever is left (a fault, a cancellation)

    async def _stitch(self, task: Chunk, result: ChunkResult) -> None:
        """Take a checked chunk into the run: its checkpoints, then its frontier and last hash."""

        def extended(size: int, nodes: list[bytes]) -> merkle.Frontier:
            if task.nodes:  # the worker grew the run's own frontier
                return merkle.Frontier(size, nodes)
            tree = self.frontier.copy()
            local = size - task.lo
            levels = [b for b in range(local.bit_length() - 1, -1, -1) if local >> b & 1]
            for level, node in zip(levels, nodes, strict=True):
                tree.append_subtree(level, node)
            return tree

        if result.events:
            cps = await self._checkpoints_between(task.lo, task.hi - 1)
            for seq, kind, payload, nodes in result.events:
                try:
                    tree = extended(seq - 1, nodes)
                    self._checkpoint_record(seq, kind, payload, cps.get(seq - 1), tree)
                except _Tampered:
                    self.count += seq - self.expected
                    raise
        self.frontier = extended(task.hi, result.nodes)
        self.by_workers += 1
        self.count += task.hi - task.lo
        self.expected = task.hi + 1
        self.prev, self.prev_at, self.before = result.last_hash, result.last_at, result.last_prev

    async def _pages(self, start: int) -> None:
        """Check the records after `start` page by page, in this process."""
        after = start
        rows: Sequence[Any] = await self._fetch(after) if after < self.upper else ()
        while after < self.upper:
            until = min(after + self.page, self.upper)
            cps = await self._checkpoints_between(after, until - 1)
            # Fetch the next page while this one is checked (the scan itself never awaits,
            # so the connection is used by one operation at a time).
            pending = asyncio.ensure_future(self._fetch(until)) if until < self.upper else None
            try:
                self._scan(rows, cps)
                if self.expected <= until:  # the range came back short at its end
                    raise _Tampered(self.expected, f"record {self.expected} is missing (deleted)")
            except BaseException:
                if pending is not None:
                    pending.cancel()
                    await asyncio.gather(pending, return_exceptions=True)
                raise
            after = until
            rows = await pending if pending is not None else ()

    def _scan(self, rows: Sequence[Any], cps: dict[int, Checkpoint]) -> None:
        """Check one page; the hot loop (see the module docstring)."""
        sha = hashlib.sha256
        unhex = bytes.fromhex
        domain = RECORD_DOMAIN
        nodes = self.frontier.nodes
        size = self.frontier.size
        prev, prev_at, expected = self.prev, self.prev_at, self.expected
        before = self.before  # prev_hash of the previous record
        pins = self.pins
        try:
            for seq, rid, kind, at, principal, payload, prev_hash, digest in rows:
                if seq != expected:
                    raise _Tampered(expected, f"record {expected} is missing (deleted)")
                if prev_hash != prev:
                    if prev_hash == before:
                        raise _Tampered(
                            seq - 1,
                            f"record {seq - 1} was inserted: records {seq - 1} and {seq} "
                            f"both follow record {seq - 2}",
                        )
                    raise _Tampered(
                        seq,
                        f"record {seq}'s prev_hash is not the hash of record {seq - 1} "
                        "(a record was removed, inserted or moved here)",
                    )
                fields = f"{rid}{kind}{at}{principal or ''}"
                if '"' in fields or "\\" in fields or not fields.isprintable():
                    computed = stored_record_hash(prev, seq, rid, kind, at, principal, payload)
                else:
                    p = "null" if principal is None else f'"{principal}"'
                    computed = sha(
                        f'{domain}{prev}{{"at":"{at}","id":"{rid}","kind":"{kind}",'
                        f'"payload":{payload},"principal":{p},"seq":{seq}}}'.encode()
                    ).hexdigest()
                if computed != digest:
                    raise _Tampered(seq, f"record {seq} does not match its hash (modified)")
                if at < prev_at:
                    raise _Tampered(seq, f"record {seq} is dated before record {seq - 1}")
                if kind == CHECKPOINT or seq - 1 in cps or seq - 1 in pins:
                    self.frontier.size = size
                    self._checkpoint_record(seq, kind, payload, cps.get(seq - 1), self.frontier)
                h = sha(b"\x00" + unhex(digest)).digest()
                s = size
                while s & 1:
                    h = sha(b"\x01" + nodes.pop() + h).digest()
                    s >>= 1
                nodes.append(h)
                size += 1
                before, prev, prev_at = prev_hash, digest, at
                expected += 1
        finally:
            self.frontier.size = size
            self.count += expected - self.expected
            self.prev, self.prev_at, self.expected, self.before = prev, prev_at, expected, before

    def _checkpoint_record(
        self, seq: int, kind: str, payload: str, row: Checkpoint | None, tree: merkle.Frontier
    ) -> None:
        """Record `seq` is a checkpoint record, or a checkpoint (stored, anchored or the
        auditor's) says it should be one; `tree` is the Merkle frontier of the records before
        it."""
        pin = self.pins.get(seq - 1)
        if pin is not None:
            if tree.root().hex() != pin.root:
                raise _Tampered(
                    self.good_size + 1,
                    f"records {self.good_size + 1}..{pin.size} differ from those of the "
                    f"checkpoint of size {pin.size} kept outside the database (the database "
                    "forked from it: records rewritten and rechained)",
                )
            if kind != CHECKPOINT:
                raise _Tampered(
                    seq,
                    f"record {seq} should be the checkpoint record of the checkpoint of size "
                    f"{pin.size} kept outside the database, but is a {kind!r} record "
                    "(checkpoint deleted)",
                )
        if kind != CHECKPOINT:
            assert row is not None
            self._signature(row)
            raise _Tampered(
                seq,
                f"ledger_checkpoints has a checkpoint of size {row.size} but record {seq} "
                "is not its checkpoint record (forged checkpoint or replaced record)",
            )
        try:
            cp = Checkpoint.from_dict(json.loads(payload))
        except ValueError as exc:
            raise _Tampered(seq, f"checkpoint record {seq} is malformed: {exc}") from exc
        if cp.size != seq - 1:
            raise _Tampered(seq, f"checkpoint record {seq} claims size {cp.size}, not {seq - 1}")
        self._signature(cp)
        if tree.root().hex() != cp.root:
            raise _Tampered(
                self.good_size + 1,
                f"records {self.good_size + 1}..{cp.size} differ from those signed by the "
                f"checkpoint of size {cp.size} (rewritten and rehashed)",
            )
        if row is None:
            raise _Tampered(
                seq, f"checkpoint record {seq} has no row in ledger_checkpoints (deleted)"
            )
        self._signature(row)
        if canonical_json(row.as_dict()).decode("utf-8") != payload:
            raise _Tampered(
                seq, f"ledger_checkpoints row of size {row.size} differs from record {seq}"
            )
        self.checked += 1
        self.good_size = cp.size

    async def finish(self, head_hash: str, head_frontier: str) -> None:
        session, upper = self.session, self.upper
        last = self.expected - 1
        if last < upper:
            raise _Tampered(
                last + 1,
                f"record {last + 1} is missing: the chain head is at {upper} "
                "(the tail was deleted)",
            )
        # Checkpoints past the records checked: made after this run began (their record
        # exists: fine, checked next time), or left behind by a truncation (it does not).
        later = (
            await session.execute(
                select(*_CHECKPOINT_COLUMNS)
                .where(LedgerCheckpoint.size >= max(last, self.from_seq - 1))
                .order_by(LedgerCheckpoint.size)
            )
        ).all()
        for row in later:
            cp = Checkpoint(*row)
            self._signature(cp)
            exists = await session.scalar(
                select(LedgerRecord.seq).where(LedgerRecord.seq == cp.size + 1)
            )
            if exists is None:  # a checkpoint and its record commit together
                raise _Tampered(
                    last + 1,
                    f"the ledger ends at record {last} but the checkpoint of size {cp.size} "
                    "covers more (the tail was truncated)",
                )
        if upper:
            stored = await session.scalar(
                select(LedgerRecord.hash).where(LedgerRecord.seq == upper)
            )
            if stored != head_hash:
                raise _Tampered(upper, f"the chain head does not match record {upper}")
        if self.frontier.to_text() != head_frontier:
            raise _Tampered(upper, "the chain head's Merkle frontier is corrupt")
        now_head = await session.scalar(select(LedgerHead.seq).where(LedgerHead.id == HEAD_ID))
        max_seq = await session.scalar(select(func.max(LedgerRecord.seq)))
        if max_seq is not None and now_head is not None and max_seq > now_head:
            raise _Tampered(
                int(now_head) + 1,
                f"records {int(now_head) + 1}..{max_seq} lie beyond the chain head (inserted)",
            )
