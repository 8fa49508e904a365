"""Revocation across processes (a script, not a test): how long after a license is revoked
through one server does a stream running on another server lose the expert?

    PYTHONPATH=. python bench/revocation.py [--rounds 15] [--database-url URL] \\
        [--poll-seconds 0.25]

Two `flexgate serve` processes, A and B, on one database (SQLite file by default) and one
FLEXGATE_HOME, a tiny checkpoint. Each round: the expert's owner grants `code` to the
application through A; the application starts a stream on B that may use only `code`
(`experts: {"only": ["code"]}`, so losing it ends the stream); after its first text chunk the
owner revokes the license through A. B's policy watcher (polling every
FLEXGATE_POLICY_POLL_SECONDS) narrows the stream, which ends with finish reason `cancelled`;
its ledger record says when B narrowed it (`revoked_at`, B's wall clock: one host, one
clock) and after how many tokens (`revoked_after_tokens`). Reported, with median, min-max
and the 90th percentile over the rounds:

- narrowed - revocation sent: from the DELETE leaving the client to B's narrowing (an upper
  bound of commit -> narrowing);
- narrowed - revocation answered: from A's reply to the narrowing (B may see the commit
  before A's reply reaches the client: this can be below zero);
- stream ended - revocation answered: what the client of B sees.

Target (issue 10): <= 1 s across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit.db import make_engine, make_sessionmaker, upgrade  # noqa: E402
from audit.query import RecordQuery, query_records  # noqa: E402
from audit.signing import Signer  # noqa: E402
from engine.checkpoints import build_tiny_checkpoint  # noqa: E402

EXPERTS = ("public", "code", "news", "math")


def _bench_gateway() -> Any:
    """bench/gateway.py's server helpers (`start`, `stop`, MODEL): one way to run a server."""
    spec = importlib.util.spec_from_file_location("bench_gateway", REPO / "bench" / "gateway.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gateway"] = module
    spec.loader.exec_module(module)
    return module


async def seed(db_url: str) -> dict[str, str]:
    from governance.identity import Identity
    from governance.keys import create_key
    from governance.principals import add_principal

    op = Identity.operator()
    keys: dict[str, str] = {}
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            for pid, role in (("owner-code", "data_owner"), ("rev-app", "application")):
                await add_principal(s, actor=op, principal_id=pid, roles=[role])
                _row, keys[pid] = await create_key(s, actor=op, principal_id=pid)
    finally:
        await engine.dispose()
    return keys


async def record_of(db_url: str, seq: int) -> Any:
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            page = await query_records(s, RecordQuery(kind="inference", after=seq - 1, limit=1))
    finally:
        await engine.dispose()
    (entry,) = [e for e in page.records if e.seq == seq]
    return entry


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def one_round(
    db_url: str, model: str, owner_a: httpx.AsyncClient, app_b: httpx.AsyncClient
) -> dict[str, float]:
    r = await owner_a.post("/v1/experts/code/licenses", json={"grantee": "rev-app"})
    r.raise_for_status()
    license_id = r.json()["id"]
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": 3000,
        "temperature": 0,
        "stream": True,
        "experts": {"only": ["code"]},
    }
    sent = answered = ended = None
    final: Any = None
    async with app_b.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("flexgate"):
                final = chunk
            if any(c.get("finish_reason") for c in chunk.get("choices", [])):
                ended = time.time()
            if sent is None and any(c.get("text") for c in chunk.get("choices", [])):
                sent = time.time()
                revoke = await owner_a.delete(f"/v1/experts/code/licenses/{license_id}")
                answered = time.time()
                revoke.raise_for_status()
    if sent is None or answered is None or ended is None or final is None:
        raise SystemExit("the stream ended before the revocation; raise max_tokens")
    payload = (await record_of(db_url, final["flexgate"]["audit_seq"])).payload
    if payload.get("revoked") != {"code": "revoked-no-license"}:
        raise SystemExit(f"the stream was not narrowed: {payload}")
    narrowed = _epoch(payload["revoked_at"])
    return {
        "from_sent_ms": (narrowed - sent) * 1e3,
        "from_answer_ms": (narrowed - answered) * 1e3,
        "client_end_ms": (ended - answered) * 1e3,
        "revoke_call_ms": (answered - sent) * 1e3,
        "after_tokens": float(payload["revoked_after_tokens"]),
        "tokens": float(payload["completion_tokens"]),
    }


def summary(values: list[float]) -> str:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return (
        f"{statistics.median(values):.0f} ({min(values):.0f} to {max(values):.0f}; p90 {p90:.0f})"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--poll-seconds", type=float, default=0.25)
    args = ap.parse_args()
    gw = _bench_gateway()
    work = Path(tempfile.mkdtemp(prefix="flexgate-bench-rev-"))
    model_dir = build_tiny_checkpoint(
        work / gw.MODEL, EXPERTS, seed=0, max_position_embeddings=4096
    )
    home = work / "home"
    home.mkdir()
    db_url = args.database_url or f"sqlite+aiosqlite:///{home / 'flexgate.db'}"
    await asyncio.to_thread(upgrade, db_url)
    Signer.load_or_create(home)  # one signing key for both servers, made before they start
    keys = await seed(db_url)
    os.environ["FLEXGATE_POLICY_POLL_SECONDS"] = str(args.poll_seconds)
    load_before = os.getloadavg()
    (a, url_a), (b, url_b) = await asyncio.gather(
        gw.start(db_url, home, model_dir, 1), gw.start(db_url, home, model_dir, 1)
    )
    rounds: list[dict[str, float]] = []
    try:
        async with (
            httpx.AsyncClient(
                base_url=url_a, headers={"Authorization": f"Bearer {keys['owner-code']}"}
            ) as owner_a,
            httpx.AsyncClient(
                base_url=url_b,
                headers={"Authorization": f"Bearer {keys['rev-app']}"},
                timeout=120,
            ) as app_b,
        ):
            await one_round(db_url, gw.MODEL, owner_a, app_b)  # warm-up, not counted
            for n in range(args.rounds):
                rounds.append(await one_round(db_url, gw.MODEL, owner_a, app_b))
                print(f"round {n + 1}/{args.rounds}: {rounds[-1]}", file=sys.stderr)
    finally:
        await asyncio.gather(gw.stop(a), gw.stop(b))
    load_after = os.getloadavg()
    print(
        f"# bench/revocation.py on {platform.node()}, {os.cpu_count()} CPUs, "
        f"{'SQLite' if args.database_url is None else 'the given database'}, "
        f"FLEXGATE_POLICY_POLL_SECONDS={args.poll_seconds}, {args.rounds} rounds, "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print("| measure (ms) | median (min to max; p90) |")
    print("| --- | --- |")
    for key, label in (
        ("from_sent_ms", "revocation sent to A -> stream narrowed on B"),
        ("from_answer_ms", "revocation answered by A -> stream narrowed on B"),
        ("client_end_ms", "revocation answered by A -> B's client sees the stream end"),
        ("revoke_call_ms", "the revocation call itself (A)"),
    ):
        print(f"| {label} | {summary([r[key] for r in rounds])} |")
    after = [r["after_tokens"] for r in rounds]
    extra = [r["tokens"] - r["after_tokens"] for r in rounds]
    print(
        f"\nTokens before the narrowing: median {statistics.median(after):.0f}; tokens "
        f"generated after it (the step already running): median {statistics.median(extra):.0f}"
        f" (max {max(extra):.0f})."
    )


if __name__ == "__main__":
    asyncio.run(main())
