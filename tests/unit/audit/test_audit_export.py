"""Exports (JSONL, CSV) stream with seq and hash per line and verify offline against their
checkpoint; any change to an export is caught. SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest
from audit_helpers import fill, record
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.canonical import canonical_json
from audit.checkpoints import create_checkpoint
from audit.errors import InvalidQuery
from audit.export import NothingToExport, export_lines, verify_export
from audit.ledger import append_many
from audit.models import LedgerRecord
from audit.signing import Signer


async def _export(sm: Any, signer: Signer, **kw: Any) -> list[str]:
    async with sm() as s:
        lines = await export_lines(s, public_key_pem=signer.public_key_pem, **kw)
        return [line async for line in lines]


def _keys(signer: Signer) -> dict[str, Any]:
    return {signer.key_id: signer.public_key}


@pytest.fixture
async def ledger(db_engine: AsyncEngine, signer: Signer) -> AsyncEngine:
    await fill(db_engine, 300, signer=signer, checkpoint_at=(100, 300))
    return db_engine


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_full_export_verifies(ledger: AsyncEngine, signer: Signer, sm: Any, fmt: str) -> None:
    lines = await _export(sm, signer, fmt=fmt)
    report = verify_export(lines, public_keys=_keys(signer))
    assert report.ok, report
    assert (report.records, report.checkpoint_size, report.merkle_checked) == (302, 301, True)
    if fmt == "jsonl":
        first = json.loads(lines[1])
        assert set(first) == {
            "seq",
            "id",
            "kind",
            "at",
            "principal",
            "payload",
            "prev_hash",
            "hash",
        }
    else:
        rows = list(csv.reader(io.StringIO("".join(lines))))
        assert rows[0] == ["seq", "id", "kind", "at", "principal", "payload", "prev_hash", "hash"]
        assert rows[2][0] == "1" and len(rows[2][7]) == 64


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_time_slice_verifies_against_the_checkpoint(
    db_engine: AsyncEngine, signer: Signer, sm: Any, fmt: str
) -> None:
    """A middle slice carries the subtree hashes around it and still proves the root."""
    for k in range(10):
        async with sm.begin() as s:
            await append_many(s, [record(30 * k + i) for i in range(30)])
    async with sm.begin() as s:
        await create_checkpoint(s, signer)
    async with sm() as s:
        ats = (await s.scalars(select(LedgerRecord.at).order_by(LedgerRecord.seq))).all()
    lines = await _export(sm, signer, fmt=fmt, since=ats[95], until=ats[240])
    report = verify_export(lines, public_keys=_keys(signer))
    assert report.ok and report.merkle_checked, report
    assert report.records == 240 - 90


async def test_empty_range_is_refused(ledger: AsyncEngine, signer: Signer, sm: Any) -> None:
    """An empty file is never a valid export: an empty range is refused, and an empty or
    blank file does not verify."""
    for fmt in ("jsonl", "csv"):
        with pytest.raises(NothingToExport):
            await _export(sm, signer, fmt=fmt, since="2999-01-01")
    for lines in ([], ["\n", "  \n"]):
        report = verify_export(lines, public_keys=_keys(signer))
        assert not report.ok and "empty" in (report.reason or "")


async def test_extra_missing_and_duplicate_members_are_refused(
    ledger: AsyncEngine, signer: Signer, sm: Any
) -> None:
    lines = await _export(sm, signer)
    assert verify_export(lines, public_keys=_keys(signer)).ok
    extra = _edit(lines, 5, lambda r: r.update(note="x"))
    missing = _edit(lines, 5, lambda r: r.pop("id"))
    header_extra = _edit(lines, 0, lambda h: h["flexgate_export"].update(trusted=True))
    trailer_extra = _edit(lines, len(lines) - 1, lambda t: t["flexgate_export_end"].update(more=1))
    dup = [*lines[:5], lines[5].replace('{"seq":', '{"seq":5,"seq":', 1), *lines[6:]]
    for bad, seq, words in (
        (extra, 5, "unexpected note"),
        (missing, 5, "missing id"),
        (header_extra, None, "unexpected trusted"),
        (trailer_extra, None, "unexpected more"),
        (dup, None, "given twice"),
    ):
        report = verify_export(bad, public_keys=_keys(signer))
        assert (report.ok, report.first_bad_seq) == (False, seq), report
        assert words in (report.reason or ""), report
    assert "no trusted public key" in (verify_export(lines, public_keys={}).reason or "")


async def test_merkle_mismatch_names_the_first_bad_seq(
    ledger: AsyncEngine, signer: Signer, sm: Any
) -> None:
    """Record 150 rewritten and the chain after it recomputed inside the file: only the
    Merkle root can tell, and the first seq after the last matching checkpoint is named."""
    from audit.canonical import stored_record_hash

    lines = await _export(sm, signer)
    recs = [json.loads(x) for x in lines[1:-1]]
    recs[149]["payload"]["model"] = "fake"
    prev = recs[148]["hash"]
    for rec in recs[149:]:
        payload = canonical_json(rec["payload"]).decode()
        rec["prev_hash"] = prev
        rec["hash"] = prev = stored_record_hash(
            prev, rec["seq"], rec["id"], rec["kind"], rec["at"], rec["principal"], payload
        )
    trailer = json.loads(lines[-1])
    trailer["flexgate_export_end"]["last_hash"] = prev
    forged = [lines[0], *(json.dumps(r) + "\n" for r in recs), json.dumps(trailer) + "\n"]
    report = verify_export(forged, public_keys=_keys(signer))
    # checkpoint 100 (record 101) matched; the next one covering 150 is 301 (record 302)
    assert (report.ok, report.first_bad_seq) == (False, 101), report
    assert "rewritten" in (report.reason or "")


async def test_bad_arguments(ledger: AsyncEngine, signer: Signer, sm: Any) -> None:
    async with sm() as s:
        with pytest.raises(InvalidQuery):
            await export_lines(s, fmt="xml")
        with pytest.raises(InvalidQuery):
            await export_lines(s, since="soon")


def _edit(lines: list[str], index: int, change: Any) -> list[str]:
    obj = json.loads(lines[index])
    change(obj)
    return [*lines[:index], json.dumps(obj) + "\n", *lines[index + 1 :]]


async def test_tampered_exports_are_caught(ledger: AsyncEngine, signer: Signer, sm: Any) -> None:
    lines = await _export(sm, signer, fmt="jsonl")
    keys = _keys(signer)

    def payload(o: dict[str, Any]) -> None:
        o["payload"]["model"] = "other"

    cases = {
        "modified": _edit(lines, 5, payload),
        "removed": [*lines[:5], *lines[6:]],
        "swapped": [*lines[:5], lines[6], lines[5], *lines[7:]],
        "cut off": lines[:-1],
        "removed at the end": [*lines[:-2], lines[-1]],
    }
    for name, bad in cases.items():
        report = verify_export(bad, public_keys=keys)
        assert not report.ok, name
        assert report.reason, name

    # A rewritten, internally consistent chain does not match the signed root.
    rehashed = [lines[0]]
    from audit.canonical import record_hash

    prev = "0" * 64
    for line in lines[1:-1]:
        rec = json.loads(line)
        if rec["seq"] == 3:
            rec["payload"] = {"forged": True}
        rec["prev_hash"] = prev
        rec["hash"] = prev = record_hash(**{k: rec[k] for k in rec if k != "hash"})
        rehashed.append(json.dumps(rec) + "\n")
    trailer = json.loads(lines[-1])
    trailer["flexgate_export_end"]["last_hash"] = prev
    rehashed.append(json.dumps(trailer) + "\n")
    report = verify_export(rehashed, public_keys=keys)
    assert not report.ok and "checkpoint" in (report.reason or "")


async def test_forged_checkpoint_in_export(
    ledger: AsyncEngine, signer: Signer, sm: Any, tmp_path: Any
) -> None:
    lines = await _export(sm, signer, fmt="jsonl")

    def root(o: dict[str, Any]) -> None:
        o["flexgate_export"]["checkpoint"]["root"] = "00" * 32

    report = verify_export(_edit(lines, 0, root), public_keys=_keys(signer))
    assert not report.ok and "signature" in (report.reason or "")
    # Signed with someone else's key: refused unless that key is trusted.
    other = Signer.load_or_create(tmp_path / "other")
    assert not verify_export(lines, public_keys={other.key_id: other.public_key}).ok
