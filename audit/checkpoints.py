"""Signed checkpoints of the ledger, and Merkle proofs against them.

A checkpoint (`audit.format.Checkpoint`) commits to the first `size` records. It is made
under the chain-head lock, only when the tree extends the latest checkpoint anchored outside
the database (`audit.anchor`, an RFC 9162 consistency proof), anchored once it commits, stored in
`ledger_checkpoints`, and recorded in the ledger itself as the `checkpoint` record at seq
`size + 1`, so deleting or rewriting either copy is detected by verification.

Proofs are assembled from the stored subtrees of 256+ records (`ledger_merkle_nodes`) and at
most a few hundred record hashes, so they cost milliseconds at any ledger size. Each proof is
checked against its checkpoint before it is returned: corrupt stored data is reported as an
error, never handed out as a proof.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from audit import merkle
from audit.anchor import AnchorError, AnchorRefused, Anchors, refused
from audit.canonical import format_time, parse_time
from audit.db import db_errors
from audit.errors import AuditError, InvalidQuery
from audit.format import Checkpoint
from audit.ledger import (
    CHECKPOINT,
    NODE_MIN_LEVEL,
    HeadState,
    append_locked,
    lock_head,
    prepare,
)
from audit.models import LedgerCheckpoint, LedgerMerkleNode, LedgerRecord
from audit.signing import Signer


def _from_row(row: LedgerCheckpoint) -> Checkpoint:
    return Checkpoint(row.size, row.root, row.at, row.key_id, row.signature)


@db_errors
async def create_checkpoint(
    session: AsyncSession, signer: Signer, *, anchors: Anchors | None = None, reanchor: bool = False
) -> Checkpoint:
    """Sign a checkpoint over every record so far, inside the caller's transaction.

    Refused (`AnchorRefused`, nothing written) unless the tree extends the latest anchored
    checkpoint (`audit.anchor`); the checkpoint is anchored when the transaction commits.
    `reanchor` skips that proof and starts the anchor again from the ledger as it is (an
    operator's explicit decision: `flexgate audit checkpoint --reanchor`).
    """
    state = await lock_head(session)
    return await _checkpoint_locked(session, state, signer, anchors, reanchor=reanchor)


@db_errors
async def maybe_checkpoint(
    session: AsyncSession,
    signer: Signer,
    *,
    every: int | None,
    interval_s: float | None,
    anchors: Anchors | None = None,
) -> Checkpoint | None:
    """Make a checkpoint if `every` records or `interval_s` seconds have passed since the last.

    Decided under the head lock, so processes sharing the database never make two for one
    due point. Records counted are those after the last checkpoint's own record.
    """
    state = await lock_head(session)
    last = await latest_checkpoint(session)
    pending = state.seq - (last.size + 1 if last else 0)
    if pending <= 0:
        return None
    due = every is not None and pending >= every
    if interval_s is not None and not due:
        due = (
            last is None or (datetime.now(UTC) - parse_time(last.at)).total_seconds() >= interval_s
        )
    return await _checkpoint_locked(session, state, signer, anchors) if due else None


async def check_extends(
    session: AsyncSession, state: HeadState, anchored: Checkpoint | None
) -> str | None:
    """None when the ledger (head `state`) extends `anchored`, proven with an RFC 9162
    consistency proof assembled from the stored tree; else why not."""
    if anchored is None or anchored.size == 0:
        return None
    size, root = state.seq, state.frontier.root()
    if anchored.size > size:
        return (
            f"the ledger holds {size} records but its anchored checkpoint covers "
            f"{anchored.size} (restored from an older copy, or truncated)"
        )
    try:
        path = [
            await StoredTree(session).mth(a, b)
            for a, b in merkle.consistency_ranges(anchored.size, size)
        ]
    except AuditError as exc:
        return f"no consistency proof from the anchored checkpoint of size {anchored.size}: {exc}"
    if not merkle.verify_consistency(anchored.size, size, bytes.fromhex(anchored.root), root, path):
        return (
            f"the ledger does not extend its anchored checkpoint of size {anchored.size}: "
            "records it covers were rewritten (the consistency proof fails)"
        )
    return None


_PENDING = "flexgate_anchor_pending"


def _anchor_on_commit(session: AsyncSession, anchors: Anchors, cp: Checkpoint) -> None:
    """Anchor `cp` once the session's transaction commits (dropped if it rolls back)."""
    info = session.sync_session.info
    if _PENDING not in info:
        info[_PENDING] = []

        def committed(sync_session: Any) -> None:
            for a, c in sync_session.info.get(_PENDING, []):
                a.publish(c)
            sync_session.info[_PENDING] = []

        def rolled_back(sync_session: Any) -> None:
            sync_session.info[_PENDING] = []

        event.listen(session.sync_session, "after_commit", committed)
        event.listen(session.sync_session, "after_rollback", rolled_back)
    info[_PENDING].append((anchors, cp))


async def _checkpoint_locked(
    session: AsyncSession,
    state: HeadState,
    signer: Signer,
    anchors: Anchors | None = None,
    *,
    reanchor: bool = False,
) -> Checkpoint:
    anchors = anchors or Anchors.from_settings(home=signer.home)
    if not reanchor:
        try:
            anchored = anchors.latest({signer.key_id: signer.public_key})
        except AnchorError as exc:
            refused(str(exc))
            raise AnchorRefused(f"checkpoint refused: {exc}") from exc
        why = await check_extends(session, state, anchored)
        if why is not None:
            refused(why)
            raise AnchorRefused(f"checkpoint refused: {why}")
    at = format_time(datetime.now(UTC))
    if state.at is not None and at < state.at:
        at = state.at
    unsigned = Checkpoint(state.seq, state.frontier.root().hex(), at, signer.key_id, "")
    cp = replace(unsigned, signature=signer.sign(unsigned.signed_message()))
    await append_locked(session, state, [prepare(CHECKPOINT, None, cp.as_dict(), _signer=True)])
    await session.execute(insert(LedgerCheckpoint).values(**cp.as_dict()))
    _anchor_on_commit(session, anchors, cp)
    return cp


@db_errors
async def latest_checkpoint(session: AsyncSession) -> Checkpoint | None:
    row = await session.scalar(
        select(LedgerCheckpoint).order_by(LedgerCheckpoint.size.desc()).limit(1)
    )
    return None if row is None else _from_row(row)


@db_errors
async def get_checkpoint(session: AsyncSession, size: int) -> Checkpoint | None:
    row = await session.get(LedgerCheckpoint, size)
    return None if row is None else _from_row(row)


@db_errors
async def list_checkpoints(
    session: AsyncSession, *, after: int | None = None, limit: int = 100
) -> list[Checkpoint]:
    """Checkpoints by size, `after` a size (cursor), at most `limit` (1..1000)."""
    if not 1 <= limit <= 1000:
        raise InvalidQuery("limit must be between 1 and 1000")
    stmt = select(LedgerCheckpoint).order_by(LedgerCheckpoint.size).limit(limit)
    if after is not None:
        stmt = stmt.where(LedgerCheckpoint.size > after)
    return [_from_row(r) for r in (await session.scalars(stmt)).all()]


class StoredTree:
    """Merkle subtree hashes of the committed ledger, from stored nodes and record hashes."""

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def leaves(self, start: int, end: int) -> list[bytes]:
        """Leaf hashes of leaves [start, end) (records start+1 .. end)."""
        hashes = (
            await self.session.scalars(
                select(LedgerRecord.hash)
                .where(LedgerRecord.seq > start, LedgerRecord.seq <= end)
                .order_by(LedgerRecord.seq)
            )
        ).all()
        if len(hashes) != end - start:
            raise AuditError(
                f"ledger records {start + 1}..{end} are incomplete: run `flexgate audit verify`"
            )
        return [merkle.leaf_hash(bytes.fromhex(h)) for h in hashes]

    async def mth(self, start: int, end: int) -> bytes:
        """MTH of leaves [start, end)."""
        n = end - start
        if n <= 1 << NODE_MIN_LEVEL:
            return merkle.root_of(await self.leaves(start, end))
        if n & (n - 1) == 0 and start % n == 0:
            level = n.bit_length() - 1
            stored = await self.session.scalar(
                select(LedgerMerkleNode.hash).where(
                    LedgerMerkleNode.level == level, LedgerMerkleNode.idx == start >> level
                )
            )
            if stored is not None:
                return bytes.fromhex(stored)
        k = merkle.split_point(n)
        return merkle.node_hash(await self.mth(start, start + k), await self.mth(start + k, end))

    async def frontier(self, size: int) -> merkle.Frontier:
        """The frontier of the first `size` leaves."""
        out = merkle.Frontier()
        for pos, level in merkle.perfect_subtrees(0, size):
            out.append_subtree(level, await self.mth(pos, pos + (1 << level)))
        return out

    async def range_nodes(self, start: int, end: int) -> list[bytes]:
        """Hashes of the aligned perfect subtrees that make up [start, end), left to right."""
        return [
            await self.mth(pos, pos + (1 << level))
            for pos, level in merkle.perfect_subtrees(start, end)
        ]


@dataclass(frozen=True, slots=True)
class InclusionProof:
    """Proof that record `seq` (hash `record_hash`) is leaf `seq - 1` under `checkpoint`."""

    seq: int
    record_hash: str
    path: list[str]
    checkpoint: Checkpoint

    def verify(self) -> bool:
        return merkle.verify_inclusion(
            self.seq - 1,
            self.checkpoint.size,
            merkle.leaf_hash(bytes.fromhex(self.record_hash)),
            [bytes.fromhex(p) for p in self.path],
            bytes.fromhex(self.checkpoint.root),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "leaf_index": self.seq - 1,
            "tree_size": self.checkpoint.size,
            "record_hash": self.record_hash,
            "leaf_hash": hashlib.sha256(b"\x00" + bytes.fromhex(self.record_hash)).hexdigest(),
            "path": self.path,
            "checkpoint": self.checkpoint.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    """Proof that checkpoint `old`'s tree is a prefix of checkpoint `new`'s."""

    old: Checkpoint
    new: Checkpoint
    path: list[str]

    def verify(self) -> bool:
        return merkle.verify_consistency(
            self.old.size,
            self.new.size,
            bytes.fromhex(self.old.root),
            bytes.fromhex(self.new.root),
            [bytes.fromhex(p) for p in self.path],
        )

    def as_dict(self) -> dict[str, Any]:
        return {"old": self.old.as_dict(), "new": self.new.as_dict(), "path": self.path}


async def _checkpoint_or_latest(session: AsyncSession, size: int | None) -> Checkpoint:
    cp = await (latest_checkpoint(session) if size is None else get_checkpoint(session, size))
    if cp is None:
        raise InvalidQuery(
            "no checkpoint yet: run `flexgate audit checkpoint`"
            if size is None
            else f"there is no checkpoint of size {size}"
        )
    return cp


@db_errors
async def inclusion_proof(
    session: AsyncSession, seq: int, *, checkpoint_size: int | None = None
) -> InclusionProof:
    """Inclusion proof of record `seq` against the checkpoint of `checkpoint_size` (default:
    the latest); InvalidQuery if the record is not covered by it."""
    cp = await _checkpoint_or_latest(session, checkpoint_size)
    if not 1 <= seq <= cp.size:
        raise InvalidQuery(
            f"record {seq} is not covered by the checkpoint of size {cp.size} "
            f"(it covers records 1..{cp.size})"
        )
    record_hash = await session.scalar(select(LedgerRecord.hash).where(LedgerRecord.seq == seq))
    if record_hash is None:
        raise AuditError(f"record {seq} is missing: run `flexgate audit verify`")
    tree = StoredTree(session)
    path = [(await tree.mth(a, b)).hex() for a, b in merkle.inclusion_ranges(seq - 1, cp.size)]
    proof = InclusionProof(seq, record_hash, path, cp)
    if not proof.verify():
        raise AuditError(
            f"the stored ledger does not match the checkpoint of size {cp.size}: "
            "run `flexgate audit verify`"
        )
    return proof


@db_errors
async def consistency_proof(
    session: AsyncSession, old_size: int, new_size: int | None = None
) -> ConsistencyProof:
    """Consistency proof between two checkpoints (`new_size` default: the latest)."""
    new = await _checkpoint_or_latest(session, new_size)
    old = await _checkpoint_or_latest(session, old_size)
    if old.size > new.size:
        raise InvalidQuery(f"checkpoint {old.size} is newer than checkpoint {new.size}")
    tree = StoredTree(session)
    path = [(await tree.mth(a, b)).hex() for a, b in merkle.consistency_ranges(old.size, new.size)]
    proof = ConsistencyProof(old, new, path)
    if not proof.verify():
        raise AuditError(
            f"checkpoints {old.size} and {new.size} are not consistent with the stored ledger: "
            "run `flexgate audit verify`"
        )
    return proof
