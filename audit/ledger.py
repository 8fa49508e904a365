"""Appending to the hash-chained ledger.

`append` joins the caller's transaction, so a governance change and its record commit
together or not at all. The chain-head row is locked first, which serialises appenders across
coroutines and processes on both SQLite and PostgreSQL; what the chain needs derived from the
records (the head's Merkle frontier, stored Merkle subtrees) is written in the same
transaction, so it can never disagree with what committed. The usage summary is not: it
covers the records up to a watermark and is folded up every few thousand records
(`audit.summary`), off the appends' critical section. Take the head lock last in a
transaction that also changes other tables (append after your own changes): the lock is held
until commit, and appenders queue behind it.

Callers without a transaction of their own (the gateway's inference records) use
`audit.writer.LedgerWriter`, which batches concurrent appends into one transaction.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from audit.canonical import canonical_json, format_time, has_nul, parse_time, stored_record_hash
from audit.db import db_errors
from audit.merkle import Frontier, leaf_hash
from audit.models import GENESIS_HASH, LedgerHead, LedgerMerkleNode, LedgerRecord
from audit.summary import fold_due, fold_usage

HEAD_ID = 1
# Subtrees of 2**8 = 256 records and larger are stored for proofs (see LedgerMerkleNode).
NODE_MIN_LEVEL = 8
INFERENCE = "inference"
CHECKPOINT = "checkpoint"
DEFAULT_PURPOSE = "general"
# Tokens and weight of one expert in one request are at most this (2**40, ~1.1e12), so the
# summary's sums cannot overflow a bigint or a float8 and a fold can never fail on a record.
MAX_USAGE = 2**40
_KIND_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Entry:
    """A committed (or about to be committed) ledger record, as the contract shows it."""

    seq: int
    id: str
    kind: str
    at: datetime
    principal: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "id": self.id,
            "kind": self.kind,
            "at": format_time(self.at),
            "principal": self.principal,
            "payload": self.payload,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True, slots=True)
class NewRecord:
    kind: str
    principal: str | None
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A record checked and encoded before any lock is taken, so a bad one fails alone."""

    kind: str
    principal: str | None
    payload: dict[str, Any]
    payload_text: str


def prepare(
    kind: str, principal: str | None, payload: dict[str, Any], *, _signer: bool = False
) -> Prepared:
    """Validate and canonically encode one record; ValueError if it cannot be appended.

    Everything a database could refuse is refused here, before the record joins a batch, so
    a bad record fails alone: a principal must hold no control character (U+0000 among
    them) and no lone surrogate and the payload must have an RFC 8785 encoding without
    U+0000 (PostgreSQL's jsonb refuses it, which would break every query and fold reading
    the record). Kind `checkpoint` is reserved to the checkpoint signer (`_signer`).
    """
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise ValueError(f"invalid record kind {kind!r}: 1-64 of a-z 0-9 _ . - , lower case first")
    if kind == CHECKPOINT and not _signer:
        raise ValueError("record kind 'checkpoint' is reserved to the checkpoint signer")
    if principal is not None and (
        not isinstance(principal, str)
        or not 0 < len(principal) <= 255
        or _CONTROL_RE.search(principal) is not None
        or not _is_scalar_text(principal)
    ):
        raise ValueError(
            "principal must be None or 1-255 characters, with no control character "
            "(U+0000-U+001F, U+007F) and no lone surrogate"
        )
    if not isinstance(payload, dict):
        raise ValueError("payload must be a JSON object (a dict)")
    try:
        text = canonical_json(payload).decode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(f"payload cannot be encoded as canonical JSON: {exc}") from exc
    if has_nul(text):
        raise ValueError("payload holds U+0000, which the ledger refuses")
    if kind == INFERENCE:
        inference_usage(payload)  # the summary's fold reads it back (audit.summary)
    return Prepared(kind, principal, payload, text)


