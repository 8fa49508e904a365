"""Verification: an intact ledger passes; each kind of tampering is caught, with the first bad
seq and the reason, on SQLite and PostgreSQL (triggers disabled as a superuser would)."""

from __future__ import annotations

from pathlib import Path

import pytest
from audit_helpers import fill, tamper
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit import merkle
from audit.anchor import Anchors
from audit.canonical import canonical_json, stored_record_hash
from audit.checkpoints import Checkpoint
from audit.db import make_sessionmaker
from audit.errors import InvalidQuery
from audit.signing import Signer
from audit.verify import VerifyReport, verify

# fill(40, checkpoint_at=(10, 30)): checkpoints of size 10 (its record is 11) and 31 (record
# 32); 42 records in all.
N, MARKS, TOTAL = 40, (10, 30), 42


# How `_verify` runs, set per test by `_mode`: in this process, or in chunks of 8 records on
# two worker processes (so the 42 records of a test ledger make 6 chunks).
_MODE: dict[str, int] = {}
ONE, WORKERS = {"workers": 1}, {"workers": 2, "chunk": 8}


@pytest.fixture(autouse=True, params=["one-process", "workers"])
def _mode(request: pytest.FixtureRequest) -> None:
    _MODE.clear()
    _MODE.update(ONE if request.param == "one-process" else WORKERS)


async def _verify(engine: AsyncEngine, signer: Signer, **kw: object) -> VerifyReport:
    async with make_sessionmaker(engine)() as session:
        return await verify(
            session,
            public_keys={signer.key_id: signer.public_key},
            **{**_MODE, **kw},  # type: ignore[arg-type]
        )


@pytest.fixture
async def ledger(db_engine: AsyncEngine, signer: Signer) -> AsyncEngine:
    await fill(db_engine, N, signer=signer, checkpoint_at=MARKS)
    return db_engine


async def _rows(engine: AsyncEngine, where: str = "1=1") -> list[dict[str, object]]:
    async with engine.connect() as conn:
        result = await conn.execute(
            text(f"SELECT * FROM ledger_records WHERE {where} ORDER BY seq")
        )
        return [dict(r._mapping) for r in result]


async def test_intact_ledger_verifies(ledger: AsyncEngine, signer: Signer) -> None:
    report = await _verify(ledger, signer)
    assert report.as_dict() == {
        "ok": True,
        "records": TOTAL,
        "first_bad_seq": None,
        "reason": None,
        "checkpoints": 2,
        "head_seq": TOTAL,
        "anchored_size": max(MARKS) + 1,
        "derived": [
            {"table": "ledger_usage", "ok": True, "detail": "0 cells match the records up to seq 0"}
        ],
    }
    partial = await _verify(ledger, signer, from_seq=20)
    assert partial.ok and partial.records == TOTAL - 19 and partial.checkpoints == 1


async def test_workers_do_the_work(ledger: AsyncEngine, signer: Signer) -> None:
    """With workers, an intact ledger is checked by them: chunks (0, 8], ..., (40, 42], and from
    seq 20: (19, 24], (24, 32], (32, 40], (40, 42] (the first grown from the stored frontier)."""
    report = await _verify(ledger, signer, **WORKERS)
    assert (report.ok, report.records, report.checkpoints) == (True, TOTAL, 2)
    assert report.worker_chunks == 6
    partial = await _verify(ledger, signer, from_seq=20, **WORKERS)
    assert (partial.ok, partial.records, partial.checkpoints) == (True, TOTAL - 19, 1)
    assert partial.worker_chunks == 4
    alone = await _verify(ledger, signer, workers=1, chunk=8)
    assert alone.ok and alone.worker_chunks == 0


@pytest.mark.parametrize("seq", [1, 8, 9, 11, 16, 17, 30, 32, 33, 41, 42])
async def test_modified_record_in_any_chunk(ledger: AsyncEngine, signer: Signer, seq: int) -> None:
    """Wherever the change lies (first or last record of a chunk, inside one, a checkpoint
    record), the report is the one-process report; the chunks before it come from workers."""
    await tamper(ledger, "UPDATE ledger_records SET principal = 'mallory' WHERE seq = :s", s=seq)
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, seq)
    assert "modified" in (report.reason or "")
    if _MODE == WORKERS:
        assert report.worker_chunks == (seq - 1) // 8


async def _rehash(engine: AsyncEngine, seq: int, **change: str) -> None:
    """Set `change` (column -> value) on record `seq` and recompute every hash from it on, the
    head included, as an attacker with database access could."""
    rows = await _rows(engine)
    prev, statements, params = "0" * 64, [], {}
    frontier = merkle.Frontier()
    for r in rows:
        n = int(r["seq"])
        if n == seq:
            r.update(change)
            prev = str(r["prev_hash"])
        if n >= seq:
            digest = stored_record_hash(
                prev, n, str(r["id"]), str(r["kind"]), str(r["at"]),
                r["principal"], str(r["payload"]),  # type: ignore[arg-type]
            )  # fmt: skip
            statements.append(
                f"UPDATE ledger_records SET at = :a{n}, prev_hash = :v{n}, hash = :h{n} "
                f"WHERE seq = {n}"
            )
            params.update({f"a{n}": str(r["at"]), f"v{n}": prev, f"h{n}": digest})
            r["hash"] = digest
        frontier.append(merkle.leaf_hash(bytes.fromhex(str(r["hash"]))))
        prev = str(r["hash"])
    statements.append("UPDATE ledger_head SET hash = :hh, frontier = :ff")
    params.update(hh=prev, ff=frontier.to_text())
    await tamper(engine, *statements, **params)


