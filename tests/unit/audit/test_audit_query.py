"""Record queries, filters, cursors and their errors; SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from audit_helpers import fill, record
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.errors import InvalidQuery
from audit.ledger import append_many
from audit.models import LedgerRecord
from audit.query import RecordQuery, get_record, query_records

N = 42  # records 0..41: every 7th a license.granted about `code`


@pytest.fixture
async def ledger(db_engine: AsyncEngine) -> AsyncEngine:
    await fill(db_engine, N)
    return db_engine


async def _seqs(sm: Any, **params: Any) -> list[int]:
    async with sm() as s:
        page = await query_records(s, RecordQuery.from_params(params))
    return [r.seq for r in page.records]


def _expected(pred: Any) -> list[int]:
    return [i + 1 for i in range(N) if pred(record(i))]


async def test_filters(ledger: AsyncEngine, sm: Any) -> None:
    inf = lambda r: r.kind == "inference"  # noqa: E731
    assert await _seqs(sm, kind="license.granted", limit="1000") == _expected(
        lambda r: r.kind == "license.granted"
    )
    assert await _seqs(sm, principal="app-1", limit=1000) == _expected(
        lambda r: r.principal == "app-1"
    )
    assert await _seqs(sm, expert="code", limit=1000) == _expected(
        lambda r: inf(r) and r.payload["usage"]["code"]["tokens"] > 0
    )
    assert await _seqs(sm, expert="news", expert_mode="excluded", limit=1000) == _expected(inf)
    assert await _seqs(sm, expert="news", limit=1000) == []  # excluded, so never used
    assert await _seqs(sm, expert="code", expert_mode="allowed", limit=1000) == _expected(inf)
    assert await _seqs(sm, expert="code", expert_mode="any", limit=1000) == list(range(1, N + 1))
    assert await _seqs(sm, purpose="research", limit=1000) == _expected(
        lambda r: inf(r) and r.payload["purpose"] == "research"
    )
    assert await _seqs(sm, status="error", principal="app-0", limit=1000) == _expected(
        lambda r: inf(r) and r.payload["status"] == "error" and r.principal == "app-0"
    )


async def test_time_range_and_cursor(db_engine: AsyncEngine, sm: Any) -> None:
    for k in range(12):  # 12 transactions of 3: 12 distinct times
        async with sm.begin() as s:
            await append_many(s, [record(3 * k + i) for i in range(3)])
    async with sm() as s:
        ats = (await s.scalars(select(LedgerRecord.at).order_by(LedgerRecord.seq))).all()
    since, until = ats[9], ats[30]
    assert since < until
    expected = [i + 1 for i, at in enumerate(ats) if since <= at < until]
    got: list[int] = []
    after = None
    while True:
        async with sm() as s:
            page = await query_records(
                s,
                RecordQuery.from_params(
                    {"since": since, "until": until, "limit": "7", "after": after}
                ),
            )
        got += [r.seq for r in page.records]
        if page.next_after is None:
            break
        after = str(page.next_after)
    assert got == expected


async def test_scope_for_a_data_owner(ledger: AsyncEngine, sm: Any) -> None:
    async with sm() as s:
        page = await query_records(
            s, RecordQuery.from_params({"limit": 1000}, scope_experts=["math"])
        )
        assert page.records == []
        assert await get_record(s, 1, scope_experts=["math"]) is None
        entry = await get_record(s, 7, scope_experts=["code"])
        assert entry is not None and entry.kind == "license.granted"
        assert (await get_record(s, 1)) is not None
        assert await get_record(s, 10_000) is None
        with pytest.raises(InvalidQuery):
            await get_record(s, 0)


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "1001"},
        {"limit": "ten"},
        {"after": "-1"},
        {"after": "4x"},
        {"since": "yesterday"},
        {"since": "2026-01-02", "until": "2026-01-01"},
        {"status": "fine"},
        {"expert": "a b"},
        {"expert": "x'; DROP TABLE ledger_records; --"},
        {"expert": 'x"y'},
        {"expert_mode": "sometimes"},
        {"kind": "Not A Kind"},
        {"purpose": "UPPER"},
        {"colour": "red"},
        {"principal": ["a", "b"]},
    ],
)
def test_malformed_filters(params: dict[str, Any]) -> None:
    with pytest.raises(InvalidQuery) as info:
        RecordQuery.from_params(params)
    assert str(info.value)


async def test_page_shapes(ledger: AsyncEngine, sm: Any) -> None:
    async with sm() as s:
        page = await query_records(s, RecordQuery(limit=N))
        assert page.next_after == N  # a full page: there may be more
        last = await query_records(s, RecordQuery(after=N))
    assert last.records == [] and last.next_after is None
    record = page.as_dict()["records"][0]
    assert set(record) == {"seq", "id", "kind", "at", "principal", "payload", "prev_hash", "hash"}


async def test_owner_scope_redacts_to_the_owners_experts(db_engine: AsyncEngine, sm: Any) -> None:
    """Owner of `code` (and of `news`, never allowed): sees the inference records in which
    `code` was allowed, only `code`'s and `news`'s status and usage, never text, the prompt
    hash or another owner's expert; governance records about their experts whole; no others."""
    from audit_helpers import inference

    from audit.ledger import NewRecord

    rows = [
        NewRecord("inference", "app-1", inference(0, prompt="secret text", completion="secret")),
        NewRecord(
            "inference",
            "app-1",
            inference(
                1,
                experts_allowed=["public"],
                experts_excluded={"code": "no-license", "news": "no-license"},
            ),
        ),
        NewRecord("license.granted", "owner-1", {"expert": "code", "grantee": "app-1"}),
        NewRecord("license.granted", "owner-2", {"expert": "math", "grantee": "app-1"}),
        NewRecord("inference.started", "app-2", {"experts_allowed": ["code"], "request_id": "r"}),
        NewRecord("principal.created", "admin", {"id": "app-9"}),
    ]
    async with sm.begin() as s:
        await append_many(s, rows)
    scope = ["code", "news"]
    async with sm() as s:
        page = await query_records(s, RecordQuery.from_params({}, scope_experts=scope))
        one = await get_record(s, 1, scope_experts=scope)
        hidden = await get_record(s, 2, scope_experts=scope)
        other = await get_record(s, 4, scope_experts=scope)
        none = await query_records(s, RecordQuery.from_params({}, scope_experts=[]))
    assert [r.seq for r in page.records] == [1, 3, 5]
    assert hidden is None and other is None and none.records == []
    assert one is not None and one.payload == {
        "redacted": True,
        "purpose": "research",
        "status": "ok",
        "experts": {
            "code": {"allowed": True, "excluded": None, "tokens": 4, "weight": 1.25},
            "news": {"allowed": False, "excluded": "no-license", "tokens": 0, "weight": 0.0},
        },
    }
    text = repr([r.as_dict() for r in page.records])
    for secret in ("secret", "prompt_sha256", "public", "math", "request_id"):
        assert secret not in text
    assert page.records[1].payload == {"expert": "code", "grantee": "app-1"}  # governance, whole
    assert page.records[2].payload["experts"] == {
        "code": {"allowed": True, "excluded": None, "tokens": 0, "weight": 0.0}
    }
    with pytest.raises(InvalidQuery):
        RecordQuery(scope_experts="code")  # type: ignore[arg-type]
