"""Standalone verification of a ledger export: `python -m audit.offline FILE --public-key PEM`.

Depends on the standard library and `cryptography` only (with the stdlib-only `audit.jcs`,
`audit.canonical`, `audit.merkle` and `audit.format`), so an auditor can run it on a machine
that holds nothing of FlexGate's server side. docs/audit.md ("Export format" and "Writing a
verifier") describes every check, so it can be rewritten in another language.

Strict by design:

- the checkpoint covering the file must be signed by a key the caller trusts explicitly
  (`public_keys`; the key carried in the file is never used);
- every record lies in the tree of that checkpoint (seq <= size), but for the checkpoint's
  own record (seq size + 1, whose payload must be exactly that checkpoint); anything after it
  fails;
- each record's hash is recomputed from its fields (RFC 8785), the chain from the header's
  `prev_hash`, and the checkpoint's Merkle root from `left` + the records + `right`;
  checkpoint records inside the file are checked against the tree as it passes their size,
  so a Merkle mismatch names the first seq after the last checkpoint that did match;
- an auditor's own earlier checkpoint (`auditor`) must be the same tree or a prefix of it:
  proven by a consistency proof the export carries (`audit export --consistency-from N`), or
  directly when the file's records pass through its size; a file anchored to a checkpoint
  older than the auditor's fails (re-anchored, or the ledger went back);
- a member missing, extra or given twice, a line that is not JSON, an empty file: refused.

Exit codes (as `flexgate audit verify-export`): 0 verified, 1 does not verify, 2 bad usage.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from audit import merkle
from audit.canonical import record_hash
from audit.format import Checkpoint, KeyFormatError, is_hex_hash, key_id_of, parse_public_key
from audit.jcs import canonicalize

CSV_COLUMNS = ("seq", "id", "kind", "at", "principal", "payload", "prev_hash", "hash")
HEADER_KEY = "flexgate_export"
TRAILER_KEY = "flexgate_export_end"
VERSION = 1
CHECKPOINT_KIND = "checkpoint"
RECORD_FIELDS = frozenset(CSV_COLUMNS)
HEADER_FIELDS = frozenset(
    {
        "version",
        "format",
        "since",
        "until",
        "first_seq",
        "prev_hash",
        "checkpoint",
        "public_key",
        "left",
        "consistency",
    }
)
TRAILER_FIELDS = frozenset({"records", "last_seq", "last_hash", "right"})
CONSISTENCY_FIELDS = frozenset({"old_size", "path"})


@dataclass(frozen=True)
class ExportReport:
    ok: bool
    records: int
    first_bad_seq: int | None
    reason: str | None
    checkpoint_size: int | None  # the checkpoint the records were checked against
    merkle_checked: bool  # the records up to checkpoint_size were checked against its root
    key_id: str | None
    auditor_size: int | None = None  # the auditor's checkpoint this file was checked against

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "first_bad_seq": self.first_bad_seq,
            "reason": self.reason,
            "checkpoint_size": self.checkpoint_size,
            "merkle_checked": self.merkle_checked,
            "key_id": self.key_id,
            "auditor_size": self.auditor_size,
        }


class _Bad(Exception):
    def __init__(self, seq: int | None, reason: str) -> None:
        super().__init__(reason)
        self.seq, self.reason = seq, reason


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"member {key!r} is given twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str | bytes) -> Any:
    """JSON with no member given twice and no NaN/Infinity; ValueError otherwise."""
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def _exact(obj: Any, fields: frozenset[str], what: str, seq: int | None = None) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _Bad(seq, f"{what} is not a JSON object")
    keys = set(obj)
    if keys != fields:
        parts = []
        if fields - keys:
            parts.append(f"missing {', '.join(sorted(fields - keys))}")
        if keys - fields:
            parts.append(f"unexpected {', '.join(sorted(keys - fields))}")
        raise _Bad(seq, f"{what}: {'; '.join(parts)}")
    return obj


def _parse_lines(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """("header"|"record"|"trailer", value) from JSONL or CSV lines."""
    it = iter(lines)
    first = next(it, None)
    while first is not None and not first.strip():
        first = next(it, None)
    if first is None:
        raise _Bad(None, "the file is empty: not an export")

    def chain() -> Iterator[str]:
        assert first is not None
        yield first
        yield from it

    if first.lstrip().startswith("{"):
        yield from _parse_jsonl(chain())
    else:
        reader = csv.reader(chain(), strict=True)
        try:
            yield from _csv_rows(reader)
        except csv.Error as exc:
            raise _Bad(None, f"CSV row {reader.line_num} is malformed: {exc}") from exc


def _parse_jsonl(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = strict_json(line)
        except ValueError as exc:
            raise _Bad(None, f"line {number} is not valid JSON: {exc}") from exc
        if isinstance(obj, dict) and set(obj) == {HEADER_KEY}:
            yield "header", obj[HEADER_KEY]
        elif isinstance(obj, dict) and set(obj) == {TRAILER_KEY}:
            yield "trailer", obj[TRAILER_KEY]
        else:
            yield "record", obj


def _csv_rows(reader: Any) -> Iterator[tuple[str, Any]]:
    columns = next(reader, None)
    if columns is None or tuple(columns) != CSV_COLUMNS:
        raise _Bad(None, f"not a FlexGate export: the first CSV row must be {CSV_COLUMNS}")
    for cells in reader:
        if len(cells) != len(CSV_COLUMNS):
            raise _Bad(None, f"CSV row {reader.line_num} has {len(cells)} cells, not 8")
        seq, rid, kind, at, principal, payload, prev_hash, digest = cells
        try:
            if seq in (f"#{HEADER_KEY}", f"#{TRAILER_KEY}"):
                if any((rid, kind, at, principal, prev_hash, digest)):
                    raise ValueError("a header or trailer row has only its payload cell")
                yield ("header" if seq == f"#{HEADER_KEY}" else "trailer"), strict_json(payload)
                continue
            if not seq.isdigit() or not seq.isascii():
                raise ValueError(f"seq {seq!r} is not a whole number")
            record = {
                "seq": int(seq),
                "id": rid,
                "kind": kind,
                "at": at,
                "principal": principal or None,
                "payload": strict_json(payload),
                "prev_hash": prev_hash,
                "hash": digest,
            }
        except ValueError as exc:
            raise _Bad(None, f"CSV row {reader.line_num} is malformed: {exc}") from exc
        yield "record", record


def verify_export(
    lines: Iterable[str],
    *,
    public_keys: Mapping[str, Ed25519PublicKey],
    auditor: Checkpoint | None = None,
) -> ExportReport:
    """Check an export offline (see the module docstring); never raises for bad content.

    `public_keys` (key_id -> key) are the keys trusted to sign checkpoints; with none, nothing
    can verify and the report says so. `auditor` is a checkpoint the auditor kept."""
    state = _ExportCheck(dict(public_keys), auditor)
    try:
        if not public_keys:
            raise _Bad(None, "no trusted public key: pass --public-key")
        state.run(lines)
    except _Bad as bad:
        return state.report(bad.seq, bad.reason)
    return state.report(None, None)


class _ExportCheck:
    def __init__(self, keys: dict[str, Ed25519PublicKey], auditor: Checkpoint | None) -> None:
        self.keys = keys
        self.auditor = auditor
        self.count = 0
        self.checkpoint: Checkpoint | None = None
        self.merkle_checked = False
        self.key_id: str | None = None
        self.good_size = 0  # the largest size at which the tree was found as signed
        self.auditor_done = False
        self.frontier: merkle.Frontier | None = None

    def report(self, seq: int | None, reason: str | None) -> ExportReport:
        return ExportReport(
            reason is None,
            self.count,
            seq,
            reason,
            None if self.checkpoint is None else self.checkpoint.size,
            self.merkle_checked and reason is None,
            self.key_id,
            None if self.auditor is None else self.auditor.size,
        )

    def _header(self, header: Any) -> tuple[Checkpoint, int, str]:
        header = _exact(header, HEADER_FIELDS, "the export header")
        if header["version"] != VERSION or isinstance(header["version"], bool):
            raise _Bad(None, f"unsupported export version {header['version']!r}")
        if header["checkpoint"] is None:
            raise _Bad(None, "the export is not covered by a signed checkpoint")
        try:
            cp = Checkpoint.from_dict(header["checkpoint"])
        except ValueError as exc:
            raise _Bad(None, f"the export header's checkpoint is malformed: {exc}") from exc
        first_seq, prev = header["first_seq"], header["prev_hash"]
        if not isinstance(first_seq, int) or isinstance(first_seq, bool) or first_seq < 1:
            raise _Bad(None, "the export header's first_seq must be a whole number >= 1")
        if not (is_hex_hash(prev)):
            raise _Bad(None, "the export header's prev_hash must be 64 lower-case hex digits")
        self.checkpoint, self.key_id = cp, cp.key_id
        reason = cp.check_signature(self.keys)
        if reason is not None:
            raise _Bad(cp.size + 1, reason)
        if first_seq > cp.size + 1:
            raise _Bad(
                first_seq,
                f"record {first_seq} lies beyond the checkpoint of size {cp.size} that covers "
                "the file (records after a checkpoint are not covered by it)",
            )
        self.frontier = merkle.Frontier()
        try:
            left = header["left"]
            ranges = merkle.perfect_subtrees(0, first_seq - 1)
            if not isinstance(left, list) or len(left) != len(ranges):
                raise ValueError(f"left must list {len(ranges)} subtree hashes")
            for (_, level), node in zip(ranges, left, strict=True):
                if not is_hex_hash(node):
                    raise ValueError("a subtree hash is not 64 lower-case hex digits")
                self.frontier.append_subtree(level, bytes.fromhex(node))
        except ValueError as exc:
            raise _Bad(None, f"the export header's left subtree hashes: {exc}") from exc
        self._auditor_first(header["consistency"], cp, first_seq)
        self._auditor_at(self.frontier)
        return cp, first_seq, prev

    def _auditor_first(self, consistency: Any, cp: Checkpoint, first_seq: int) -> None:
        """What can be said of the auditor's checkpoint from the header alone."""
        if not isinstance(consistency, list):
            raise _Bad(None, "the export header's consistency must be a list")
        proofs: dict[int, list[bytes]] = {}
        for item in consistency:
            item = _exact(item, CONSISTENCY_FIELDS, "a consistency proof")
            size, path = item["old_size"], item["path"]
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= cp.size:
                raise _Bad(None, f"a consistency proof's old_size {size!r} is out of range")
            if not isinstance(path, list) or not all(is_hex_hash(p) for p in path):
                raise _Bad(None, "a consistency proof's path must list 64-hex-digit hashes")
            proofs[size] = [bytes.fromhex(p) for p in path]
        a = self.auditor
        if a is None:
            return
        reason = a.check_signature(self.keys)
        if reason is not None:
            raise _Bad(None, f"the auditor's checkpoint: {reason}")
        if a.size > cp.size:
            raise _Bad(
                cp.size + 1,
                f"the file is anchored to the checkpoint of size {cp.size}, older than the "
                f"auditor's of size {a.size}: records {cp.size + 1}..{a.size} are missing "
                "(re-anchored to an older checkpoint, or the ledger went back)",
            )
        if a.size == cp.size:
            if a.root != cp.root:
                raise _Bad(1, f"the file's checkpoint and the auditor's of size {a.size} differ")
            self.auditor_done = True
        elif a.size in proofs:
            ok = merkle.verify_consistency(
                a.size, cp.size, bytes.fromhex(a.root), bytes.fromhex(cp.root), proofs[a.size]
            )
            if not ok:
                raise _Bad(
                    1,
                    f"the file's checkpoint of size {cp.size} does not extend the auditor's of "
                    f"size {a.size} (the consistency proof fails: records 1..{a.size} differ)",
                )
            self.auditor_done = True
        elif a.size < first_seq - 1:
            raise _Bad(
                None,
                f"the file carries no consistency proof from the auditor's size {a.size}: "
                f"export again with --consistency-from {a.size}",
            )

    def run(self, lines: Iterable[str]) -> None:
        items = _parse_lines(lines)
        kind, header = next(items)
        if kind != "header":
            raise _Bad(None, "not a FlexGate export: the header line is missing")
        cp, expected, prev = self._header(header)
        prev_at = ""
        trailer = None
        for kind, value in items:
            if trailer is not None:
                raise _Bad(None, "lines after the export's trailer")
            if kind == "header":
                raise _Bad(None, "a second header line")
            if kind == "trailer":
                trailer = value
                continue
            prev, prev_at = self._record(value, expected, prev, prev_at, cp)
            expected += 1
            self.count += 1
        if trailer is None:
            raise _Bad(expected, "the export is cut off: its trailer line is missing")
        if self.count == 0:
            raise _Bad(None, "the export holds no records")
        self._trailer(trailer, expected - 1, prev, cp)

    def _record(
        self, rec: Any, expected: int, prev: str, prev_at: str, cp: Checkpoint
    ) -> tuple[str, str]:
        rec = _exact(rec, RECORD_FIELDS, f"record {expected}", expected)
        seq, digest, at, payload = rec["seq"], rec["hash"], rec["at"], rec["payload"]
        if not isinstance(seq, int) or isinstance(seq, bool):
            raise _Bad(expected, f"record {expected}'s seq is not a whole number")
        if seq != expected:
            raise _Bad(expected, f"record {expected} is missing (found {seq} in its place)")
        if seq > cp.size + 1:
            raise _Bad(
                seq,
                f"record {seq} lies beyond the checkpoint of size {cp.size} that covers the "
                "file (appended after it: not covered by any signature)",
            )
        try:
            for name in ("id", "kind", "at", "prev_hash", "hash"):
                if not isinstance(rec[name], str):
                    raise ValueError(f"{name} must be a string")
            if rec["principal"] is not None and not isinstance(rec["principal"], str):
                raise ValueError("principal must be a string or null")
            if not isinstance(payload, dict):
                raise ValueError("payload must be an object")
            computed = record_hash(
                prev_hash=rec["prev_hash"],
                seq=seq,
                id=rec["id"],
                kind=rec["kind"],
                at=at,
                principal=rec["principal"],
                payload=payload,
            )
        except (TypeError, ValueError) as exc:
            raise _Bad(seq, f"record {seq} is malformed: {exc}") from exc
        if rec["prev_hash"] != prev:
            raise _Bad(seq, f"record {seq}'s prev_hash is not the hash of record {seq - 1}")
        if computed != digest:
            raise _Bad(seq, f"record {seq} does not match its hash (modified)")
        if at < prev_at:
            raise _Bad(seq, f"record {seq} is dated before record {seq - 1}")
        frontier = self.frontier
        assert frontier is not None
        if rec["kind"] == CHECKPOINT_KIND:
            self._inner_checkpoint(seq, payload, frontier, cp)
        if seq == cp.size + 1:
            if rec["kind"] != CHECKPOINT_KIND or canonicalize(payload) != canonicalize(
                cp.as_dict()
            ):
                raise _Bad(
                    seq,
                    f"record {seq} lies beyond the checkpoint of size {cp.size} and is not "
                    "its checkpoint record",
                )
        else:
            frontier.append(merkle.leaf_hash(bytes.fromhex(digest)))
            self._auditor_at(frontier)
        return digest, at

    def _inner_checkpoint(
        self, seq: int, payload: Any, frontier: merkle.Frontier, cp: Checkpoint
    ) -> None:
        """A checkpoint record in the file: signed by a trusted key, of size seq - 1, and the
        tree of the records before it must have its root."""
        try:
            inner = Checkpoint.from_dict(payload)
        except ValueError as exc:
            raise _Bad(seq, f"checkpoint record {seq} is malformed: {exc}") from exc
        if inner.size != seq - 1:
            raise _Bad(seq, f"checkpoint record {seq} claims size {inner.size}, not {seq - 1}")
        reason = inner.check_signature(self.keys)
        if reason is not None:
            raise _Bad(seq, reason)
        if frontier.root().hex() != inner.root:
            raise _Bad(
                max(self.good_size + 1, 1),
                f"records {self.good_size + 1}..{inner.size} differ from those signed by the "
                f"checkpoint of size {inner.size} (rewritten and rehashed)",
            )
        self.good_size = inner.size

    def _auditor_at(self, frontier: merkle.Frontier) -> None:
        a = self.auditor
        if a is None or self.auditor_done or frontier.size != a.size:
            return
        if frontier.root().hex() != a.root:
            raise _Bad(
                self.good_size + 1,
                f"records {self.good_size + 1}..{a.size} differ from those of the auditor's "
                f"checkpoint of size {a.size}",
            )
        self.auditor_done = True

    def _trailer(self, trailer: Any, last_seq: int, last_hash: str, cp: Checkpoint) -> None:
        trailer = _exact(trailer, TRAILER_FIELDS, "the export trailer")
        records, t_last, t_hash = trailer["records"], trailer["last_seq"], trailer["last_hash"]
        if records != self.count or t_last != last_seq or t_hash != last_hash:
            raise _Bad(
                last_seq + 1,
                f"the trailer says {records} records up to {t_last}, the file has "
                f"{self.count} up to {last_seq} (records removed or added)",
            )
        frontier = self.frontier
        assert frontier is not None
        covered = min(last_seq, cp.size)
        try:
            right = trailer["right"]
            ranges = merkle.perfect_subtrees(covered, cp.size)
            if not isinstance(right, list) or len(right) != len(ranges):
                raise ValueError(f"right must list {len(ranges)} subtree hashes")
            for (_, level), node in zip(ranges, right, strict=True):
                if not is_hex_hash(node):
                    raise ValueError("a subtree hash is not 64 lower-case hex digits")
                frontier.append_subtree(level, bytes.fromhex(node))
        except ValueError as exc:
            raise _Bad(None, f"the trailer's right subtree hashes: {exc}") from exc
        if frontier.size != cp.size or frontier.root().hex() != cp.root:
            raise _Bad(
                self.good_size + 1,
                f"records {self.good_size + 1}..{cp.size} do not match the signed checkpoint "
                f"of size {cp.size} (modified, removed or reordered, then rechained)",
            )
        self.merkle_checked = True
        if self.auditor is not None and not self.auditor_done:
            raise _Bad(
                None,
                f"the file carries no consistency proof from the auditor's size "
                f"{self.auditor.size}: export again with --consistency-from {self.auditor.size}",
            )