async def test_chain_broken_at_a_chunk_start(ledger: AsyncEngine, signer: Signer) -> None:
    """Record 33 (the first of a chunk) follows a hash that is not record 32's, and the chain
    is rehashed from there: each chunk is consistent in itself; the link between them is not."""
    await _rehash(ledger, 33, prev_hash="ab" * 32)
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 33)
    assert "prev_hash" in (report.reason or "")
    if _MODE == WORKERS:
        assert report.worker_chunks == 4


async def test_time_back_at_a_chunk_start(ledger: AsyncEngine, signer: Signer) -> None:
    (first,) = await _rows(ledger, "seq = 1")
    await _rehash(ledger, 33, at=str(first["at"]).replace("20", "19", 1))
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 33)
    assert "dated before" in (report.reason or "")


async def test_bad_worker_arguments(ledger: AsyncEngine, signer: Signer) -> None:
    with pytest.raises(InvalidQuery):
        await _verify(ledger, signer, chunk=6)
    with pytest.raises(InvalidQuery):
        await _verify(ledger, signer, workers=0)


async def test_small_pages_and_empty_ledger(db_engine: AsyncEngine, signer: Signer) -> None:
    assert (await _verify(db_engine, signer)).ok
    await fill(db_engine, 15, signer=signer, checkpoint_at=(4, 9))
    report = await _verify(db_engine, signer, page_size=3)
    assert report.ok and report.records == 17 and report.checkpoints == 2


async def test_bad_arguments(ledger: AsyncEngine, signer: Signer) -> None:
    with pytest.raises(InvalidQuery):
        await _verify(ledger, signer, from_seq=0)
    with pytest.raises(InvalidQuery):
        await _verify(ledger, signer, from_seq=TOTAL + 2)


async def test_modified_payload(ledger: AsyncEngine, signer: Signer) -> None:
    (row,) = await _rows(ledger, "seq = 5")
    forged = str(row["payload"]).replace('"model":"demo"', '"model":"evil"')
    assert forged != row["payload"]
    await tamper(ledger, "UPDATE ledger_records SET payload = :p WHERE seq = 5", p=forged)
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 5)
    assert "modified" in (report.reason or "")


async def test_deleted_record(ledger: AsyncEngine, signer: Signer) -> None:
    await tamper(ledger, "DELETE FROM ledger_records WHERE seq = 7")
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 7)
    assert "missing" in (report.reason or "")


async def test_swapped_records(ledger: AsyncEngine, signer: Signer) -> None:
    await tamper(
        ledger,
        "UPDATE ledger_records SET seq = -seq WHERE seq IN (5, 6)",
        "UPDATE ledger_records SET seq = 6 WHERE seq = -5",
        "UPDATE ledger_records SET seq = 5 WHERE seq = -6",
    )
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 5)
    assert "prev_hash" in (report.reason or "")


async def test_inserted_record(ledger: AsyncEngine, signer: Signer) -> None:
    """A well-formed record (right prev_hash, right hash) slipped in at seq 5."""
    (before,) = await _rows(ledger, "seq = 4")
    (template,) = await _rows(ledger, "seq = 5")
    forged = dict(template, id="00000000-0000-4000-8000-000000000000", prev_hash=before["hash"])
    forged["hash"] = stored_record_hash(
        str(before["hash"]), 5, str(forged["id"]), str(forged["kind"]), str(forged["at"]),
        forged["principal"], str(forged["payload"]),  # type: ignore[arg-type]
    )  # fmt: skip
    await tamper(
        ledger,
        "UPDATE ledger_records SET seq = -seq WHERE seq >= 5",
        "UPDATE ledger_records SET seq = 1 - seq WHERE seq < 0",
        "INSERT INTO ledger_records (seq, id, kind, at, principal, payload, prev_hash, hash) "
        "VALUES (5, :id, :kind, :at, :principal, :payload, :prev_hash, :hash)",
        **{k: v for k, v in forged.items() if k != "seq"},
    )
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 5)
    assert "inserted" in (report.reason or "")


async def test_truncated_tail(ledger: AsyncEngine, signer: Signer) -> None:
    """The last records go, and the head is made to fit: the checkpoint still covers them."""
    keep = 29
    rows = await _rows(ledger, f"seq <= {keep}")
    frontier = merkle.Frontier()
    for r in rows:
        frontier.append(merkle.leaf_hash(bytes.fromhex(str(r["hash"]))))
    await tamper(
        ledger,
        f"DELETE FROM ledger_records WHERE seq > {keep}",
        "UPDATE ledger_head SET seq = :seq, hash = :hash, frontier = :frontier",
        seq=keep,
        hash=rows[-1]["hash"],
        frontier=frontier.to_text(),
    )
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, keep + 1)
    assert "truncated" in (report.reason or "")