def _is_scalar_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def inference_usage(payload: dict[str, Any]) -> tuple[str, tuple[tuple[str, int, float], ...]]:
    """(purpose, ((expert, tokens, weight), ...)) of an inference payload; ValueError if malformed.

    The one reading of usage shared by the summary table and its recomputation.
    """
    purpose = payload.get("purpose", DEFAULT_PURPOSE)
    if not isinstance(purpose, str) or not 0 < len(purpose) <= 64:
        raise ValueError("inference payload: purpose must be a string of 1-64 characters")
    usage = payload.get("usage", {})
    if not isinstance(usage, dict):
        raise ValueError("inference payload: usage must map expert id -> {tokens, weight}")
    rows: list[tuple[str, int, float]] = []
    for expert, item in usage.items():
        tokens = item.get("tokens") if isinstance(item, dict) else None
        weight = item.get("weight") if isinstance(item, dict) else None
        # Plain builtin checks (this runs for every expert of every inference record).
        if not (
            isinstance(tokens, int)
            and tokens.__class__ is not bool
            and 0 <= tokens <= MAX_USAGE
            and (
                isinstance(weight, float)
                or (isinstance(weight, int) and weight.__class__ is not bool)
            )
            and 0 <= weight <= MAX_USAGE
            and 0 < len(expert) <= 128
        ):
            raise ValueError(
                f"inference payload: usage[{expert!r}] must be "
                f"{{'tokens': int, 'weight': number}}, each between 0 and {MAX_USAGE}"
            )
        rows.append((expert, tokens, float(weight)))
    return purpose, tuple(rows)


@dataclass(slots=True)
class HeadState:
    seq: int
    hash: str
    at: str | None
    frontier: Frontier


def head_state(row: Any) -> HeadState:
    """HeadState from a (seq, hash, at, frontier) row of ledger_head."""
    if row is None:
        raise RuntimeError("ledger head row is missing: run `flexgate db upgrade`")
    seq, digest, at, frontier = int(row[0]), str(row[1]), row[2], str(row[3])
    return HeadState(seq, digest, at, Frontier.from_text(seq, frontier))


# The head lock on PostgreSQL, as plain SQL for the writer's own connection.
PG_LOCK_SQL = "SELECT seq, hash, at, frontier FROM ledger_head WHERE id = 1 FOR UPDATE"


async def lock_connection(conn: AsyncConnection) -> HeadState:
    """`lock_head` on a connection (in a transaction) rather than a session."""
    columns = (LedgerHead.seq, LedgerHead.hash, LedgerHead.at, LedgerHead.frontier)
    if conn.dialect.name == "postgresql":
        stmt: Any = select(*columns).where(LedgerHead.id == HEAD_ID).with_for_update()
    else:
        stmt = (
            update(LedgerHead)
            .where(LedgerHead.id == HEAD_ID)
            .values(seq=LedgerHead.seq)
            .returning(*columns)
        )
    return head_state((await conn.execute(stmt)).first())


@db_errors
async def lock_head(session: AsyncSession) -> HeadState:
    """Lock the chain head for the rest of the transaction and return it.

    PostgreSQL: `SELECT ... FOR UPDATE`, a row lock that leaves no dead row version behind.
    SQLite: a no-op UPDATE, which takes the database's single write lock before anything is
    read (a plain SELECT would not, and two appenders could then read the same head).
    """
    return await lock_connection(await session.connection())


@dataclass(slots=True)
class Batch:
    """Records chained onto a locked head, with everything their transaction must write."""

    entries: list[Entry]
    columns: tuple[list[Any], ...]  # seq, id, kind, at, principal, payload, prev_hash, hash
    nodes: list[tuple[int, int, str]]  # stored Merkle subtrees completed by these records
    head: tuple[int, str, str, str]  # the new seq, hash, at, frontier


def build_batch(state: HeadState, records: Sequence[Prepared]) -> Batch:
    """Chain `records` onto `state` (pure computation; advances `state.frontier` in place,
    so `state` must be discarded if the batch is not written)."""
    now = datetime.now(UTC)
    at_text = format_time(now)
    if state.at is not None and at_text < state.at:
        # The clock went back (or another host's clock is behind): time never decreases along
        # the chain, so a time range is always one contiguous run of seqs.
        at_text, now = state.at, parse_time(state.at)
    seq, prev, frontier = state.seq, state.hash, state.frontier
    entries: list[Entry] = []
    cols: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
    seqs, ids, kinds, ats, principals, payloads, prevs, hashes = cols
    nodes: list[tuple[int, int, str]] = []
    for rec in records:
        seq += 1
        rid = str(uuid.uuid4())
        digest = stored_record_hash(
            prev, seq, rid, rec.kind, at_text, rec.principal, rec.payload_text
        )
        entries.append(Entry(seq, rid, rec.kind, now, rec.principal, rec.payload, prev, digest))
        seqs.append(seq)
        ids.append(rid)
        kinds.append(rec.kind)
        ats.append(at_text)
        principals.append(rec.principal)
        payloads.append(rec.payload_text)
        prevs.append(prev)
        hashes.append(digest)
        for level, idx, node in frontier.append(leaf_hash(bytes.fromhex(digest)), NODE_MIN_LEVEL):
            nodes.append((level, idx, node.hex()))
        prev = digest
    return Batch(entries, cols, nodes, (seq, prev, at_text, frontier.to_text()))


