"""Streamed JSONL / CSV export of the ledger (verified offline by `audit.offline`).

An export is checkable on its own, away from the database (`flexgate audit verify-export`).
It is laid out as:

- a header line — JSONL: `{"flexgate_export": {...}}`; CSV: after the column names, a row whose
  `seq` cell is `#flexgate_export` and whose `payload` cell holds the same JSON — with
  `version`, `format`, `since`, `until`, `first_seq`, `prev_hash` (hash of the record before
  the first exported one), `checkpoint` (the latest signed checkpoint when the export began, or
  null), `public_key` (PEM of the signing key, or null: for information, never trusted),
  `left`: the Merkle subtree hashes covering the records before `first_seq`, and
  `consistency`: consistency proofs `{old_size, path}` from the sizes asked for
  (`--consistency-from`) to the checkpoint;
- one line per record, every field of the contract, `seq` and `hash` included (CSV: `payload`
  is its canonical JSON text, an empty `principal` cell is null);
- a trailer — `{"flexgate_export_end": {...}}` / a `#flexgate_export_end` row — with
  `records`, `last_seq`, `last_hash` and `right`: the subtree hashes covering the checkpoint's
  records after the last exported one.

The records exported stop at the checkpoint's own record (seq size + 1): records appended
after the checkpoint are not covered by it and are left for the next export. An empty range
is refused (`NothingToExport`): an empty file is never a valid export. Memory is constant.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from audit import merkle
from audit.canonical import canonical_json, format_time, json_string
from audit.checkpoints import StoredTree, latest_checkpoint
from audit.db import db_errors, translate_errors
from audit.errors import AuditError, InvalidQuery
from audit.format import Checkpoint
from audit.models import RECORD_COLUMNS, LedgerRecord
from audit.offline import (
    CSV_COLUMNS,
    HEADER_KEY,
    TRAILER_KEY,
    VERSION,
    ExportReport,
    verify_export,
)
from audit.query import parse_when

__all__ = [
    "CSV_COLUMNS",
    "ExportReport",
    "NothingToExport",
    "checkpoint_json",
    "export_lines",
    "verify_export",
]

ExportFormat = Literal["jsonl", "csv"]
FORMATS = ("jsonl", "csv")


class NothingToExport(AuditError):
    """No record matches the range (nothing is written)."""


def _jsonl_record(row: Any) -> str:
    seq, rid, kind, at, principal, payload, prev_hash, digest = row
    p = "null" if principal is None else json_string(principal)
    # Built from the stored canonical payload text, never re-encoded: what is exported is
    # exactly what was hashed.
    return (
        f'{{"seq":{seq},"id":{json_string(rid)},"kind":{json_string(kind)},'
        f'"at":{json_string(at)},"principal":{p},"payload":{payload},'
        f'"prev_hash":{json_string(prev_hash)},"hash":{json_string(digest)}}}\n'
    )


class _Csv:
    def __init__(self) -> None:
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer, lineterminator="\n")

    def line(self, cells: Iterable[Any]) -> str:
        self.writer.writerow(cells)
        text = self.buffer.getvalue()
        self.buffer.seek(0)
        self.buffer.truncate()
        return text

    def meta(self, key: str, body: dict[str, Any]) -> str:
        return self.line([f"#{key}", "", "", "", "", json.dumps(body), "", ""])


@db_errors
async def export_lines(
    session: AsyncSession,
    *,
    fmt: str = "jsonl",
    since: str | datetime | None = None,
    until: str | datetime | None = None,
    public_key_pem: str | None = None,
    consistency_from: Sequence[int] = (),
    page: int = 1000,
) -> AsyncIterator[str]:
    """Lines (with newline) of an export of records with since <= at < until, in seq order,
    up to the latest checkpoint's own record.

    Validates its arguments before yielding anything (InvalidQuery); NothingToExport, before
    the first line, when no record matches. `public_key_pem` is the signing key to carry in
    the header (information only). `consistency_from`: checkpoint sizes an auditor kept; the
    header carries a consistency proof from each to the export's checkpoint.
    """
    if fmt not in FORMATS:
        raise InvalidQuery(f"invalid format {fmt!r}: jsonl or csv")
    start, end = parse_when(since, "since"), parse_when(until, "until")
    if start is not None and end is not None and start >= end:
        raise InvalidQuery("since must be earlier than until")
    for size in consistency_from:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size < 2**53:
            raise InvalidQuery(f"invalid consistency size {size!r}: a whole number >= 0")
    return _export(session, fmt, start, end, public_key_pem, tuple(consistency_from), page)


async def _export(
    session: AsyncSession,
    fmt: str,
    start: datetime | None,
    end: datetime | None,
    public_key_pem: str | None,
    consistency_from: tuple[int, ...],
    page: int,
) -> AsyncIterator[str]:
    async with translate_errors():
        async for line in _export_lines(
            session, fmt, start, end, public_key_pem, consistency_from, page
        ):
            yield line


async def _export_lines(
    session: AsyncSession,
    fmt: str,
    start: datetime | None,
    end: datetime | None,
    public_key_pem: str | None,
    consistency_from: tuple[int, ...],
    page: int,
) -> AsyncIterator[str]:
    checkpoint = await latest_checkpoint(session)
    where = []
    if start is not None:
        where.append(LedgerRecord.at >= format_time(start))
    if end is not None:
        where.append(LedgerRecord.at < format_time(end))
    if checkpoint is not None:  # what the checkpoint covers, and its own record
        where.append(LedgerRecord.seq <= checkpoint.size + 1)
    writer = _Csv() if fmt == "csv" else None
    after, count, last = 0, 0, None
    while True:
        rows = (
            await session.execute(
                select(*RECORD_COLUMNS)
                .where(*where, LedgerRecord.seq > after)
                .order_by(LedgerRecord.seq)
                .limit(page)
            )
        ).all()
        if not rows:
            break
        if last is None:  # first page: the header
            header = await _header(
                session, fmt, start, end, rows[0], checkpoint, public_key_pem, consistency_from
            )
            if writer is None:
                yield json.dumps({HEADER_KEY: header}) + "\n"
            else:
                yield writer.line(CSV_COLUMNS)
                yield writer.meta(HEADER_KEY, header)
        for row in rows:
            if writer is None:
                yield _jsonl_record(row)
            else:
                cells = list(row)
                cells[4] = "" if cells[4] is None else cells[4]
                yield writer.line(cells)
        count += len(rows)
        last = rows[-1]
        after = int(last[0])
    if last is None:
        raise NothingToExport("no record matches that range: nothing exported")
    right: list[str] = []
    if checkpoint is not None and after < checkpoint.size:
        tree = StoredTree(session)
        right = [h.hex() for h in await tree.range_nodes(after, checkpoint.size)]
    trailer = {"records": count, "last_seq": after, "last_hash": last[7], "right": right}
    yield (
        json.dumps({TRAILER_KEY: trailer}) + "\n"
        if writer is None
        else writer.meta(TRAILER_KEY, trailer)
    )


async def _header(
    session: AsyncSession,
    fmt: str,
    start: datetime | None,
    end: datetime | None,
    first: Any,
    checkpoint: Checkpoint | None,
    public_key_pem: str | None,
    consistency_from: tuple[int, ...],
) -> dict[str, Any]:
    first_seq = int(first[0])
    tree = StoredTree(session)
    left = [h.hex() for h in await tree.range_nodes(0, first_seq - 1)]
    proofs = []
    for size in sorted(set(consistency_from)):
        if checkpoint is None or size > checkpoint.size:
            raise InvalidQuery(
                f"no consistency proof from size {size}: the export's checkpoint covers "
                f"{0 if checkpoint is None else checkpoint.size} records"
            )
        path = [
            (await tree.mth(a, b)).hex()
            for a, b in merkle.consistency_ranges(size, checkpoint.size)
        ]
        proofs.append({"old_size": size, "path": path})
    return {
        "version": VERSION,
        "format": fmt,
        "since": None if start is None else format_time(start),
        "until": None if end is None else format_time(end),
        "first_seq": first_seq,
        "prev_hash": first[6],
        "checkpoint": None if checkpoint is None else checkpoint.as_dict(),
        "public_key": public_key_pem,
        "left": left,
        "consistency": proofs,
    }


def checkpoint_json(cp: Checkpoint, public_key_pem: str | None) -> str:
    """A checkpoint and its public key as one JSON document (for publishing)."""
    return canonical_json({"checkpoint": cp.as_dict(), "public_key": public_key_pem}).decode()
