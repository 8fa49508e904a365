"""Streamed JSONL / CSV export of the ledger, and its offline verification.

An export is checkable on its own, away from the database (`flexgate audit verify-export`).
It is laid out as:

- a header line — JSONL: `{"flexgate_export": {...}}`; CSV: after the column names, a row whose
  `seq` cell is `#flexgate_export` and whose `payload` cell holds the same JSON — with
  `version`, `format`, `since`, `until`, `first_seq`, `prev_hash` (hash of the record before
  the first exported one), `checkpoint` (the latest signed checkpoint when the export began, or
  null), `public_key` (PEM of the signing key, or null) and `left`: the Merkle subtree hashes
  covering the records before `first_seq` (null when the export starts after the checkpoint);
- one line per record, every field of the contract, `seq` and `hash` included (CSV: `payload`
  is its canonical JSON text, an empty `principal` cell is null);
- a trailer — `{"flexgate_export_end": {...}}` / a `#flexgate_export_end` row — with
  `records`, `last_seq`, `last_hash` and `right`: the subtree hashes covering the checkpoint's
  records after the last exported one.

The verifier recomputes every record hash from the contract's definition, checks the chain
from `prev_hash`, rebuilds the checkpoint's Merkle root from `left` + the exported records +
`right` (RFC 9162 compact ranges), and checks the checkpoint's signature with a trusted key:
FLEXGATE_HOME's or `--public-key` (the key carried in the file is only used, and reported
so, when no other is at hand). The subtree hashes need no trust: a wrong one changes the root.
Records after the checkpoint are chain-checked only. A missing trailer means a cut-off export.

An empty range exports as an empty file (no header either). Memory is constant both ways.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from audit import merkle
from audit.canonical import canonical_json, format_time, json_string, record_hash
from audit.checkpoints import StoredTree, latest_checkpoint
from audit.db import db_errors, translate_errors
from audit.errors import InvalidQuery, SigningKeyError
from audit.format import Checkpoint, key_id_of
from audit.models import RECORD_COLUMNS, LedgerRecord
from audit.query import parse_when
from audit.signing import load_public_key, trusted_public_keys

ExportFormat = Literal["jsonl", "csv"]
FORMATS = ("jsonl", "csv")
CSV_COLUMNS = ("seq", "id", "kind", "at", "principal", "payload", "prev_hash", "hash")
HEADER_KEY = "flexgate_export"
TRAILER_KEY = "flexgate_export_end"
VERSION = 1


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
    page: int = 1000,
) -> AsyncIterator[str]:
    """Lines (with newline) of an export of records with since <= at < until, in seq order.

    Validates its arguments before yielding anything (InvalidQuery). `public_key_pem` is the
    signing key to carry in the header (default: none; the CLI passes FLEXGATE_HOME's).
    """
    if fmt not in FORMATS:
        raise InvalidQuery(f"invalid format {fmt!r}: jsonl or csv")
    start, end = parse_when(since, "since"), parse_when(until, "until")
    if start is not None and end is not None and start >= end:
        raise InvalidQuery("since must be earlier than until")
    return _export(session, fmt, start, end, public_key_pem, page)


async def _export(
    session: AsyncSession,
    fmt: str,
    start: datetime | None,
    end: datetime | None,
    public_key_pem: str | None,
    page: int,
) -> AsyncIterator[str]:
    async with translate_errors():
        async for line in _export_lines(session, fmt, start, end, public_key_pem, page):
            yield line


async def _export_lines(
    session: AsyncSession,
    fmt: str,
    start: datetime | None,
    end: datetime | None,
    public_key_pem: str | None,
    page: int,
) -> AsyncIterator[str]:
    checkpoint = await latest_checkpoint(session)
    where = []
    if start is not None:
        where.append(LedgerRecord.at >= format_time(start))
    if end is not None:
        where.append(LedgerRecord.at < format_time(end))
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
            header = await _header(session, fmt, start, end, rows[0], checkpoint, public_key_pem)
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
        return  # an empty range is an empty file
    right = None
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
) -> dict[str, Any]:
    first_seq = int(first[0])
    left = None
    if checkpoint is not None and first_seq - 1 <= checkpoint.size:
        tree = StoredTree(session)
        left = [h.hex() for h in await tree.range_nodes(0, first_seq - 1)]
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
    }


# --- offline verification ---


@dataclass(frozen=True)
class ExportReport:
    ok: bool
    records: int
    first_bad_seq: int | None
    reason: str | None
    checkpoint_size: int | None  # the checkpoint the records were checked against
    merkle_checked: bool  # the records up to checkpoint_size were checked against its root
    key_id: str | None
    key_source: str | None  # "trusted" (FLEXGATE_HOME / --public-key) or "export file"

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "checkpoint_size": self.checkpoint_size,
            "merkle_checked": self.merkle_checked,
            "key_id": self.key_id,
            "key_source": self.key_source,
        }


class _Bad(Exception):
    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.seq, self.reason = seq, reason


def _parse_lines(lines: Iterable[str]) -> Iterable[tuple[str, Any]]:
    """("header"|"record"|"trailer"|"end", value) from JSONL or CSV lines."""
    it = iter(lines)
    first = next(it, None)
    while first is not None and not first.strip():
        first = next(it, None)
    if first is None:
        return
    if first.lstrip().startswith("{"):
        yield from _parse_jsonl(first, it)
    else:
        yield from _parse_csv(first, it)


def _parse_jsonl(first: str, it: Iterable[str]) -> Iterable[tuple[str, Any]]:
    def chain() -> Iterable[str]:
        yield first
        yield from it

    for number, line in enumerate(chain(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise _Bad(None, f"line {number} is not JSON: {exc}") from exc
        if isinstance(obj, dict) and HEADER_KEY in obj:
            yield "header", obj[HEADER_KEY]
        elif isinstance(obj, dict) and TRAILER_KEY in obj:
            yield "trailer", obj[TRAILER_KEY]
        else:
            yield "record", obj


def _parse_csv(first: str, it: Iterable[str]) -> Iterable[tuple[str, Any]]:
    def chain() -> Iterable[str]:
        yield first
        yield from it

    reader = csv.reader(chain())
    try:
        yield from _csv_rows(reader)
    except csv.Error as exc:
        raise _Bad(None, f"CSV row {reader.line_num} is malformed: {exc}") from exc


def _csv_rows(reader: Any) -> Iterable[tuple[str, Any]]:
    columns = next(reader, None)
    if columns is None or tuple(columns) != CSV_COLUMNS:
        raise _Bad(None, f"not a FlexGate export: the first CSV row must be {CSV_COLUMNS}")
    for cells in reader:
        if len(cells) != len(CSV_COLUMNS):
            raise _Bad(None, f"CSV row {reader.line_num} has {len(cells)} cells, not 8")
        seq, rid, kind, at, principal, payload, prev_hash, digest = cells
        try:
            if seq in (f"#{HEADER_KEY}", f"#{TRAILER_KEY}"):
                body = json.loads(payload)
                yield ("header" if seq == f"#{HEADER_KEY}" else "trailer"), body
                continue
            record = {
                "seq": int(seq),
                "id": rid,
                "kind": kind,
                "at": at,
                "principal": principal or None,
                "payload": json.loads(payload),
                "prev_hash": prev_hash,
                "hash": digest,
            }
        except ValueError as exc:
            raise _Bad(None, f"CSV row {reader.line_num} is malformed: {exc}") from exc
        yield "record", record


def verify_export(
    lines: Iterable[str], *, public_keys: Mapping[str, Ed25519PublicKey] | None = None
) -> ExportReport:
    """Check an export offline (see the module docstring); never raises for bad content."""
    state = _ExportCheck(public_keys)
    try:
        state.run(lines)
    except _Bad as bad:
        return state.report(bad.seq, bad.reason)
    return state.report(None, None)


class _ExportCheck:
    def __init__(self, public_keys: Mapping[str, Ed25519PublicKey] | None) -> None:
        self.given_keys = public_keys
        self.count = 0
        self.checkpoint: Checkpoint | None = None
        self.merkle_checked = False
        self.key_id: str | None = None
        self.key_source: str | None = None

    def report(self, seq: int | None, reason: str | None) -> ExportReport:
        return ExportReport(
            reason is None,
            self.count,
            seq,
            reason,
            None if self.checkpoint is None else self.checkpoint.size,
            self.merkle_checked and reason is None,
            self.key_id,
            self.key_source,
        )

    def _keys(self, header: dict[str, Any]) -> dict[str, Ed25519PublicKey]:
        if self.given_keys is not None:
            self.key_source = "trusted"
            return dict(self.given_keys)
        try:
            keys = trusted_public_keys()
        except SigningKeyError:
            keys = {}
        if keys:
            self.key_source = "trusted"
            return keys
        pem = header.get("public_key")
        if not isinstance(pem, str):
            return {}
        try:
            key = load_public_key(pem)
        except SigningKeyError as exc:
            raise _Bad(None, f"the export's public key is unusable: {exc}") from exc
        self.key_source = "export file"
        return {key_id_of(key): key}

    def run(self, lines: Iterable[str]) -> None:
        items = iter(_parse_lines(lines))
        item = next(items, None)
        if item is None:
            return  # an empty export: an empty range
        kind, header = item
        if kind != "header" or not isinstance(header, dict):
            raise _Bad(None, "not a FlexGate export: the header line is missing")
        if header.get("version") != VERSION:
            raise _Bad(None, f"unsupported export version {header.get('version')!r}")
        try:
            cp = (
                None
                if header.get("checkpoint") is None
                else Checkpoint.from_dict(header["checkpoint"])
            )
            first_seq = int(header["first_seq"])
            prev = str(header["prev_hash"])
            left = header.get("left")
            frontier = None
            if cp is not None and left is not None:
                frontier = merkle.Frontier()
                for (_, level), node in zip(
                    merkle.perfect_subtrees(0, first_seq - 1), left, strict=True
                ):
                    frontier.append_subtree(level, bytes.fromhex(node))
        except (KeyError, TypeError, ValueError) as exc:
            raise _Bad(None, f"the export header is malformed: {exc}") from exc
        self.checkpoint = cp
        if cp is not None:
            keys = self._keys(header)
            self.key_id = cp.key_id
            reason = cp.check_signature(keys)
            if reason is not None:
                raise _Bad(cp.size + 1, reason)
        expected, prev_at = first_seq, ""
        trailer = None
        for kind, value in items:
            if trailer is not None:
                raise _Bad(None, "lines after the export's trailer")
            if kind == "header":
                raise _Bad(None, "a second header line")
            if kind == "trailer":
                trailer = value
                continue
            prev, prev_at = self._record(value, expected, prev, prev_at, frontier, cp)
            expected += 1
            self.count += 1
        if trailer is None:
            raise _Bad(expected, "the export is cut off: its trailer line is missing")
        self._trailer(trailer, expected - 1, prev, frontier, cp)

    def _record(
        self,
        rec: Any,
        expected: int,
        prev: str,
        prev_at: str,
        frontier: merkle.Frontier | None,
        cp: Checkpoint | None,
    ) -> tuple[str, str]:
        try:
            seq, digest, at = rec["seq"], rec["hash"], rec["at"]
            computed = record_hash(
                prev_hash=rec["prev_hash"],
                seq=seq,
                id=rec["id"],
                kind=rec["kind"],
                at=at,
                principal=rec["principal"],
                payload=rec["payload"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise _Bad(expected, f"record {expected} is malformed: {exc}") from exc
        if seq != expected:
            raise _Bad(expected, f"record {expected} is missing (found {seq} in its place)")
        if rec["prev_hash"] != prev:
            raise _Bad(seq, f"record {seq}'s prev_hash is not the hash of record {seq - 1}")
        if computed != digest:
            raise _Bad(seq, f"record {seq} does not match its hash (modified)")
        if at < prev_at:
            raise _Bad(seq, f"record {seq} is dated before record {seq - 1}")
        if frontier is not None and cp is not None and seq <= cp.size:
            frontier.append(merkle.leaf_hash(bytes.fromhex(digest)))
        return digest, at

    def _trailer(
        self,
        trailer: Any,
        last_seq: int,
        last_hash: str,
        frontier: merkle.Frontier | None,
        cp: Checkpoint | None,
    ) -> None:
        try:
            records, t_last, t_hash = trailer["records"], trailer["last_seq"], trailer["last_hash"]
            right = trailer.get("right")
        except (KeyError, TypeError) as exc:
            raise _Bad(None, f"the export trailer is malformed: {exc}") from exc
        if records != self.count or t_last != last_seq or t_hash != last_hash:
            raise _Bad(
                last_seq + 1,
                f"the trailer says {records} records up to {t_last}, the file has "
                f"{self.count} up to {last_seq} (records removed or added)",
            )
        if cp is None or frontier is None:
            return
        covered = min(last_seq, cp.size)
        try:
            for (_, level), node in zip(
                merkle.perfect_subtrees(covered, cp.size), right or [], strict=True
            ):
                frontier.append_subtree(level, bytes.fromhex(node))
        except (TypeError, ValueError) as exc:
            raise _Bad(None, f"the trailer's subtree hashes are malformed: {exc}") from exc
        if frontier.size != cp.size or frontier.root().hex() != cp.root:
            raise _Bad(
                None,
                f"the records do not match the signed checkpoint of size {cp.size} "
                "(modified, removed or reordered)",
            )
        self.merkle_checked = True


def checkpoint_json(cp: Checkpoint, public_key_pem: str | None) -> str:
    """A checkpoint and its public key as one JSON document (for publishing)."""
    return canonical_json({"checkpoint": cp.as_dict(), "public_key": public_key_pem}).decode()