async def write_batch(conn: AsyncConnection, batch: Batch, before: int) -> None:
    """Write a batch in the connection's transaction, after the head was locked at seq
    `before`; folds the usage summary in the same transaction when the batch crosses a
    multiple of `FOLD_EVERY`."""
    if conn.dialect.name == "postgresql" and conn.dialect.driver == "asyncpg":
        await conn.exec_driver_sql(PG_WRITE_SQL, pg_write_args(batch))
    else:
        await _write_portable(conn, batch)
    if fold_due(before, batch.head[0]):
        await fold_usage(conn)


async def append_locked(
    session: AsyncSession, state: HeadState, records: Sequence[Prepared]
) -> list[Entry]:
    """Append prepared records after `lock_head`; updates `state` and the derived tables."""
    if not records:
        return []
    before = state.seq
    batch = build_batch(state, records)
    await write_batch(await session.connection(), batch, before)
    state.seq, state.hash, state.at = batch.head[0], batch.head[1], batch.head[2]
    return batch.entries


_RECORD_KEYS = ("seq", "id", "kind", "at", "principal", "payload", "prev_hash", "hash")

# Every write of an append in one statement and one round trip (data-modifying CTEs run
# exactly once, whether or not the main statement reads them); arrays carry the rows.
PG_WRITE_SQL = """
WITH records AS (
    INSERT INTO ledger_records (seq, id, kind, at, principal, payload, prev_hash, hash)
    SELECT * FROM unnest($1::bigint[], $2::varchar[], $3::varchar[], $4::varchar[],
                         $5::varchar[], $6::text[], $7::varchar[], $8::varchar[])
), nodes AS (
    INSERT INTO ledger_merkle_nodes (level, idx, hash)
    SELECT * FROM unnest($9::smallint[], $10::bigint[], $11::varchar[])
)
UPDATE ledger_head SET seq = $12, hash = $13, at = $14, frontier = $15 WHERE id = 1
"""


# The writer's compare-and-set append (migrations/versions/0101_ledger_pipeline.py): one round
# trip; $1, $2 are the expected head's seq and hash.
PG_APPEND_SQL = (
    "SELECT * FROM flexgate_ledger_append(" + ", ".join(f"${i}" for i in range(1, 18)) + ")"
)


def pg_write_args(batch: Batch) -> tuple[Any, ...]:
    """The 15 parameters of PG_WRITE_SQL."""
    node_cols: list[list[Any]] = [list(c) for c in zip(*batch.nodes, strict=True)] or [[], [], []]
    return (*batch.columns, *node_cols, *batch.head)


async def _write_portable(conn: AsyncConnection, batch: Batch) -> None:
    """Core statements on the connection (same transaction); the ORM's bulk paths cost
    several times more per statement."""
    rows = [
        dict(zip(_RECORD_KEYS, values, strict=True)) for values in zip(*batch.columns, strict=True)
    ]
    await conn.execute(insert(LedgerRecord), rows)
    if batch.nodes:
        await conn.execute(
            insert(LedgerMerkleNode),
            [{"level": lv, "idx": ix, "hash": h} for lv, ix, h in batch.nodes],
        )
    seq, digest, at, frontier = batch.head
    await conn.execute(
        update(LedgerHead)
        .where(LedgerHead.id == HEAD_ID)
        .values(seq=seq, hash=digest, at=at, frontier=frontier)
    )


@db_errors
async def append_many(session: AsyncSession, records: list[NewRecord]) -> list[Entry]:
    """Append records in order inside the session's current transaction (not committed here).

    Every record is checked before the head is locked: a bad one raises ValueError and nothing
    is written.
    """
    if not records:
        return []
    prepared = [prepare(r.kind, r.principal, r.payload) for r in records]
    state = await lock_head(session)
    return await append_locked(session, state, prepared)


async def append(
    session: AsyncSession, *, kind: str, principal: str | None, payload: dict[str, Any]
) -> Entry:
    """Append one record inside the caller's transaction; it commits with the caller's change."""
    (entry,) = await append_many(session, [NewRecord(kind, principal, payload)])
    return entry


@db_errors
async def head(session: AsyncSession) -> tuple[int, str]:
    """(seq, hash) of the latest committed record; (0, GENESIS_HASH) for an empty ledger."""
    row = (await session.execute(select(LedgerHead.seq, LedgerHead.hash))).first()
    return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))
