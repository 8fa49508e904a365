"""gateway.limits batches a worker's admissions and releases: decisions equal one transaction
per request, a released lease is free for the same worker's next request without waiting,
and an admission whose caller went away is given back."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from sqlalchemy import func, select

from audit.db import make_engine, make_sessionmaker
from contracts.settings import Settings
from gateway.limits import Limiter, RateLease, RateLimited
from governance.identity import Identity
from governance.key_limits import Limits, set_limits
from governance.keys import create_key
from governance.principals import add_principal

OPERATOR = Identity.operator()
APP = Identity("app-1", frozenset({"application"}))


def _settings(url: str, **kw: object) -> Settings:
    base = Settings.from_env({"FLEXGATE_DATABASE_URL": url, "FLEXGATE_HOME": "/tmp/unused"})
    return replace(base, **kw)  # type: ignore[arg-type]


async def _key(url: str, limits: Limits) -> str:
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as s:
            await add_principal(s, actor=OPERATOR, principal_id="app-1", roles=["application"])
            row, _token = await create_key(s, actor=OPERATOR, principal_id="app-1")
            await set_limits(s, actor=OPERATOR, key_id=row.id, limits=limits)
            return row.id
    finally:
        await engine.dispose()


def _count_batches(lim: Limiter) -> list[int]:
    sizes: list[int] = []
    real = lim._apply

    async def counting(batch: list[Any]) -> list[Any]:
        sizes.append(len(batch))
        return await real(batch)

    lim._apply = counting  # type: ignore[method-assign]
    return sizes


async def _leases(lim: Limiter) -> int:
    async with make_sessionmaker(lim.engine)() as s:
        return int(await s.scalar(select(func.count()).select_from(RateLease)) or 0)


async def test_concurrent_admissions_share_one_transaction_and_decide_in_order(
    db_url: str,
) -> None:
    key = await _key(db_url, Limits(rpm=4, max_parallel=3))
    lim = Limiter(_settings(db_url, rate_tpm=0))
    try:
        await (await lim.admit(APP, key, 1, policy_version=1)).release()  # limits now known
        sizes = _count_batches(lim)
        results = await asyncio.gather(
            *(lim.admit(APP, key, 1, policy_version=1) for _ in range(6)),
            return_exceptions=True,
        )
        assert sizes == [6]  # one transaction for all six
        admitted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, RateLimited)]
        # 3 requests left in the minute's bucket and 3 parallel slots: the first three pass
        assert len(admitted) == 3 and len(refused) == 3
        assert [r.limit for r in refused] == ["parallel"] * 3
        assert [a.headers()["x-ratelimit-remaining-requests"] for a in admitted] == [
            "2",
            "1",
            "0",
        ]
        assert await _leases(lim) == 3
        await asyncio.gather(*(a.release() for a in admitted))
        assert await _leases(lim) == 0
    finally:
        await lim.close()


async def test_a_release_soon_is_applied_before_the_next_admission(db_url: str) -> None:
    key = await _key(db_url, Limits(max_parallel=1))
    lim = Limiter(_settings(db_url, rate_rpm=0, rate_tpm=0))
    try:
        for _ in range(5):  # a client's sequential requests through one worker
            a = await lim.admit(APP, key, 1)
            a.release_soon(1)  # not awaited: the response leaves at once
        other = Limiter(_settings(db_url, rate_rpm=0, rate_tpm=0), owner="h:2")
        try:
            await lim.close()  # everything queued is applied
            await (await other.admit(APP, key, 1)).release()
        finally:
            await other.close()
    finally:
        await lim.close()


async def test_an_admission_whose_caller_went_away_is_given_back(db_url: str) -> None:
    key = await _key(db_url, Limits(max_parallel=1))
    lim = Limiter(_settings(db_url, rate_rpm=0, rate_tpm=0))
    try:
        await (await lim.admit(APP, key, 1, policy_version=1)).release()
        waiting = asyncio.ensure_future(lim.admit(APP, key, 1, policy_version=1))
        await asyncio.sleep(0)  # queued
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await lim.close()  # the runner applied it, saw nobody waiting, queued its release
        assert await _leases(lim) == 0
        await (await lim.admit(APP, key, 1)).release()  # the one slot is free
    finally:
        await lim.close()
