"""Helpers of the gateway tests (fixtures are in conftest.py)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from audit.ledger import head
from audit.query import RecordQuery, query_records
from governance.identity import Identity
from governance.licenses import grant_license, revoke_license

MODEL = "tiny-flexolmo"
OWNER_CODE = Identity("owner-code", frozenset({"data_owner"}))
OWNER_NEWS = Identity("owner-news", frozenset({"data_owner"}))


def completion(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": "The quick brown",
        "max_tokens": 4,
        "temperature": 0,
    }
    body.update(kw)
    return body


def chat(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }
    body.update(kw)
    return body


async def ledger_seq(sm: async_sessionmaker[AsyncSession]) -> int:
    async with sm() as s:
        seq, _hash = await head(s)
    return seq


async def records(sm: async_sessionmaker[AsyncSession], kind: str) -> list[Any]:
    async with sm() as s:
        page = await query_records(s, RecordQuery(kind=kind, limit=1000))
    return page.records


async def grant(
    sm: async_sessionmaker[AsyncSession], expert: str, grantee: str = "app-1", **kw: Any
) -> str:
    owner = OWNER_CODE if expert == "code" else OWNER_NEWS
    async with sm() as s:
        lic = await grant_license(s, actor=owner, expert_id=expert, grantee=grantee, **kw)
    return str(lic.id)


async def revoke(sm: async_sessionmaker[AsyncSession], expert: str, license_id: str) -> None:
    owner = OWNER_CODE if expert == "code" else OWNER_NEWS
    async with sm() as s:
        await revoke_license(s, actor=owner, license_id=license_id)


def assert_error(r: Any, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "code", "param"}, err
    assert err["message"] and "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err
