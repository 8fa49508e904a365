"""Audit ledger benchmark: appends, verification, usage aggregation (one run, ratios).

For each backend (SQLite file, PostgreSQL database `fg_bench_audit`, created and dropped here):

- appends/s at 1 and 32 concurrent appenders: the ledger (hash chain, Merkle frontier, usage
  summary, group commit through `LedgerWriter`) against plain INSERTs of the same rows into the
  same table, one transaction per row (what an application without a ledger would do);
- verification records/s (`audit.verify.verify`) over `--records` records (default 1 M),
  loaded in batches of 2,000 through `append_many` and covered by a signed checkpoint, with
  each of `--verify-workers` worker counts (default 1,2; 1 = one process), `--verify-runs`
  times each, interleaved; the verify column of the last table is the best of the last count;
- latency of usage aggregation over those records (by expert, principal, day; median of 5);
- the cost of the derived-state check (`audit.derived.check_usage_summary`: the usage summary
  recomputed from every record and compared), median of 3, and of RFC 8785 canonical JSON
  (`audit.jcs`) against `json.dumps(sort_keys=True)` per payload (median of 5 passes).

Verification is timed without the derived check (`derived=False`), anchored to the
benchmark's own FLEXGATE_HOME.

Payloads are realistic inference payloads (`audit.inference.inference_payload`, ~800 bytes):
50 principals, 8 experts, 3 purposes.

Usage: python bench/audit.py [--backends sqlite,postgresql] [--appends 20000]
       [--records 1000000] [--pg-admin-url postgresql://postgres@127.0.0.1:5432/postgres]
       [--only all|verify] [--verify-workers 1,2] [--verify-runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, insert, select, text

from audit.anchor import Anchors
from audit.canonical import canonical_json, format_time
from audit.checkpoints import create_checkpoint
from audit.db import make_engine, make_sessionmaker, upgrade
from audit.derived import check_usage_summary
from audit.inference import inference_payload
from audit.ledger import NewRecord, append_many
from audit.models import LedgerRecord, LedgerUsage
from audit.query import usage
from audit.signing import Signer
from audit.verify import verify
from audit.writer import LedgerWriter

EXPERTS = ["public", "code", "news", "math", "law", "bio", "lit", "web"]
PURPOSES = ["general", "research", "support"]
PG_DB = "fg_bench_audit"


def payloads(n: int, seed: int = 7) -> list[tuple[str, dict[str, Any]]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        allowed = ["public", *rng.sample(EXPERTS[1:], 3)]
        usage_map = {
            e: ((rng.randrange(1, 400), round(rng.random() * 200, 3)) if e in allowed else (0, 0.0))
            for e in EXPERTS
        }
        payload = inference_payload(
            request_id=f"req-{i}",
            endpoint="/v1/chat/completions",
            model="flexolmo-demo",
            purpose=rng.choice(PURPOSES),
            policy_version=17,
            experts_allowed=allowed,
            experts_excluded={e: "no-license" for e in EXPERTS if e not in allowed},
            usage=usage_map,
            prompt_tokens=rng.randrange(5, 500),
            completion_tokens=rng.randrange(1, 300),
            finish_reason="stop",
            status="ok",
            prompt=f"prompt {i}",
            duration_ms=rng.random() * 900,
            trace_id=uuid.UUID(int=rng.getrandbits(128)).hex,
            store_raw_text=False,
        )
        out.append((f"app-{rng.randrange(50)}", payload))
    return out


async def _pg_admin(admin_url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def fresh_database(backend: str, admin_url: str, folder: Path) -> str:
    if backend == "sqlite":
        path = folder / f"bench-{uuid.uuid4().hex[:8]}.db"
        url = f"sqlite+aiosqlite:///{path}"
    else:
        await _pg_admin(admin_url, f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
        await _pg_admin(admin_url, f"CREATE DATABASE {PG_DB}")
        base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        url = f"{base}/{PG_DB}"
    await asyncio.to_thread(upgrade, url)
    return url


async def bench_chain(url: str, rows: list[tuple[str, dict[str, Any]]], concurrency: int) -> float:
    engine = make_engine(url)
    try:
        async with LedgerWriter(engine) as writer:
            start = time.perf_counter()

            async def appender(k: int) -> None:
                for principal, payload in rows[k::concurrency]:
                    await writer.append(kind="inference", principal=principal, payload=payload)

            await asyncio.gather(*(appender(k) for k in range(concurrency)))
            return len(rows) / (time.perf_counter() - start)
    finally:
        await engine.dispose()


async def bench_plain(url: str, rows: list[tuple[str, dict[str, Any]]], concurrency: int) -> float:
    """The same rows, one INSERT + COMMIT per row, no chain: seq from a counter, random hashes."""
    kwargs = {} if url.startswith("sqlite") else {"pool_size": concurrency, "max_overflow": 0}
    engine = make_engine(url, **kwargs)
    counter = itertools.count(1)
    try:
        start = time.perf_counter()

        async def appender(k: int) -> None:
            for principal, payload in rows[k::concurrency]:
                row = {
                    "seq": next(counter),
                    "id": str(uuid.uuid4()),
                    "kind": "inference",
                    "at": format_time(datetime.now(UTC)),
                    "principal": principal,
                    "payload": canonical_json(payload).decode(),
                    "prev_hash": os.urandom(32).hex(),
                    "hash": os.urandom(32).hex(),
                }
                async with engine.begin() as conn:
                    await conn.execute(insert(LedgerRecord), row)

        await asyncio.gather(*(appender(k) for k in range(concurrency)))
        return len(rows) / (time.perf_counter() - start)
    finally:
        await engine.dispose()


async def load(url: str, rows: list[tuple[str, dict[str, Any]]], n: int, home: Path) -> float:
    engine = make_engine(url)
    sm = make_sessionmaker(engine)
    start = time.perf_counter()
    try:
        for lo in range(0, n, 2000):
            batch = [
                NewRecord("inference", *rows[i % len(rows)]) for i in range(lo, min(lo + 2000, n))
            ]
            async with sm.begin() as session:
                await append_many(session, batch)
        async with sm.begin() as session:
            await create_checkpoint(session, Signer.load_or_create(home))
        rate = n / (time.perf_counter() - start)
        if engine.dialect.name == "postgresql":
            async with engine.connect() as conn:  # what autovacuum would have done by now
                await conn.execute(text("COMMIT"))
                await conn.execute(text("ANALYZE"))
        return rate
    finally:
        await engine.dispose()


async def bench_verify(url: str, home: Path, workers: int | None = None) -> tuple[float, int]:
    engine = make_engine(url)
    signer = Signer.load_or_create(home)
    try:
        async with make_sessionmaker(engine)() as session:
            start = time.perf_counter()
            report = await verify(
                session,
                public_keys={signer.key_id: signer.public_key},
                workers=workers,
                anchors=Anchors(home),
                derived=False,
            )
            elapsed = time.perf_counter() - start
        assert report.ok, report
        return report.records / elapsed, report.records
    finally:
        await engine.dispose()


async def bench_verify_modes(
    url: str, home: Path, workers: list[int], runs: int
) -> dict[int, list[float]]:
    """records/s of `runs` verifications per worker count, interleaved (w1, w2, w1, w2, ...)
    so that a change in the machine's load hits every mode alike."""
    rates: dict[int, list[float]] = {w: [] for w in workers}
    for _ in range(runs):
        for w in workers:
            rates[w].append((await bench_verify(url, home, w))[0])
    return rates