async def test_deleted_tail_without_head_change(ledger: AsyncEngine, signer: Signer) -> None:
    await tamper(ledger, f"DELETE FROM ledger_records WHERE seq > {TOTAL - 2}")
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, TOTAL - 1)


async def test_forged_checkpoint_altered_root(ledger: AsyncEngine, signer: Signer) -> None:
    await tamper(ledger, "UPDATE ledger_checkpoints SET root = :r WHERE size = 10", r="ab" * 32)
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 11)
    assert "signature" in (report.reason or "")


async def test_forged_checkpoint_other_key(ledger: AsyncEngine, signer: Signer, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A correct root signed with an attacker's key, stored as if it were a checkpoint."""
    attacker = Signer.load_or_create(tmp_path / "attacker")
    rows = await _rows(ledger, "seq <= 20")
    root = merkle.root_of([merkle.leaf_hash(bytes.fromhex(str(r["hash"]))) for r in rows])
    cp = Checkpoint(20, root.hex(), str(rows[-1]["at"]), attacker.key_id, "")
    cp = Checkpoint(20, cp.root, cp.at, cp.key_id, attacker.sign(cp.signed_message()))
    await tamper(
        ledger,
        "INSERT INTO ledger_checkpoints (size, root, at, key_id, signature) "
        "VALUES (:size, :root, :at, :key_id, :signature)",
        **cp.as_dict(),
    )
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 21)
    assert "unknown key" in (report.reason or "")


async def test_rewritten_and_rehashed_chain(ledger: AsyncEngine, signer: Signer) -> None:
    """Every hash recomputed after a change: the chain holds, the signed root does not."""
    rows = await _rows(ledger)
    prev, statements, params = "0" * 64, [], {}
    frontier = merkle.Frontier()
    for r in rows:
        payload = str(r["payload"])
        if r["seq"] == 3:
            payload = payload.replace('"model":"demo"', '"model":"evil"')
        digest = stored_record_hash(
            prev, int(r["seq"]), str(r["id"]), str(r["kind"]), str(r["at"]),
            r["principal"], payload,  # type: ignore[arg-type]
        )  # fmt: skip
        n = int(r["seq"])
        statements.append(
            f"UPDATE ledger_records SET payload = :p{n}, prev_hash = :v{n}, hash = :h{n} "
            f"WHERE seq = {n}"
        )
        params.update({f"p{n}": payload, f"v{n}": prev, f"h{n}": digest})
        frontier.append(merkle.leaf_hash(bytes.fromhex(digest)))
        prev = digest
    statements.append("UPDATE ledger_head SET hash = :hh, frontier = :ff")
    params.update(hh=prev, ff=frontier.to_text())
    await tamper(ledger, *statements, **params)
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 1)
    assert "checkpoint of size 10" in (report.reason or "")


async def test_deleted_checkpoint_row(ledger: AsyncEngine, signer: Signer) -> None:
    await tamper(ledger, "DELETE FROM ledger_checkpoints WHERE size = 31")
    report = await _verify(ledger, signer)
    assert (report.ok, report.first_bad_seq) == (False, 32)


async def test_records_beyond_head(ledger: AsyncEngine, signer: Signer) -> None:
    await tamper(ledger, "UPDATE ledger_head SET seq = seq - 1")
    report = await _verify(ledger, signer)
    assert not report.ok


async def test_no_trusted_key_fails_closed(ledger: AsyncEngine, tmp_path: Path) -> None:
    async with make_sessionmaker(ledger)() as session:
        report = await verify(session, public_keys={})
        # Without the anchor (another machine), the first stored checkpoint fails instead.
        elsewhere = await verify(session, public_keys={}, anchors=Anchors(tmp_path / "none"))
    assert not report.ok and "unknown key" in (report.reason or "")
    assert (elsewhere.ok, elsewhere.first_bad_seq) == (False, 11)
    assert "no trusted public key" in (elsewhere.reason or "")


async def test_checkpoint_payload_is_canonical(ledger: AsyncEngine) -> None:
    (row,) = await _rows(ledger, "seq = 11")
    cp = Checkpoint.from_dict(__import__("json").loads(str(row["payload"])))
    assert canonical_json(cp.as_dict()).decode() == row["payload"]


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_records SET kind = 'x' WHERE seq = 1",
        "DELETE FROM ledger_records WHERE seq = 1",
        "TRUNCATE ledger_records",
        "UPDATE ledger_checkpoints SET root = 'x'",
        "TRUNCATE ledger_merkle_nodes",
    ],
)
@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_postgresql_trigger_refuses_changes(ledger: AsyncEngine, statement: str) -> None:
    assert ledger.dialect.name == "postgresql"
    with pytest.raises(DBAPIError, match="append-only"):
        async with ledger.begin() as conn:
            await conn.execute(text(statement))
