"""The governed flow end to end: licenses bite on the next request, a withdrawal narrows a
running stream from its next token, and the gateway fails closed when the ledger or the
policy cannot be used."""

from __future__ import annotations

import json
from typing import Any

import httpx
from gw_helpers import (
    OWNER_CODE,
    assert_error,
    chat,
    completion,
    grant,
    ledger_seq,
    records,
    revoke,
)
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import text

from audit.db import make_engine
from audit.writer import LedgerWriter
from governance.experts import reinstate_expert, withdraw_expert

Client = AsyncTestClient[Litestar]


async def post(client: Client, world: Any, path: str, body: Any) -> Any:
    return await client.post(path, json=body, headers=world.headers("application"))


async def test_grant_use_revoke_next_request_excludes(gw_client: Client, gw_world: Any) -> None:
    r = await post(gw_client, gw_world, "/v1/completions", completion())
    assert r.json()["flexgate"]["experts"]["excluded"]["code"] == "no-license"
    lic = await grant(gw_world.sm, "code")
    r = await post(gw_client, gw_world, "/v1/completions", completion(max_tokens=8))
    fg = r.json()["flexgate"]
    assert fg["experts"]["allowed"] == ["public", "code"]
    assert fg["usage"]["code"]["tokens"] > 0
    # the caller narrows, never widens
    r = await post(
        gw_client, gw_world, "/v1/completions", completion(experts={"exclude": ["code"]})
    )
    fg = r.json()["flexgate"]
    assert fg["experts"]["excluded"]["code"] == "caller-excluded"
    assert fg["usage"]["code"] == {"tokens": 0, "weight": 0.0}
    r = await post(gw_client, gw_world, "/v1/completions", completion(experts={"only": ["news"]}))
    err = assert_error(r, 403)
    assert "news: no-license" in err["message"] and err["code"] == "no_expert_allowed"
    await revoke(gw_world.sm, "code", lic)
    r = await post(gw_client, gw_world, "/v1/chat/completions", chat())
    fg = r.json()["flexgate"]
    assert fg["experts"]["excluded"]["code"] == "no-license"
    assert fg["usage"]["code"] == {"tokens": 0, "weight": 0.0}
    (rec,) = [e for e in await records(gw_world.sm, "inference") if e.seq == fg["audit_seq"]]
    assert rec.payload["usage"]["code"] == {"tokens": 0, "weight": 0.0}
    assert rec.payload["experts_excluded"]["code"] == "no-license"


async def test_purpose_bound_license(gw_client: Client, gw_world: Any) -> None:
    await grant(gw_world.sm, "code", purposes=["research"])
    r = await post(gw_client, gw_world, "/v1/completions", completion())
    assert "code" not in r.json()["flexgate"]["experts"]["allowed"]
    r = await post(gw_client, gw_world, "/v1/completions", completion(purpose="research"))
    assert "code" in r.json()["flexgate"]["experts"]["allowed"]
    (rec,) = [
        e
        for e in await records(gw_world.sm, "inference")
        if e.seq == r.json()["flexgate"]["audit_seq"]
    ]
    assert rec.payload["purpose"] == "research"


async def test_no_expert_allowed_is_403_with_each_reason(gw_client: Client, gw_world: Any) -> None:
    async with gw_world.sm() as s:
        await withdraw_expert(s, actor=OWNER_CODE.operator(), expert_id="public")
    before = await ledger_seq(gw_world.sm)
    r = await post(gw_client, gw_world, "/v1/completions", completion())
    err = assert_error(r, 403)
    for reason in ("public: withdrawn", "code: no-license", "news: no-license"):
        assert reason in err["message"]
    assert await ledger_seq(gw_world.sm) == before
    async with gw_world.sm() as s:
        await reinstate_expert(s, actor=OWNER_CODE.operator(), expert_id="public")


