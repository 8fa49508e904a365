"""gateway.limits: token buckets and parallel leases shared through the database."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest
from sqlalchemy import func, select

from audit.db import make_engine, make_sessionmaker
from contracts.settings import Settings
from gateway.limits import Limiter, RateLease, RateLimited, go_duration
from governance.errors import InvalidInput, NotPermitted, UnknownKey
from governance.identity import Identity
from governance.key_limits import Limits, get_limits, set_limits
from governance.keys import create_key
from governance.principals import add_principal

OPERATOR = Identity.operator()
APP = Identity("app-1", frozenset({"application"}))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _settings(url: str, **kw: object) -> Settings:
    base = Settings.from_env({"FLEXGATE_DATABASE_URL": url, "FLEXGATE_HOME": "/tmp/unused"})
    return replace(base, **kw)  # type: ignore[arg-type]


async def _key(url: str, limits: Limits | None = None) -> str:
    engine = make_engine(url)
    try:
        async with make_sessionmaker(engine)() as s:
            await add_principal(s, actor=OPERATOR, principal_id="app-1", roles=["application"])
            row, _token = await create_key(s, actor=OPERATOR, principal_id="app-1")
            if limits is not None:
                await set_limits(s, actor=OPERATOR, key_id=row.id, limits=limits)
            return row.id
    finally:
        await engine.dispose()


async def test_rpm_bucket_refills_and_429_has_retry_after(db_url: str) -> None:
    key = await _key(db_url, Limits(rpm=3))
    clock = Clock()
    lim = Limiter(_settings(db_url, rate_tpm=0, rate_max_parallel=0), clock=clock)
    try:
        for n in range(3):
            a = await lim.admit(APP, key, 10)
            assert a.headers()["x-ratelimit-limit-requests"] == "3"
            assert a.headers()["x-ratelimit-remaining-requests"] == str(2 - n)
            assert "x-ratelimit-limit-tokens" not in a.headers()  # tpm off
            await a.release(10)
        with pytest.raises(RateLimited) as err:
            await lim.admit(APP, key, 10)
        assert err.value.limit == "requests"
        assert err.value.headers["Retry-After"] == "20"  # one request per 20 s at 3 rpm
        assert err.value.headers["x-ratelimit-remaining-requests"] == "0"
        clock.now += 20.0
        await (await lim.admit(APP, key, 10)).release()
        with pytest.raises(RateLimited):
            await lim.admit(APP, key, 10)
    finally:
        await lim.close()


async def test_tpm_counts_prompt_plus_completion_and_settles_actual(db_url: str) -> None:
    key = await _key(db_url, Limits(tpm=100))
    clock = Clock()
    lim = Limiter(_settings(db_url, rate_rpm=0, rate_max_parallel=0), clock=clock)
    try:
        a = await lim.admit(APP, key, 80)
        assert a.headers()["x-ratelimit-remaining-tokens"] == "20"
        await a.release(30)  # 50 refunded
        b = await lim.admit(APP, key, 70)
        assert b.headers()["x-ratelimit-remaining-tokens"] == "0"
        await b.release(70)
        with pytest.raises(RateLimited) as err:
            await lim.admit(APP, key, 30)
        assert err.value.limit == "tokens"
        assert err.value.retry_after == 18  # 30 tokens at 100/min
        with pytest.raises(RateLimited) as too_big:
            await lim.admit(APP, key, 101)
        assert too_big.value.retry_after is None
        assert "Retry-After" not in too_big.value.headers
    finally:
        await lim.close()


async def test_parallel_limit_is_shared_by_two_limiters(db_url: str) -> None:
    """Two Limiter objects (two workers) on one database draw from one set of leases."""
    key = await _key(db_url, Limits(max_parallel=2))
    s = _settings(db_url, rate_rpm=0, rate_tpm=0)
    one, two = Limiter(s, owner="h:1"), Limiter(s, owner="h:2")
    try:
        a = await one.admit(APP, key, 1)
        b = await two.admit(APP, key, 1)
        with pytest.raises(RateLimited) as err:
            await one.admit(APP, key, 1)
        assert err.value.limit == "parallel"
        await a.release()
        await a.release()  # idempotent
        c = await two.admit(APP, key, 1)
        await b.release()
        await c.release()
    finally:
        await one.close()
        await two.close()


async def test_concurrent_admissions_never_exceed_the_bucket(db_url: str) -> None:
    key = await _key(db_url, Limits(rpm=5))
    s = _settings(db_url, rate_tpm=0, rate_max_parallel=0)
    limiters = [Limiter(s, owner=f"h:{n}") for n in range(3)]
    try:

        async def one(n: int) -> bool:
            try:
                await limiters[n % 3].admit(APP, key, 1)
            except RateLimited:
                return False
            return True

        results = await asyncio.gather(*(one(n) for n in range(12)))
        assert sum(results) == 5
    finally:
        for lim in limiters:
            await lim.close()


async def test_dead_process_leases_are_reaped(db_url: str) -> None:
    key = await _key(db_url, Limits(max_parallel=1))
    s = _settings(db_url, rate_rpm=0, rate_tpm=0)
    dead = Limiter(s, owner="thishost:999999999")
    live = Limiter(s, owner="thishost:1")
    try:
        await dead.admit(APP, key, 1)  # never released: its process "died"
        with pytest.raises(RateLimited):
            await live.admit(APP, key, 1)
        live.owner = "thishost:" + str(__import__("os").getpid())
        assert await live.reap_dead_leases() == 1
        async with make_sessionmaker(live.engine)() as session:
            assert await session.scalar(select(func.count()).select_from(RateLease)) == 0
        await (await live.admit(APP, key, 1)).release()
    finally:
        await dead.close()
        await live.close()


async def test_defaults_apply_and_limits_validated(db_url: str) -> None:
    key = await _key(db_url)
    lim = Limiter(_settings(db_url, rate_rpm=7, rate_tpm=70, rate_max_parallel=0))
    engine = make_engine(db_url)
    try:
        a = await lim.admit(APP, key, 1)
        assert a.headers()["x-ratelimit-limit-requests"] == "7"
        assert a.headers()["x-ratelimit-limit-tokens"] == "70"
        async with make_sessionmaker(engine)() as s:
            assert await get_limits(s, key) == Limits()
            with pytest.raises(InvalidInput):
                await set_limits(s, actor=OPERATOR, key_id=key, limits=Limits(rpm=0))
            with pytest.raises(NotPermitted):
                await set_limits(s, actor=APP, key_id=key, limits=Limits(rpm=5))
            with pytest.raises(UnknownKey):
                await set_limits(s, actor=OPERATOR, key_id="0" * 16, limits=Limits(rpm=5))
            assert await get_limits(s, key) == Limits()
    finally:
        await lim.close()
        await engine.dispose()


def test_go_duration() -> None:
    assert go_duration(0.02) == "20ms"
    assert go_duration(1.5) == "1.5s"
    assert go_duration(360.0) == "6m0s"


@pytest.mark.parametrize(
    "url", ["sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///file:lim?mode=memory&uri=true"]
)
async def test_an_in_memory_database_limits_through_its_own_connection(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No second connection for an in-memory SQLite database (it would see another, empty
    database): the limiter's transaction runs on the async engine itself, and no
    PostgreSQL-only statement is sent to it; no file is created for it either."""
    from audit.db import Base, sync_sqlite_engine

    monkeypatch.chdir(tmp_path)
    engine = make_engine(url)
    try:
        assert sync_sqlite_engine(engine) is None
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        lim = Limiter(_settings(url, rate_rpm=2, rate_tpm=0, rate_max_parallel=1), engine=engine)
        first = await lim.admit(APP, "k-mem", 5)
        with pytest.raises(RateLimited) as err:  # one at a time
            await lim.admit(APP, "k-mem", 5)
        assert err.value.limit == "parallel"
        await first.release(5)
        await (await lim.admit(APP, "k-mem", 5)).release(5)
        with pytest.raises(RateLimited) as err:  # 2 per minute, both taken
            await lim.admit(APP, "k-mem", 5)
        assert err.value.limit == "requests"
        await lim.close()
    finally:
        await engine.dispose()
    assert not os.listdir(tmp_path)
