"""Appends (in a caller's transaction and through the group-commit writer), the inference
payload, the usage summary, signing keys, checkpoints and proofs. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from audit_helpers import fill
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit import merkle
from audit.canonical import body_text, canonical_json, json_string, record_hash
from audit.checkpoints import (
    consistency_proof,
    inclusion_proof,
    latest_checkpoint,
    list_checkpoints,
    maybe_checkpoint,
)
from audit.db import make_sessionmaker
from audit.errors import AuditError, InvalidQuery, SigningKeyError
from audit.inference import inference_payload, prompt_sha256
from audit.ledger import NewRecord, append, append_many
from audit.models import LedgerMerkleNode, LedgerRecord, LedgerUsage
from audit.query import _add_usage, usage
from audit.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, Signer, trusted_public_keys
from audit.summary import fold_usage
from audit.writer import LedgerWriter

# Unicode scalar values only (JCS has no encoding for a lone surrogate), I-JSON integers.
TEXT = st.text(st.characters(blacklist_categories=("Cs",)))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(TEXT, kids, max_size=3),
    max_leaves=10,
)  # fmt: skip


@given(
    st.integers(1, 2**53 - 1),
    TEXT,
    st.text(st.characters(blacklist_categories=("Cs",)), min_size=1),
    TEXT,
    st.none() | st.text(st.characters(blacklist_categories=("Cs",)), min_size=1),
    st.dictionaries(TEXT, JSON_VALUES, max_size=4),
)
@settings(max_examples=200)
def test_stored_form_hashes_as_the_contract_says(
    seq: int, rid: str, kind: str, at: str, principal: str | None, payload: dict[str, Any]
) -> None:
    """The fast concatenation equals canonical JSON of the body, for any strings at all."""
    body = {
        "seq": seq,
        "id": rid,
        "kind": kind,
        "at": at,
        "principal": principal,
        "payload": payload,
    }
    text = body_text(
        seq=seq, id=rid, kind=kind, at=at, principal=principal,
        payload_text=canonical_json(payload).decode(),
    )  # fmt: skip
    assert text.encode() == canonical_json(body) == rfc8785.dumps(body)
    assert json_string(rid) == json.dumps(rid, ensure_ascii=False)


async def test_in_transaction_append_and_head(sm: async_sessionmaker[AsyncSession]) -> None:
    async with sm.begin() as s:
        first = await append(s, kind="principal.created", principal="admin", payload={"id": "a"})
        rest = await append_many(
            s, [NewRecord("key.created", "admin", {"key": i}) for i in range(3)]
        )
    assert [e.seq for e in [first, *rest]] == [1, 2, 3, 4]
    assert rest[0].prev_hash == first.hash
    assert first.hash == record_hash(
        prev_hash="0" * 64, seq=1, id=first.id, kind=first.kind, at=first.at,
        principal="admin", payload={"id": "a"},
    )  # fmt: skip
    async with sm() as s:
        ats = (await s.scalars(select(LedgerRecord.at).order_by(LedgerRecord.seq))).all()
    assert ats == sorted(ats)


@pytest.mark.parametrize(
    ("kind", "principal", "payload"),
    [
        ("Bad Kind", "p", {}),
        ("ok", "", {}),
        ("ok", "p", {"x": object()}),
        ("ok", "p", ["not", "a", "dict"]),
        ("inference", "p", {"usage": {"e": {"tokens": -1, "weight": 0}}}),
        ("inference", "p", {"usage": {"e": {"tokens": 1, "weight": float("inf")}}}),
        ("inference", "p", {"usage": "lots"}),
        ("inference", "p", {"usage": {"e": {"tokens": 2**40 + 1, "weight": 0}}}),
        ("inference", "p", {"usage": {"e": {"tokens": 1, "weight": 1e300}}}),
        ("inference", "p", {"usage": {"": {"tokens": 1, "weight": 1}}}),
        ("inference", "p", {"purpose": None}),
    ],
)
async def test_bad_records_write_nothing(
    sm: async_sessionmaker[AsyncSession], kind: str, principal: str, payload: Any
) -> None:
    with pytest.raises(ValueError):
        async with sm.begin() as s:
            await append_many(
                s, [NewRecord("ok", "p", {"fine": 1}), NewRecord(kind, principal, payload)]
            )
    async with sm() as s:
        assert await s.scalar(select(func.count()).select_from(LedgerRecord)) == 0


async def test_writer_refuses_bad_record_alone(db_engine: AsyncEngine) -> None:
    async with LedgerWriter(db_engine) as writer:
        good = asyncio.create_task(writer.append(kind="ok", principal="p", payload={"a": 1}))
        with pytest.raises(ValueError):
            await writer.append(kind="ok", principal="p", payload={"a": float("nan")})
        assert (await good).seq == 1
    with pytest.raises(RuntimeError):
        await writer.append(kind="ok", principal="p", payload={})


async def test_failed_batch_fails_every_caller_and_writes_nothing(db_engine: AsyncEngine) -> None:
    async with LedgerWriter(db_engine) as writer:
        import audit.writer as writer_module

        original = writer_module.build_batch

        def broken(state: Any, records: Any) -> Any:
            original(state, records)
            raise ConnectionResetError("the database went away mid-commit")

        writer_module.build_batch = broken  # type: ignore[assignment]
        try:
            results = await asyncio.gather(
                *(writer.append(kind="ok", principal="p", payload={"i": i}) for i in range(5)),
                return_exceptions=True,
            )
        finally:
            writer_module.build_batch = original
        assert all(isinstance(r, AuditError) for r in results), results
        assert (await writer.append(kind="ok", principal="p", payload={})).seq == 1


def test_inference_payload(monkeypatch: pytest.MonkeyPatch) -> None:
    kwargs: dict[str, Any] = dict(
        request_id="r1", endpoint="/v1/chat/completions", model="m", purpose="research",
        policy_version=3, experts_allowed=["public", "code"],
        experts_excluded={"news": "no-license"},
        usage={"public": (312, 171.4000001), "code": {"tokens": 104, "weight": 51}},
        prompt_tokens=12, completion_tokens=30, finish_reason="stop", status="ok",
        prompt=[{"role": "user", "content": "secret"}], completion="answer",
        duration_ms=12.34567, trace_id="t",
    )  # fmt: skip
    monkeypatch.delenv("FLEXGATE_AUDIT_STORE_TEXT", raising=False)
    payload = inference_payload(**kwargs)
    assert set(payload) == {
        "request_id", "endpoint", "model", "purpose", "policy_version", "experts_allowed",
        "experts_excluded", "usage", "prompt_tokens", "completion_tokens", "finish_reason",
        "status", "prompt_sha256", "duration_ms", "trace_id",
    }  # fmt: skip
    assert payload["usage"] == {
        "public": {"tokens": 312, "weight": 171.4},
        "code": {"tokens": 104, "weight": 51.0},
    }
    assert "secret" not in json.dumps(payload)
    assert payload["prompt_sha256"] == prompt_sha256([{"role": "user", "content": "secret"}])
    monkeypatch.setenv("FLEXGATE_AUDIT_STORE_TEXT", "1")
    stored = inference_payload(**kwargs)
    assert stored["prompt"] == [{"role": "user", "content": "secret"}]
    assert stored["completion"] == "answer"
    with pytest.raises(ValueError):
        inference_payload(**{**kwargs, "status": "maybe"})
    with pytest.raises(ValueError):
        inference_payload(**{**kwargs, "usage": {"x": (1, float("nan"))}})


# --- usage summary ---


async def test_usage_summary_matches_the_records(db_engine: AsyncEngine, sm: Any) -> None:
    await fill(db_engine, 60)
    async with sm() as s:
        by_expert = {r.key: r for r in await usage(s, by="expert")}
        by_principal = {r.key: r for r in await usage(s, by="principal")}
        by_day = await usage(s, by="day")
        payloads = [
            p
            for p in (
                await s.scalars(
                    select(LedgerRecord.payload).where(LedgerRecord.kind == "inference")
                )
            ).all()
        ]
    n = len(payloads)
    used_code = [p for p in payloads if p["usage"]["code"]["tokens"] > 0]
    assert by_expert["code"].requests == len(used_code)
    assert by_expert["code"].tokens == sum(p["usage"]["code"]["tokens"] for p in used_code)
    assert by_expert["public"].weight == pytest.approx(5.5 * n)
    assert "news" not in by_expert  # never used
    assert sum(r.requests for r in by_principal.values()) == n
    assert by_day[0].requests == n and by_day[0].key is not None
    all_tokens = sum(u["tokens"] for p in payloads for u in p["usage"].values())
    assert by_day[0].tokens == all_tokens


async def test_usage_with_bounds_inside_days(db_engine: AsyncEngine, sm: Any) -> None:
    await fill(db_engine, 30)
    async with sm() as s:
        ats = (await s.scalars(select(LedgerRecord.at).order_by(LedgerRecord.seq))).all()
        middle = ats[len(ats) // 2]
        first = await usage(s, by="principal", until=middle)
        second = await usage(s, by="principal", since=middle)
        whole = await usage(s, by="principal")
        scoped = await usage(
            s, by="expert", experts=["code"], principal="app-0", since="2000-01-01"
        )
        with pytest.raises(InvalidQuery):
            await usage(s, by="color")
        with pytest.raises(InvalidQuery):
            await usage(s, since="yesterday")
        with pytest.raises(InvalidQuery):
            await usage(s, since=middle, until=middle)
    for key in {r.key for r in whole}:
        total = sum(r.requests for r in [*first, *second] if r.key == key)
        assert total == next(r.requests for r in whole if r.key == key)
    assert [r.key for r in scoped] == ["code"]


def _odd_records(n: int) -> list[NewRecord]:
    """Inference records the summary must read as the Python reading does: no purpose, no
    usage, integer weights, weight without tokens, no principal; and non-inference ones."""
    out = []
    for i in range(n):
        payload: dict[str, Any] = {
            "purpose": ["general", "research", "x.y-z"][i % 3],
            "usage": {
                "public": {"tokens": i, "weight": 0.5 * i},
                "code": {"tokens": 0, "weight": 3 if i % 4 == 0 else 0},  # int weight
                'ex"pert': {"tokens": 2**40, "weight": 0.1},  # quoting, the largest
            },
        }
        if i % 5 == 0:
            del payload["purpose"]
        if i % 7 == 0:
            payload["usage"] = {}
        if i % 11 == 0:
            del payload["usage"]
        principal = None if i % 6 == 0 else f"app-{i % 4}"
        kind = "license.granted" if i % 9 == 8 else "inference"
        out.append(NewRecord(kind, principal, payload))
    return out


async def _expected_usage(s: AsyncSession, by: str) -> dict[Any, tuple[int, int, float]]:
    """usage(by=...) recomputed from every record through the Python reading."""
    from audit.ledger import inference_usage

    cells: dict[tuple[str, str, str, str], list[float]] = {}
    rows = (
        await s.execute(
            select(LedgerRecord.at, LedgerRecord.principal, LedgerRecord.payload).where(
                LedgerRecord.kind == "inference"
            )
        )
    ).all()
    for at, principal, payload in rows:
        purpose, per_expert = inference_usage(payload)
        _add_usage(cells, at[:13], principal or "", purpose, per_expert)
    out: dict[Any, list[float]] = {}
    for (hour, principal, _purpose, expert), (requests, tokens, weight) in cells.items():
        if (by == "expert") != (expert != ""):
            continue
        key = {"expert": expert, "principal": principal or None, "day": hour[:10]}[by]
        cell = out.setdefault(key, [0, 0, 0.0])
        cell[0] += requests
        cell[1] += tokens
        cell[2] += weight
    return {k: (int(v[0]), int(v[1]), v[2]) for k, v in out.items()}


async def _assert_usage_exact(sm: Any) -> None:
    async with sm() as s:
        for by in ("expert", "principal", "day"):
            got = {r.key: (r.requests, r.tokens, r.weight) for r in await usage(s, by=by)}
            want = await _expected_usage(s, by)
            assert got.keys() == want.keys()
            for key, (requests, tokens, weight) in want.items():
                assert got[key][:2] == (requests, tokens), (by, key)
                assert got[key][2] == pytest.approx(weight, rel=1e-12), (by, key)


async def _mark(sm: Any) -> int:
    async with sm() as s:
        return int(await s.scalar(text("SELECT seq FROM ledger_usage_mark WHERE id = 1")))


async def test_usage_is_exact_folded_unfolded_and_partly_folded(sm: Any) -> None:
    async with sm.begin() as s:
        await append_many(s, _odd_records(40))
    assert await _mark(sm) == 0  # nothing folded: all of it comes from the tail
    await _assert_usage_exact(sm)
    async with sm.begin() as s:
        assert await fold_usage(await s.connection()) == 40
        assert await fold_usage(await s.connection()) == 40  # idempotent
    async with sm() as s:
        assert await s.scalar(select(func.count()).select_from(LedgerUsage)) > 0
    await _assert_usage_exact(sm)
    async with sm.begin() as s:
        await append_many(s, _odd_records(25))
    assert await _mark(sm) == 40
    await _assert_usage_exact(sm)  # summary up to 40 and a tail of 25
    with pytest.raises(RuntimeError):  # a fold rolled back leaves the summary as it was
        async with sm.begin() as s:
            await fold_usage(await s.connection())
            raise RuntimeError("caller's change failed")
    assert await _mark(sm) == 40
    await _assert_usage_exact(sm)


async def test_appenders_fold_as_they_cross_the_mark(
    db_engine: AsyncEngine, sm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import audit.summary

    monkeypatch.setattr(audit.summary, "FOLD_EVERY", 16)
    async with sm.begin() as s:  # in a caller's transaction: folds in it
        await append_many(s, _odd_records(20))
    assert await _mark(sm) == 20
    async with LedgerWriter(db_engine) as writer:  # the writer: in the background
        payloads = [r.payload for r in _odd_records(50)]
        await asyncio.gather(
            *(writer.append(kind="inference", principal="w", payload=p) for p in payloads)
        )
        await _assert_usage_exact(sm)
    assert await _mark(sm) == 70  # and once more on close
    await _assert_usage_exact(sm)


# --- signing keys ---


def test_signing_key_is_private_and_exported(tmp_path: Path) -> None:
    home = tmp_path / "h"
    signer = Signer.load_or_create(home)
    key = home / PRIVATE_KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (home / PUBLIC_KEY_FILE).read_text() == signer.public_key_pem
    assert Signer.load_or_create(home).key_id == signer.key_id  # made once, then reused
    assert list(trusted_public_keys(home)) == [signer.key_id]
    key.chmod(0o644)
    with pytest.raises(SigningKeyError, match="chmod 600"):
        Signer.load_or_create(home)


def test_key_creation_race(tmp_path: Path) -> None:
    """Processes starting together end up with one and the same key."""
    import multiprocessing

    home = tmp_path / "race"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        ids = pool.map(_key_id_in, [home] * 8)
    assert len(set(ids)) == 1
    assert [p.name for p in home.iterdir() if p.name.startswith(".")] == []


def _key_id_in(home: Path) -> str:
    return Signer.load_or_create(home).key_id


# --- checkpoints and proofs ---


async def test_checkpoints_on_demand_by_count_and_time(
    db_engine: AsyncEngine, signer: Signer, sm: Any
) -> None:
    async with LedgerWriter(
        db_engine, signer=signer, checkpoint_every=10, checkpoint_interval_s=3600
    ) as w:
        for i in range(25):
            await w.append(kind="test", principal=None, payload={"i": i})
        on_demand = await w.checkpoint()
    async with sm() as s:
        cps = await list_checkpoints(s)
        records = (
            await s.execute(select(LedgerRecord.seq, LedgerRecord.kind, LedgerRecord.payload))
        ).all()
    sizes = [cp.size for cp in cps]
    assert sizes[:2] == [10, 21] and sizes[-1] == on_demand.size == len(records) - 1
    for cp in cps:  # each checkpoint is itself the ledger record after the ones it covers
        seq, kind, payload = records[cp.size]
        assert (seq, kind, payload) == (cp.size + 1, "checkpoint", cp.as_dict())
        assert cp.check_signature({signer.key_id: signer.public_key}) is None
    async with sm.begin() as s:
        assert await maybe_checkpoint(s, signer, every=100, interval_s=None) is None
        await append(s, kind="test", principal=None, payload={})
    async with sm.begin() as s:
        by_time = await maybe_checkpoint(s, signer, every=None, interval_s=0)
        assert by_time is not None and by_time.size == on_demand.size + 2


async def test_interval_checkpoint_while_idle(
    db_engine: AsyncEngine, signer: Signer, sm: Any
) -> None:
    async with LedgerWriter(
        db_engine, signer=signer, checkpoint_every=10**6, checkpoint_interval_s=0.2
    ) as w:
        await w.append(kind="test", principal=None, payload={})
        await asyncio.sleep(0.6)
    async with sm() as s:
        assert (await latest_checkpoint(s)) is not None


async def test_proofs_for_every_record_and_checkpoint(
    db_engine: AsyncEngine, signer: Signer, sm: Any
) -> None:
    """Sizes past 256 so stored subtrees are used; every record against every checkpoint."""
    await fill(db_engine, 700, signer=signer, checkpoint_at=(1, 5, 256, 300, 513, 700))
    async with sm() as s:
        assert await s.scalar(select(func.count()).select_from(LedgerMerkleNode)) >= 2
        cps = await list_checkpoints(s)
        hashes = (await s.scalars(select(LedgerRecord.hash).order_by(LedgerRecord.seq))).all()
        leaves = [merkle.leaf_hash(bytes.fromhex(h)) for h in hashes]
        for cp in cps:
            assert merkle.root_of(leaves[: cp.size]).hex() == cp.root
        for seq in [1, 2, 3, 100, 255, 256, 257, 300, 301, 513, 600]:
            for cp in cps:
                if seq <= cp.size:
                    proof = await inclusion_proof(s, seq, checkpoint_size=cp.size)
                    assert proof.verify()
                    assert proof.path == [
                        p.hex() for p in merkle.inclusion_proof(seq - 1, leaves[: cp.size])
                    ]
        for old in cps:
            for new in cps:
                if old.size <= new.size:
                    assert (await consistency_proof(s, old.size, new.size)).verify()
        with pytest.raises(InvalidQuery, match="not covered"):
            await inclusion_proof(s, len(hashes), checkpoint_size=cps[0].size)
        with pytest.raises(InvalidQuery, match="no checkpoint of size"):
            await inclusion_proof(s, 1, checkpoint_size=2)
        with pytest.raises(InvalidQuery):
            await consistency_proof(s, cps[-1].size, cps[0].size)


async def test_no_checkpoint_yet(sm: Any) -> None:
    async with sm() as s:
        with pytest.raises(InvalidQuery, match="flexgate audit checkpoint"):
            await inclusion_proof(s, 1)


@pytest.fixture(autouse=True)
def _no_store_text(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("FLEXGATE_AUDIT_STORE_TEXT", raising=False)
    yield


@pytest.mark.parametrize("cas_tries", [3, 0])
async def test_writer_follows_a_head_moved_by_others(
    db_engine: AsyncEngine, sm: Any, cas_tries: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer chains onto the head it last saw; when another appender moved it, the
    append is re-chained onto the new head (PostgreSQL: compare-and-set, or with no tries
    left, the head lock)."""
    import audit.writer as writer_module

    monkeypatch.setattr(writer_module, "CAS_TRIES", cas_tries)
    async with LedgerWriter(db_engine) as writer:
        first = await writer.append(kind="test", principal=None, payload={"n": 1})
        async with sm.begin() as s:
            other = await append(s, kind="test", principal=None, payload={"n": 2})
        third = await writer.append(kind="test", principal=None, payload={"n": 3})
    assert (first.seq, other.seq, third.seq) == (1, 2, 3)
    assert third.prev_hash == other.hash
    async with sm() as s:
        from audit.verify import verify

        assert (await verify(s, public_keys={})).ok


