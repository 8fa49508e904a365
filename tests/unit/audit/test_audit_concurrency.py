"""Many coroutines and several processes append at once: one gap-free chain that verifies;
a writer killed with SIGKILL mid-load loses nothing it acknowledged. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from asyncio.subprocess import Process
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.db import make_sessionmaker
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
        original = writer._commit

        async def counting(batch):  # type: ignore[no-untyped-def]
            batches.append(len(batch))
            return await original(batch)

        writer._commit = counting  # type: ignore[method-assign]

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
