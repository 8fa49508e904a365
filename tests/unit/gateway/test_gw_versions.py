"""gateway.versions: requests arriving together share one version read, and a request never
gets a read that started before it arrived (so it sees every change committed before)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.versions import VersionReads


class _Db:
    """A stand-in sessionmaker: each read takes the version as it is when the read starts,
    then waits until `go` is set (so a test can hold a read in flight)."""

    def __init__(self) -> None:
        self.version = 1
        self.go = asyncio.Event()
        self.go.set()
        self.started = 0
        self.fail: Exception | None = None

    def __call__(self) -> Any:
        db = self

        class Session:
            async def __aenter__(self) -> Session:
                return self

            async def __aexit__(self, *exc: object) -> None:
                return None

            async def execute(self, _stmt: Any) -> Any:
                db.started += 1
                seen = db.version
                await db.go.wait()
                if db.fail is not None:
                    raise db.fail

                class Result:
                    def scalar_one_or_none(self) -> int:
                        return seen

                return Result()

        return Session()


async def test_requests_arriving_together_share_a_read() -> None:
    db = _Db()
    reads = VersionReads(db)  # type: ignore[arg-type]
    got = await asyncio.gather(*(reads.current() for _ in range(20)))
    assert got == [1] * 20
    assert reads.reads == 1


async def test_a_request_arriving_during_a_read_waits_for_the_next_one() -> None:
    db = _Db()
    reads = VersionReads(db)  # type: ignore[arg-type]
    db.go.clear()
    first = asyncio.ensure_future(reads.current())
    await asyncio.sleep(0.01)
    assert db.started == 1  # a read is in flight, it saw version 1
    db.version = 2  # a change commits now, then two requests arrive
    later = [asyncio.ensure_future(reads.current()) for _ in range(3)]
    await asyncio.sleep(0.01)
    db.go.set()
    assert await first == 1
    assert await asyncio.gather(*later) == [2, 2, 2]  # not the read already running
    assert reads.reads == 2


async def test_a_failed_read_fails_its_requests_and_the_next_read_retries() -> None:
    db = _Db()
    reads = VersionReads(db)  # type: ignore[arg-type]
    db.fail = RuntimeError("database down")
    results = await asyncio.gather(reads.current(), reads.current(), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    db.fail = None
    assert await reads.current() == 1


async def test_a_caller_that_goes_away_does_not_cancel_the_others() -> None:
    db = _Db()
    reads = VersionReads(db)  # type: ignore[arg-type]
    db.go.clear()
    gone = asyncio.ensure_future(reads.current())
    stays = asyncio.ensure_future(reads.current())
    await asyncio.sleep(0.01)
    gone.cancel()
    db.go.set()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert await stays == 1


async def test_reads_on_a_real_database_see_each_committed_change(db_url: str) -> None:
    """With its engine, VersionReads reads the real policy_state row (on a SQLite file:
    through its own thread and synchronous connection) and sees a change committed through
    another engine on the very next read."""
    from audit.db import make_engine, make_sessionmaker
    from governance.changes import read_version
    from governance.identity import Identity
    from governance.principals import add_principal

    db = make_engine(db_url)
    other = make_engine(db_url)
    reads = VersionReads(make_sessionmaker(db), db)
    try:
        assert (reads._sqlite is not None) == db_url.startswith("sqlite")
        async with make_sessionmaker(other)() as s:
            before = await read_version(s)
        assert await reads.current() == before
        async with make_sessionmaker(other)() as s:
            await add_principal(
                s, actor=Identity.operator(), principal_id="app-v", roles=["application"]
            )
        assert await reads.current() == before + 1
        await reads.close()
        assert await reads.current() == before + 1  # usable again after close
    finally:
        await reads.close()
        await db.dispose()
        await other.dispose()