AWKWARD = ['a"b', "back\\slash", "{br,aces}", "NULL", "null", " sp ace ", "ünï\u2028code", '\\"']


async def test_awkward_text_is_stored_exactly(db_engine: AsyncEngine, sm: Any) -> None:
    """Principals, kinds and payloads with quotes, backslashes, braces, commas, NULL and
    spaces survive both append paths byte for byte (the chain verifies)."""
    from audit.verify import verify

    records = [NewRecord("null", p, {"text": p, "nested": {p: [p, None]}}) for p in AWKWARD]
    async with sm.begin() as s:
        written = await append_many(s, records)
    async with LedgerWriter(db_engine) as writer:
        written += await asyncio.gather(
            *(writer.append(kind=r.kind, principal=r.principal, payload=r.payload) for r in records)
        )
    async with sm() as s:
        stored = (await s.execute(select(LedgerRecord).order_by(LedgerRecord.seq))).scalars().all()
        report = await verify(s, public_keys={})
    assert report.ok, report
    assert [(r.kind, r.principal, r.payload) for r in stored] == [
        (e.kind, e.principal, e.payload) for e in written
    ]
    assert [r.principal for r in stored] == AWKWARD * 2


async def test_cancelled_caller_does_not_withdraw_its_record(db_engine: AsyncEngine) -> None:
    async with LedgerWriter(db_engine) as writer:
        waiting = asyncio.create_task(writer.append(kind="ok", principal="p", payload={"i": 1}))
        await asyncio.sleep(0)  # queued
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        after = await writer.append(kind="ok", principal="p", payload={"i": 2})
    assert after.seq == 2  # the cancelled caller's record was still written, first
    async with make_sessionmaker(db_engine)() as s:
        payloads = await s.scalars(select(LedgerRecord.payload).order_by(LedgerRecord.seq))
        assert payloads.all() == [{"i": 1}, {"i": 2}]