async def test_ledger_failure_is_503_and_no_text(
    gw_client: Client, gw_world: Any, gw_app: Litestar, tmp_path: Any
) -> None:
    good = gw_app.state.ledger
    (tmp_path / "a-directory").mkdir()  # the writer's database cannot be opened
    dead = make_engine(f"sqlite+aiosqlite:///{tmp_path}/a-directory")
    # The app runs on the test client's portal loop: the writer must live there too.
    portal = gw_client.blocking_portal

    async def start() -> LedgerWriter:
        writer = LedgerWriter(dead)
        await writer.start()
        return writer

    broken = portal.call(start)
    gw_app.state.ledger = broken
    try:
        before = await ledger_seq(gw_world.sm)
        for path, body in (
            ("/v1/completions", completion()),
            ("/v1/completions", completion(stream=True)),
            ("/v1/chat/completions", chat()),
            ("/v1/chat/completions", chat(stream=True)),
        ):
            r = await post(gw_client, gw_world, path, body)
            err = assert_error(r, 503)
            assert err["code"] == "ledger_unavailable"
            assert "choices" not in r.text and "data:" not in r.text
        assert await ledger_seq(gw_world.sm) == before
    finally:
        gw_app.state.ledger = good
        portal.call(broken.close)
        portal.call(dead.dispose)


async def test_policy_unreadable_is_503(gw_client: Client, gw_world: Any) -> None:
    async with gw_world.sm() as s:
        await s.execute(text("UPDATE policy_state SET version = version + 1"))
        await s.execute(text("DROP TABLE casbin_rule"))
        await s.commit()
    r = await post(gw_client, gw_world, "/v1/completions", completion())
    err = assert_error(r, 503)
    assert err["code"] == "policy_unavailable"


async def _sse(response: httpx.Response) -> Any:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield None if data == "[DONE]" else json.loads(data)


async def test_withdrawal_during_a_stream_applies_from_the_next_token(
    gw_live: Any, gw_world: Any
) -> None:
    await grant(gw_world.sm, "code")
    body = completion(prompt="The", max_tokens=300, stream=True)
    chunks: list[Any] = []
    withdrawn = False
    async with (
        httpx.AsyncClient(base_url=gw_live.base_url, timeout=60) as client,
        client.stream(
            "POST", "/v1/completions", json=body, headers=gw_world.headers("application")
        ) as r,
    ):
        assert r.status_code == 200
        started_seq = int(r.headers["x-flexgate-audit-started-seq"])
        async for chunk in _sse(r):
            chunks.append(chunk)
            if not withdrawn and len(chunks) >= 3:
                async with gw_world.sm() as s:
                    await withdraw_expert(s, actor=OWNER_CODE, expert_id="code")
                withdrawn = True
    assert chunks[-1] is None  # [DONE]
    final = chunks[-2]
    fg = final["flexgate"]
    assert fg["experts"]["excluded"]["code"] == "revoked-withdrawn"
    assert "code" not in fg["experts"]["allowed"]
    (rec,) = [e for e in await records(gw_world.sm, "inference") if e.seq == fg["audit_seq"]]
    assert rec.payload["started_seq"] == started_seq
    assert rec.payload["revoked"] == {"code": "revoked-withdrawn"}
    assert rec.payload["usage"]["code"]["tokens"] > 0  # used before, not after
    (started,) = [
        e for e in await records(gw_world.sm, "inference.started") if e.seq == started_seq
    ]
    assert started.payload["experts_allowed"] == ["public", "code"]
    # the next request does not use it at all
    async with httpx.AsyncClient(base_url=gw_live.base_url, timeout=60) as client:
        r = await client.post(
            "/v1/completions", json=completion(), headers=gw_world.headers("application")
        )
    assert r.json()["flexgate"]["experts"]["excluded"]["code"] == "withdrawn"
    assert r.json()["flexgate"]["usage"]["code"]["tokens"] == 0


async def test_client_disconnect_mid_stream_records_cancelled(gw_live: Any, gw_world: Any) -> None:
    import asyncio

    body = completion(prompt="The", max_tokens=900, stream=True)
    async with (
        httpx.AsyncClient(base_url=gw_live.base_url, timeout=60) as client,
        client.stream(
            "POST", "/v1/completions", json=body, headers=gw_world.headers("application")
        ) as r,
    ):
        started_seq = int(r.headers["x-flexgate-audit-started-seq"])
        n = 0
        async for _chunk in _sse(r):
            n += 1
            if n >= 3:
                break
    for _ in range(200):
        ended = [
            e
            for e in await records(gw_world.sm, "inference")
            if e.payload.get("started_seq") == started_seq
        ]
        if ended:
            break
        await asyncio.sleep(0.05)
    (rec,) = ended
    assert rec.payload["status"] == "cancelled"
    assert 2 <= rec.payload["completion_tokens"] < 900
