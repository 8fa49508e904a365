"""Many coroutines and several processes append at once: one gap-free chain that verifies;
a writer killed with SIGKILL mid-load loses nothing it acknowledged. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from asyncio.subprocess import Process
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.db import make_sessionmaker
from audit.errors import DatabaseUnavailable
from audit.ledger import append
from audit.models import LedgerRecord, LedgerUsage, LedgerUsageMark
from audit.query import usage
from audit.verify import verify
from audit.writer import LedgerWriter

WORKER = Path(__file__).with_name("ledger_worker.py")
ROOT = Path(__file__).resolve().parents[3]


async def _worker(url: str, count: int, concurrency: int, tag: str) -> Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        url,
        str(count),
        str(concurrency),
        tag,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _check_chain(engine: AsyncEngine, expected: int) -> None:
    sm = make_sessionmaker(engine)
    async with sm() as session:
        count, low, high = (
            await session.execute(
                select(func.count(), func.min(LedgerRecord.seq), func.max(LedgerRecord.seq))
            )
        ).one()
        assert (count, low, high) == (expected, 1 if expected else None, expected or None)
        report = await verify(session, public_keys={})
        assert report.ok, report
        assert report.records == expected


async def test_many_coroutines_share_transactions(db_engine: AsyncEngine) -> None:
    batches: list[int] = []
    async with LedgerWriter(db_engine) as writer:
        original = writer._take

        def counting(first, limit=None):  # type: ignore[no-untyped-def]
            batch, stopping = original(first, limit)
            batches.append(len(batch))
            return batch, stopping

        writer._take = counting  # type: ignore[method-assign]

        async def appender(k: int) -> list[int]:
            return [
                (await writer.append(kind="test", principal=f"p{k}", payload={"i": i})).seq
                for i in range(20)
            ]

        seqs = await asyncio.gather(*(appender(k) for k in range(25)))
    assert sorted(s for part in seqs for s in part) == list(range(1, 501))
    assert len(batches) < 500 / 4, "appends arriving together should share transactions"
    assert max(batches) > 1
    await _check_chain(db_engine, 500)


async def test_eight_processes_one_chain(db_url: str, db_engine: AsyncEngine) -> None:
    procs = [await _worker(db_url, 500, 10, f"w{i}") for i in range(8)]
    acked: list[int] = []
    for proc in procs:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        acked += [int(line.split()[1]) for line in out.decode().splitlines()]
    assert sorted(acked) == list(range(1, 4001))
    await _check_chain(db_engine, 4000)
    async with make_sessionmaker(db_engine)() as session:
        requests = await session.scalar(
            select(func.sum(LedgerUsage.requests)).where(LedgerUsage.expert == "")
        )
        mark = await session.scalar(select(LedgerUsageMark.seq))
        by_principal = await usage(session, by="principal")
    # Eight writers folding beside each other's appends: every record counted exactly once,
    # and all of them folded in by the time the writers closed.
    assert (requests, mark) == (4000, 4000)
    assert sum(r.requests for r in by_principal) == 4000


async def test_sigkill_loses_nothing_acknowledged(db_url: str, db_engine: AsyncEngine) -> None:
    proc = await _worker(db_url, 1_000_000, 16, "crash")
    assert proc.stdout is not None
    acked: dict[int, str] = {}
    try:
        while len(acked) < 300:
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            assert line, "the worker ended early"
            _, seq, rid = line.split()
            acked[int(seq)] = rid
    finally:
        proc.send_signal(signal.SIGKILL)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    for line in rest.decode().splitlines():  # acknowledged before the kill, still in the pipe
        if line.startswith("ack "):
            _, seq, rid = line.split()
            acked[int(seq)] = rid
    assert proc.returncode == -signal.SIGKILL

    async with make_sessionmaker(db_engine)() as session:
        stored = dict((await session.execute(select(LedgerRecord.seq, LedgerRecord.id))).all())
        report = await verify(session, public_keys={})
    assert report.ok, report
    missing = {seq: rid for seq, rid in acked.items() if stored.get(seq) != rid}
    assert not missing, f"acknowledged appends lost: {sorted(missing)[:5]}"

    # Restart: a new writer continues the same chain.
    restart = await _worker(db_url, 50, 5, "again")
    _, err = await asyncio.wait_for(restart.communicate(), 120)
    assert restart.returncode == 0, err.decode()
    await _check_chain(db_engine, len(stored) + 50)


async def _in_flight(engine: AsyncEngine, count: int) -> list[int]:
    """Backend pids of the writer's append calls waiting on the head lock, oldest first,
    once there are `count` of them."""
    for _ in range(200):
        async with engine.connect() as conn:
            pids = (
                await conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE '%flexgate_ledger_append%' ORDER BY query_start"
                    )
                )
            ).scalars()
            found = list(pids)
        if len(found) >= count:
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {count} batches in flight, saw {len(found)}")


async def _two_flights(writer: LedgerWriter, engine: AsyncEngine) -> tuple[Any, list[Any], int]:
    """One append alone in a first batch, then ten in a second chained onto it; both sent
    and waiting on the head lock. Returns the tasks and the first batch's backend pid."""
    first = asyncio.create_task(writer.append(kind="test", principal="a", payload={"n": 0}))
    (pid,) = await _in_flight(engine, 1)
    rest = [
        asyncio.create_task(writer.append(kind="test", principal="b", payload={"n": i}))
        for i in range(1, 11)
    ]
    await _in_flight(engine, 2)
    return first, rest, pid


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_pipeline_never_forks_after_a_lost_race(db_engine: AsyncEngine) -> None:
    """Two batches in flight, and another appender commits one record first: the first batch
    lost its race, and the second, chained onto it, expects the head at seq 1 — which it is,
    with another hash. It must not commit (that would fork the chain); both are re-chained."""
    sm = make_sessionmaker(db_engine)
    async with LedgerWriter(db_engine) as writer:
        async with sm.begin() as s:  # holds the head lock until the block ends
            other = await append(s, kind="test", principal="other", payload={})
            first, rest, _pid = await _two_flights(writer, db_engine)
        entries = [await first] + [await t for t in rest]
    assert other.seq == 1
    assert [e.seq for e in entries] == list(range(2, 13))
    assert entries[0].prev_hash == other.hash
    await _check_chain(db_engine, 12)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_pipeline_failed_batch_fails_alone(db_engine: AsyncEngine) -> None:
    """The first of two batches in flight fails (its connection is killed): its caller gets
    the error and its record does not exist; the second, chained onto it, is re-chained onto
    the real head and commits."""
    sm = make_sessionmaker(db_engine)
    async with LedgerWriter(db_engine) as writer:
        async with sm.begin() as s:  # holds the head lock, then lets go without a change
            await s.execute(text("SELECT seq FROM ledger_head WHERE id = 1 FOR UPDATE"))
            first, rest, pid = await _two_flights(writer, db_engine)
            await s.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(DatabaseUnavailable):
                await first
        entries = [await t for t in rest]
        after = await writer.append(kind="test", principal="c", payload={})
    assert [e.seq for e in entries] == list(range(1, 11))
    assert entries[0].payload == {"n": 1}
    assert after.seq == 11
    await _check_chain(db_engine, 11)


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_cancelled_writer_fails_the_batches_in_flight(db_engine: AsyncEngine) -> None:
    sm = make_sessionmaker(db_engine)
    writer = LedgerWriter(db_engine)
    await writer.start()
    try:
        async with sm.begin() as s:  # holds the head lock
            await s.execute(text("SELECT seq FROM ledger_head WHERE id = 1 FOR UPDATE"))
            first, rest, _pid = await _two_flights(writer, db_engine)
            assert writer._task is not None
            writer._task.cancel()
            for task in [first, *rest]:
                with pytest.raises(RuntimeError, match="stopped"):
                    await task
    finally:
        await writer.close()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_pipeline_batch_that_overtook_its_predecessor_is_resent(
    db_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second batch in flight reaches the server before the first (two connections): it
    finds the head before the first batch and writes nothing. Once the first has committed,
    the same batch is sent again unchanged and commits; nothing is drained or re-chained."""
    from audit.ledger import PG_APPEND_SQL, pg_write_args

    async with LedgerWriter(db_engine) as writer:
        real_issue = writer._issue
        sent: list[int] = []  # the first seq of each batch, in the order they were sent
        first_sent = asyncio.Event()

        def issue(raw: Any, seq: int, digest: str, batch: Any) -> Any:
            sent.append(batch.entries[0].seq)
            first_sent.set()
            if len(sent) > 1:
                return real_issue(raw, seq, digest, batch)

            async def late() -> Any:  # the first batch is slow on its way to the server
                await asyncio.sleep(0.5)
                return await raw.fetch(PG_APPEND_SQL, seq, digest, *pg_write_args(batch))

            task = asyncio.ensure_future(late())
            task.add_done_callback(writer._wake_up)
            return task

        rechained: list[int] = []
        real_commit = writer._commit

        async def commit(batch: Any) -> Any:
            rechained.append(len(batch))
            return await real_commit(batch)

        monkeypatch.setattr(writer, "_issue", issue)
        monkeypatch.setattr(writer, "_commit", commit)
        first = asyncio.create_task(writer.append(kind="test", principal="a", payload={"n": 0}))
        await first_sent.wait()
        rest = [
            asyncio.create_task(writer.append(kind="test", principal="b", payload={"n": i}))
            for i in range(1, 11)
        ]
        entries = [await first] + [await t for t in rest]
    assert [e.seq for e in entries] == list(range(1, 12))
    assert sent == [1, 2, 2], sent  # the second batch went twice, unchanged
    assert rechained == []
    await _check_chain(db_engine, 11)
