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

What it cannot see, by construction: records appended after the latest checkpoint can be
rewritten consistently by someone with write access to the database until the next checkpoint
covers them; publish checkpoints (`GET /v1/audit/checkpoints/latest`, exports) to fix them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from audit import merkle
from audit.canonical import canonical_json, stored_record_hash
from audit.checkpoints import Checkpoint, StoredTree
from audit.db import db_errors
from audit.errors import AuditError, InvalidQuery
from audit.ledger import CHECKPOINT, HEAD_ID
from audit.models import (
    GENESIS_HASH,
    RECORD_COLUMNS,
    LedgerCheckpoint,
    LedgerHead,
    LedgerRecord,
)
from audit.signing import trusted_public_keys

PAGE = 5000

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

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "checkpoints": self.checkpoints,
            "head_seq": self.head_seq,
        }


class _Tampered(Exception):
    def __init__(self, seq: int, reason: str) -> None:
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
) -> VerifyReport:
    """Verify the ledger from `from_seq` (the records before it are trusted as stored).

    `public_keys` (key_id -> key) defaults to FLEXGATE_HOME's key. Returns a report; raises
    only for bad arguments (InvalidQuery) or an unreachable database (DatabaseUnavailable
    when wrapped in `audit.db.translate_errors`, as the CLI does).
    """
    if from_seq < 1:
        raise InvalidQuery("from_seq must be >= 1")
    keys = dict(trusted_public_keys() if public_keys is None else public_keys)
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
    run = _Run(session, keys, from_seq, upper, page_size)
    try:
        await run.records()
        await run.finish(head_hash, head_frontier)
    except _Tampered as bad:
        return VerifyReport(False, run.count, bad.seq, bad.reason, run.checked, upper)
    return VerifyReport(True, run.count, None, None, run.checked, upper)


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
        self.count = 0
        self.checked = 0
        self.frontier = merkle.Frontier()
        self.prev = GENESIS_HASH
        self.before: str | None = None
        self.prev_at = ""
        self.expected = from_seq
        self.good_size = 0  # size of the latest checkpoint found good

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
        nodes = self.frontier.nodes
        size = self.frontier.size
        prev, prev_at, expected = self.prev, self.prev_at, self.expected
        before = self.before  # prev_hash of the previous record
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
                        f'{prev}{{"at":"{at}","id":"{rid}","kind":"{kind}",'
                        f'"payload":{payload},"principal":{p},"seq":{seq}}}'.encode()
                    ).hexdigest()
                if computed != digest:
                    raise _Tampered(seq, f"record {seq} does not match its hash (modified)")
                if at < prev_at:
                    raise _Tampered(seq, f"record {seq} is dated before record {seq - 1}")
                if kind == CHECKPOINT or seq - 1 in cps:
                    self.frontier.size = size
                    self._checkpoint_record(seq, kind, payload, cps.get(seq - 1))
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

    def _checkpoint_record(self, seq: int, kind: str, payload: str, row: Checkpoint | None) -> None:
        """Record `seq` is a checkpoint record, or a stored checkpoint says it should be one."""
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
        if self.frontier.root().hex() != cp.root:
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