# --- reading the inputs (shared with `flexgate audit verify-export`) ---


class UsageError(ValueError):
    """A file given on the command line cannot be used (exit 2)."""


def read_public_key(path: str | Path) -> Ed25519PublicKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the public key {path}: {exc.strerror or exc}") from None
    try:
        return parse_public_key(data)
    except KeyFormatError as exc:
        raise UsageError(f"{path}: {exc}") from None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint file: the checkpoint object itself, or `{"checkpoint": {...}, ...}` as
    `flexgate audit checkpoint` prints it."""
    try:
        data = strict_json(Path(path).read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read the checkpoint {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict) and "checkpoint" in data:
        data = data["checkpoint"]
    try:
        return Checkpoint.from_dict(data)
    except ValueError as exc:
        raise UsageError(f"{path} is not a checkpoint: {exc}") from None


def keys_of(paths: Iterable[str | Path]) -> dict[str, Ed25519PublicKey]:
    keys = [read_public_key(p) for p in paths]
    return {key_id_of(k): k for k in keys}


def verify_file(
    path: str | Path, public_keys: Mapping[str, Ed25519PublicKey], auditor: Checkpoint | None
) -> ExportReport:
    try:
        fh = open(path, encoding="utf-8", newline="")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    with fh:
        try:
            return verify_export(fh, public_keys=public_keys, auditor=auditor)
        except UnicodeDecodeError as exc:
            return ExportReport(False, 0, None, f"the file is not UTF-8: {exc}", None, False, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m audit.offline",
        description="Verify a FlexGate ledger export offline (exit 0 verified, 1 not, 2 usage).",
    )
    parser.add_argument("file")
    parser.add_argument(
        "--public-key",
        action="append",
        required=True,
        help="PEM Ed25519 public key trusted to sign checkpoints (repeatable)",
    )
    parser.add_argument("--checkpoint", help="a checkpoint you kept: the file must extend it")
    args = parser.parse_args(argv)
    try:
        keys = keys_of(args.public_key)
        auditor = read_checkpoint(args.checkpoint) if args.checkpoint else None
        report = verify_file(args.file, keys, auditor)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), ensure_ascii=False))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