async def bench_derived(url: str) -> float:
    """Seconds to recompute and compare the usage summary (median of 3)."""
    engine = make_engine(url)
    try:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            (finding,) = await check_usage_summary(engine)
            times.append(time.perf_counter() - start)
            assert finding.ok, finding
        return statistics.median(times)
    finally:
        await engine.dispose()


def bench_canonical(rows: list[tuple[str, dict[str, Any]]]) -> dict[str, float]:
    """µs per payload: RFC 8785 (`canonical_json`) and sorted-keys `json.dumps`."""
    import json

    payloads = [p for _, p in rows[:5000]]
    out: dict[str, float] = {}
    for name, encode in (
        ("jcs", canonical_json),
        (
            "json.dumps",
            lambda p: json.dumps(
                p, sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode(),
        ),
    ):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for p in payloads:
                encode(p)
            times.append((time.perf_counter() - start) / len(payloads) * 1e6)
        out[name] = statistics.median(times)
    return out


async def bench_usage(url: str) -> dict[str, Any]:
    engine = make_engine(url)
    out: dict[str, Any] = {}
    try:
        async with make_sessionmaker(engine)() as session:
            out["summary_rows"] = await session.scalar(
                select(func.count()).select_from(LedgerUsage)
            )
            for by in ("expert", "principal", "day"):
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    result = await usage(session, by=by)
                    times.append(time.perf_counter() - start)
                out[by] = statistics.median(times) * 1000
                if by == "expert":
                    out["requests"] = sum(r.requests for r in result if r.key == "public")
    finally:
        await engine.dispose()
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--appends", type=int, default=20000, help="appends at 32 appenders")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--pg-admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--only",
        choices=("all", "appends", "chain32", "ledger", "verify"),
        default="all",
        help="appends: the appends table only; chain32: the chain at 32 appenders only; "
        "ledger: load, verify and usage only; verify: load and verify only",
    )
    parser.add_argument(
        "--verify-workers",
        default="1,2",
        help="worker counts to verify with, interleaved (1: one process)",
    )
    parser.add_argument("--verify-runs", type=int, default=3, help="verifications per count")
    args = parser.parse_args()
    verify_workers = [int(w) for w in args.verify_workers.split(",")]
    rows = payloads(max(args.appends, 20000))
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, {datetime.now(UTC):%Y-%m-%d %H:%M}Z",
        flush=True,
    )
    results: dict[str, dict[str, Any]] = {}
    canonical = bench_canonical(rows)
    print(f"canonical JSON µs/payload: {canonical}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for backend in args.backends.split(","):
            r: dict[str, Any] = {}
            for concurrency in (1, 32) if args.only in ("all", "appends", "chain32") else ():
                if args.only == "chain32" and concurrency == 1:
                    continue
                n = args.appends if concurrency > 1 else max(args.appends // 10, 500)
                url = await fresh_database(backend, args.pg_admin_url, folder)
                r[f"chain{concurrency}"] = await bench_chain(url, rows[:n], concurrency)
                if args.only != "chain32":
                    url = await fresh_database(backend, args.pg_admin_url, folder)
                    r[f"plain{concurrency}"] = await bench_plain(url, rows[:n], concurrency)
                print(backend, concurrency, r, flush=True)
            if args.only in ("appends", "chain32"):
                results[backend] = r
                if backend == "postgresql":
                    await _pg_admin(
                        args.pg_admin_url, f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)"
                    )
                continue
            url = await fresh_database(backend, args.pg_admin_url, folder)
            home = folder / f"home-{backend}"
            r["load"] = await load(url, rows, args.records, home)
            r["verify_modes"] = await bench_verify_modes(
                url, home, verify_workers, args.verify_runs
            )
            r["verified"] = args.records + 1  # and the checkpoint record
            r["verify"] = max(r["verify_modes"][verify_workers[-1]])
            if args.only in ("all", "ledger"):
                r.update(await bench_usage(url))
                r["derived_s"] = await bench_derived(url)
            print(backend, r, flush=True)
            results[backend] = r
            if backend == "postgresql":
                await _pg_admin(args.pg_admin_url, f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
    print()
    print("| backend | records | verify workers | verify best (records/s) | median | runs |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for backend, r in results.items():
        for w, rates in r.get("verify_modes", {}).items():
            print(
                f"| {backend} | {r['verified']:,} | {w} | {max(rates):,.0f} "
                f"| {statistics.median(rates):,.0f} | {', '.join(f'{x:,.0f}' for x in rates)} |"
            )
    if args.only == "verify":
        return
    print()
    print(
        "| backend | appenders | chain + group commit (appends/s) | plain INSERT (rows/s) "
        "| chain time / plain time |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for backend, r in results.items():
        for c in (1, 32):
            if f"plain{c}" not in r:
                continue
            chain, plain = r[f"chain{c}"], r[f"plain{c}"]
            print(f"| {backend} | {c} | {chain:,.0f} | {plain:,.0f} | {plain / chain:.2f}x |")
    print()
    print(
        "| backend | records | bulk load (records/s) | verify (records/s) "
        "| usage by expert / principal / day (ms) | summary rows | derived check (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for backend, r in results.items():
        if "verified" not in r:
            continue
        print(
            f"| {backend} | {r['verified']:,} | {r['load']:,.0f} | {r['verify']:,.0f} "
            f"| {r['expert']:.1f} / {r['principal']:.1f} / {r['day']:.1f} | {r['summary_rows']:,} "
            f"| {r['derived_s']:.2f} |"
        )
    print()
    print(
        f"canonical JSON per payload: RFC 8785 {canonical['jcs']:.1f} µs, "
        f"json.dumps(sort_keys) {canonical['json.dumps']:.1f} µs"
    )


if __name__ == "__main__":
    asyncio.run(main())
