"""Gateway benchmark (a script, not a test): the cost of the gateway around the engine.

    PYTHONPATH=. python bench/gateway.py [--size medium|tiny] [--rounds 3] \\
        [--database-url URL] [--kill-seconds 60] [--skip-kill] [--baseline CHECKOUT]

Part 1. /v1/completions, 16 generated tokens, greedy, at 1, 8 and 32 concurrent clients,
through a real `flexgate serve` process (one worker; auth, route policy, allowed set, rate
limits, ledger record, telemetry all on) vs the same generations called in-process on an
engine of the same checkpoint (`Engine.stream`, same prompt and parameters). The configurations
are interleaved round by round and the medians of the rounds reported, with their spread
(min-max). Latency is the whole request as the client sees it; TTFT is measured with streamed
requests (first chunk with text); tokens/s counts the completion tokens the replies report.
The in-process side calls the engine as the gateway does: `text_events=False` for a plain
reply (the result only), text events for a streamed one.
The gateway's overhead per request is p50(gateway) - p50(engine), in ms and in %.
`--baseline CHECKOUT` (another checkout of the repository, e.g. a `git worktree` of an older
commit) adds a second server running that checkout's code, measured in the same rounds, so an
A/B of two gateway versions shares the machine's load (its own SQLite file).

Part 2. A `--kill-seconds` load on `flexgate serve --workers 2` (8 client loops), one worker
SIGKILLed midway: every response a client received must have its ledger record (same seq and
request id) and the chain must verify.

Both parts share one SQLite file by default (`--database-url` for PostgreSQL). The HTTP client
(httpx) runs in this process and is part of the gateway's numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from audit.db import make_engine, make_sessionmaker, upgrade  # noqa: E402
from audit.query import RecordQuery, query_records  # noqa: E402
from audit.signing import trusted_public_keys  # noqa: E402
from audit.verify import verify  # noqa: E402
from engine.api import load_engine  # noqa: E402
from engine.checkpoints import build_tiny_checkpoint  # noqa: E402
from engine.generation import Finished  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

MODEL = "bench-flexolmo"
PROMPT = "The quick brown fox jumps over the lazy dog and"
TOKENS = 16
CONCURRENCY = (1, 8, 32)
REQUESTS = {1: 8, 8: 16, 32: 32}
EXPERTS = ("public", "code", "news", "math")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Sample:
    """One batch of requests at one concurrency."""

    latencies: list[float]
    ttfts: list[float]
    tokens: int
    wall: float

    def summary(self) -> dict[str, float]:
        return {
            "rps": len(self.latencies) / self.wall,
            "p50_ms": percentile(self.latencies, 0.5) * 1e3,
            "p99_ms": percentile(self.latencies, 0.99) * 1e3,
            "ttft_p50_ms": percentile(self.ttfts, 0.5) * 1e3 if self.ttfts else float("nan"),
            "tok_s": self.tokens / self.wall,
        }


async def run_concurrent(n_clients: int, total: int, one: Any) -> Sample:
    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    queue = list(range(total))

    async def client() -> None:
        nonlocal tokens
        while queue:
            queue.pop()
            t0 = time.perf_counter()
            ttft, n = await one()
            latencies.append(time.perf_counter() - t0)
            if ttft is not None:
                ttfts.append(ttft - t0)
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(n_clients)))
    return Sample(latencies, ttfts, tokens, time.perf_counter() - t0)


# -- in-process engine ----------------------------------------------------------------------


def engine_call(eng: Any, ids: list[int], stream: bool) -> Any:
    params = SamplingParams(max_tokens=TOKENS, temperature=0.0)

    async def one() -> tuple[float | None, int]:
        first: float | None = None
        n = 0
        # as the gateway calls it: text events only when the reply streams
        async for event in eng.stream(ids, params, allowed=EXPERTS, text_events=stream):
            if isinstance(event, Finished):
                n = event.result.completion_tokens
            elif first is None and event.token_ids:
                first = time.perf_counter()
        return (first if stream else None), n

    return one


# -- gateway --------------------------------------------------------------------------------


def gateway_call(client: httpx.AsyncClient, ids: list[int], stream: bool) -> Any:
    # the very token ids the engine side gets (a token-id prompt), so both generate the same
    body = {"model": MODEL, "prompt": ids, "max_tokens": TOKENS, "temperature": 0}

    async def one() -> tuple[float | None, int]:
        if not stream:
            r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            return None, int(r.json()["usage"]["completion_tokens"])
        first: float | None = None
        n = 0
        async with client.stream(
            "POST",
            "/v1/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                    first = time.perf_counter()
                if chunk.get("usage"):
                    n = int(chunk["usage"]["completion_tokens"])
        return first, n

    return one


async def check_expert_set(client: httpx.AsyncClient, ids: list[int], name: str) -> None:
    """Refuse to measure a server that would not run the in-process side's expert set."""
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0}
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    allowed = sorted(r.json()["flexgate"]["experts"]["allowed"])
    if allowed != sorted(EXPERTS):
        raise SystemExit(f"{name}: the server runs {allowed}, not {sorted(EXPERTS)}")


async def seed(db_url: str, model_dir: Path) -> dict[str, str]:
    """Principals and keys, and a license on every expert for the application: the gateway
    side must run the very expert set the in-process side is given (EXPERTS), or the two
    compare different models (a first version of this script licensed none, so its server ran
    the public expert alone)."""
    from governance.experts import sync_experts
    from governance.identity import Identity
    from governance.keys import create_key
    from governance.licenses import grant_license
    from governance.principals import add_principal

    op = Identity.operator()
    keys: dict[str, str] = {}
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            await sync_experts(s, actor=op, model_dir=model_dir)
            for pid, role in (
                ("bench-app", "application"),
                ("bench-officer", "compliance_officer"),
            ):
                await add_principal(s, actor=op, principal_id=pid, roles=[role])
                _row, keys[pid] = await create_key(s, actor=op, principal_id=pid)
            for expert in EXPERTS[1:]:
                await grant_license(s, actor=op, expert_id=expert, grantee="bench-app")
    finally:
        await engine.dispose()
    return keys


async def start(
    db_url: str,
    home: Path,
    model_dir: Path,
    workers: int,
    repo: Path = REPO,
    probe: Path | None = None,
) -> tuple[asyncio.subprocess.Process, str]:
    """`flexgate serve` of the checkout `repo` (its own code: PYTHONPATH and cwd); with `probe`,
    bench/gateway_probe times the request's steps into that file."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        "FLEXGATE_DATABASE_URL": db_url,
        "FLEXGATE_HOME": str(home),
        "FLEXGATE_MODEL": str(model_dir),
        "FLEXGATE_MODEL_NAME": MODEL,
        # limits on (the limiter's cost is part of the gateway) but far above the load
        "FLEXGATE_RATE_RPM": "100000000",
        "FLEXGATE_RATE_TPM": "1000000000",
        "FLEXGATE_RATE_MAX_PARALLEL": "10000",
    }
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    if probe is not None:
        env["PYTHONPATH"] = f"{REPO / 'bench' / 'gateway_probe'}{os.pathsep}{repo}"
        env["GATEWAY_PROBE"] = str(probe)
    log = (home / f"serve-{port}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
        env=env,
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
        cwd=str(repo),
    )
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=2) as c:
        for _ in range(600):
            try:
                if (await c.get(f"{url}/readyz")).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"server did not start; see {log.name}")


async def stop(proc: asyncio.subprocess.Process) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.wait_for(proc.wait(), 60)
    except TimeoutError:
        proc.kill()
        return await proc.wait()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


async def part1(args: argparse.Namespace, db_url: str, home: Path, model_dir: Path) -> list[str]:
    keys = await seed(db_url, model_dir)
    eng = load_engine(model_dir)
    ids = list(eng.tokenizer(PROMPT)["input_ids"])
    servers = {"gateway": await start(db_url, home, model_dir, 1)}
    tokens = {"gateway": keys["bench-app"]}
    if args.baseline is not None:
        base_home = home.parent / "home-baseline"
        base_home.mkdir()
        base_db = f"sqlite+aiosqlite:///{base_home / 'flexgate.db'}"
        await asyncio.to_thread(upgrade, base_db)
        tokens["baseline"] = (await seed(base_db, model_dir))["bench-app"]
        servers["baseline"] = await start(base_db, base_home, model_dir, 1, args.baseline)
    sides = ["engine", *servers]
    results: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    loads: list[float] = []
    clients: dict[str, httpx.AsyncClient] = {}
    try:
        # idle connections dropped before the server closes them (uvicorn: 5 s), so a POST
        # never lands on a connection the server is closing
        limits = httpx.Limits(
            max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0
        )
        for name, (_proc, url) in servers.items():
            clients[name] = httpx.AsyncClient(
                base_url=url,
                headers={"Authorization": f"Bearer {tokens[name]}"},
                timeout=300,
                limits=limits,
            )

        def call(where: str, stream: bool) -> Any:
            if where == "engine":
                return engine_call(eng, ids, stream)
            return gateway_call(clients[where], ids, stream)

        for name, client in clients.items():
            await check_expert_set(client, ids, name)
        # warm-up: every side, both paths
        for n in CONCURRENCY:
            for where in sides:
                await run_concurrent(n, n, call(where, False))
                await run_concurrent(n, n, call(where, True))
        for rnd in range(args.rounds):
            for n in CONCURRENCY:
                for mode in ("plain", "stream"):
                    total = REQUESTS[n] if mode == "plain" else n
                    for where in sides:
                        # let the other side's OpenMP threads stop spin-waiting first
                        await asyncio.sleep(1.0)
                        s = await run_concurrent(n, total, call(where, mode == "stream"))
                        results.setdefault((where, n, mode), []).append(s.summary())
            loads.append(os.getloadavg()[0])
            print(f"round {rnd + 1}/{args.rounds} done, load {loads[-1]:.1f}", file=sys.stderr)
    finally:
        for c in clients.values():
            await c.aclose()
        for proc, _url in servers.values():
            await stop(proc)
        eng.close()
    lines = [
        f"load average (1 min) at the end of each round: {', '.join(f'{x:.1f}' for x in loads)}",
        "",
        "| clients | path | requests/s | p50 ms | p99 ms | TTFT p50 ms | tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    over: list[str] = []
    for n in CONCURRENCY:
        for where in sides:
            plain = results[(where, n, "plain")]
            stream = results[(where, n, "stream")]
            lines.append(
                f"| {n} | {where} | {spread([r['rps'] for r in plain])} "
                f"| {spread([r['p50_ms'] for r in plain])} "
                f"| {spread([r['p99_ms'] for r in plain])} "
                f"| {spread([r['ttft_p50_ms'] for r in stream])} "
                f"| {spread([r['tok_s'] for r in plain])} |"
            )
        for where in servers:
            over.append(f"- {n} client(s), {where}: " + overhead(results, where, n))
        if "baseline" in servers:
            ratio = [
                g["tok_s"] / b["tok_s"]
                for g, b in zip(
                    results[("gateway", n, "plain")],
                    results[("baseline", n, "plain")],
                    strict=True,
                )
            ]
            over.append(
                f"- {n} client(s): gateway tokens/s = {statistics.median(ratio):.2f}x the "
                f"baseline's ({min(ratio):.2f}-{max(ratio):.2f})"
            )
    return [*lines, "", *over]


def overhead(
    results: dict[tuple[str, int, str], list[dict[str, float]]], where: str, n: int
) -> str:
    """p50(server) - p50(engine) per round, and the server's tokens/s over the engine's."""
    eng_p50 = [r["p50_ms"] for r in results[("engine", n, "plain")]]
    gw_p50 = [r["p50_ms"] for r in results[(where, n, "plain")]]
    diffs = [g - e for g, e in zip(gw_p50, eng_p50, strict=True)]
    pct = [100 * d / e for d, e in zip(diffs, eng_p50, strict=True)]
    ratio = [
        g["tok_s"] / e["tok_s"]
        for g, e in zip(results[(where, n, "plain")], results[("engine", n, "plain")], strict=True)
    ]
    return (
        f"overhead at p50 {spread(diffs)} ms = {spread(pct)} %; "
        f"tokens/s = {statistics.median(ratio):.2f}x the engine's "
        f"({min(ratio):.2f}-{max(ratio):.2f})"
    )


async def part3(args: argparse.Namespace, db_url: str, home: Path, model_dir: Path) -> list[str]:
    """Where one client's request spends its time: the server's steps (bench/gateway_probe)
    against the whole request as the client sees it, and the same generation in-process."""
    keys = await seed(db_url, model_dir)
    probe = home / "probe.jsonl"
    proc, url = await start(db_url, home, model_dir, 1, probe=probe)
    eng = load_engine(model_dir)
    ids = list(eng.tokenizer(PROMPT)["input_ids"])
    client = httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {keys['bench-app']}"}, timeout=300
    )
    walls: dict[str, list[float]] = {"engine": [], "gateway": []}
    try:
        await check_expert_set(client, ids, "gateway")
        calls = {
            "engine": engine_call(eng, ids, False),
            "gateway": gateway_call(client, ids, False),
        }
        for i in range(args.breakdown + 5):  # the first 5 of each: warm-up
            for where, one in calls.items():
                await asyncio.sleep(0.05)
                t0 = time.perf_counter()
                await one()
                if i >= 5:
                    walls[where].append((time.perf_counter() - t0) * 1e3)
    finally:
        await client.aclose()
        await stop(proc)
        eng.close()
    rows = [json.loads(line) for line in probe.read_text().splitlines()][-args.breakdown :]
    steps = ("auth", "version_read", "limiter", "engine", "ledger", "handler")
    lines = [
        f"1 client, {args.breakdown} sequential requests each way, medians (p90):",
        "",
        "| step | ms |",
        "| --- | --- |",
    ]
    for step in steps:
        values = [r.get(step, 0.0) for r in rows]
        lines.append(
            f"| server: {step} | {statistics.median(values):.2f} ({percentile(values, 0.9):.2f}) |"
        )
    for where in ("gateway", "engine"):
        lines.append(
            f"| whole request, {where} | {statistics.median(walls[where]):.2f} "
            f"({percentile(walls[where], 0.9):.2f}) |"
        )
    return lines


async def part2(args: argparse.Namespace, db_url: str, home: Path, model_dir: Path) -> list[str]:
    keys = await seed_kill(db_url)
    proc, url = await start(db_url, home, model_dir, 2)
    got: list[tuple[int, str]] = []
    failures = 0
    stop_at = time.monotonic() + args.kill_seconds
    killed: int | None = None

    async def loop(c: httpx.AsyncClient, n: int) -> None:
        nonlocal failures
        i = 0
        while time.monotonic() < stop_at:
            rid = f"kill-{n}-{i}"
            i += 1
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
            try:
                r = await c.post("/v1/completions", json=body, headers={"X-Request-Id": rid})
            except httpx.HTTPError:
                failures += 1
                continue
            if r.status_code == 200:
                got.append((int(r.headers["x-flexgate-audit-seq"]), rid))
            else:
                failures += 1

    async def killer() -> None:
        nonlocal killed
        await asyncio.sleep(args.kill_seconds / 2)
        children = _children(proc.pid)
        print(f"workers before the kill: {children}", file=sys.stderr)
        if children:
            killed = children[0]
            os.kill(killed, signal.SIGKILL)
        await asyncio.sleep(5)
        print(f"workers 5 s after: {_children(proc.pid)}", file=sys.stderr)

    headers = {"Authorization": f"Bearer {keys['kill-app']}"}
    try:
        async with httpx.AsyncClient(
            base_url=url,
            headers=headers,
            timeout=120,
            limits=httpx.Limits(keepalive_expiry=2.0),
        ) as c:
            await asyncio.gather(killer(), *(loop(c, n) for n in range(8)))
    finally:
        await stop(proc)
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            by_seq: dict[int, str] = {}
            after = 0
            while True:
                page = await query_records(
                    s, RecordQuery(kind="inference", after=after, limit=1000)
                )
                by_seq.update({e.seq: e.payload["request_id"] for e in page.records})
                if page.next_after is None:
                    break
                after = page.next_after
            report = await verify(s, public_keys=trusted_public_keys(home), workers=1)
    finally:
        await engine.dispose()
    missing = [(seq, rid) for seq, rid in got if by_seq.get(seq) != rid]
    return [
        f"- {args.kill_seconds:.0f} s load, 8 clients, `--workers 2`, worker pid {killed} "
        f"SIGKILLed at {args.kill_seconds / 2:.0f} s: {len(got)} responses received, "
        f"{failures} requests failed (connection cut or 5xx), "
        f"{len(missing)} responses without their ledger record; chain verifies: "
        f"{report.ok} ({report.records} records checked"
        f"{'' if report.ok else ', ' + str(report.reason)})",
    ]


async def seed_kill(db_url: str) -> dict[str, str]:
    from governance.identity import Identity
    from governance.keys import create_key
    from governance.principals import add_principal

    op = Identity.operator()
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            await add_principal(s, actor=op, principal_id="kill-app", roles=["application"])
            _row, token = await create_key(s, actor=op, principal_id="kill-app")
    finally:
        await engine.dispose()
    return {"kill-app": token}


def _engine_bench_sizes() -> dict[str, dict[str, Any]]:
    """The model sizes of bench/engine.py (one definition of "medium" and "tiny")."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_engine", Path(__file__).resolve().parent / "engine.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_engine"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    sizes: dict[str, dict[str, Any]] = module.SIZES
    return sizes


def _children(pid: int) -> list[int]:
    """The worker processes of a `flexgate serve --workers N` supervisor (not the helper
    processes multiprocessing starts beside them, such as its resource tracker)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != pid:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            out.append(int(entry.name))
    return sorted(out)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="medium", choices=("medium", "tiny"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--kill-seconds", type=float, default=60.0)
    ap.add_argument("--skip-kill", action="store_true")
    ap.add_argument("--skip-compare", action="store_true")
    ap.add_argument(
        "--breakdown",
        type=int,
        default=0,
        metavar="N",
        help="also time the server's steps over N sequential requests (bench/gateway_probe)",
    )
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout whose gateway is measured in the same rounds (A/B)",
    )
    args = ap.parse_args()
    SIZES = _engine_bench_sizes()

    work = Path(tempfile.mkdtemp(prefix="flexgate-bench-gw-"))
    overrides = dict(SIZES[args.size])
    overrides.pop("num_experts", None)
    model_dir = build_tiny_checkpoint(work / MODEL, EXPERTS, seed=0, **overrides)
    print(
        f"# bench/gateway.py on {platform.node()}, {os.cpu_count()} CPUs, {args.size} model, "
        f"load average {os.getloadavg()[0]:.1f} at start"
        + (f", baseline {args.baseline}" if args.baseline else "")
    )
    if not args.skip_compare:
        home = work / "home1"
        db_url = args.database_url or f"sqlite+aiosqlite:///{home / 'flexgate.db'}"
        home.mkdir()
        await asyncio.to_thread(upgrade, db_url)
        for line in await part1(args, db_url, home, model_dir):
            print(line)
    if args.breakdown:
        home = work / "home3"
        db_url = args.database_url or f"sqlite+aiosqlite:///{home / 'flexgate.db'}"
        home.mkdir()
        await asyncio.to_thread(upgrade, db_url)
        for line in await part3(args, db_url, home, model_dir):
            print(line)
    if not args.skip_kill:
        home = work / "home2"
        home.mkdir()
        db_url = args.database_url or f"sqlite+aiosqlite:///{home / 'flexgate.db'}"
        await asyncio.to_thread(upgrade, db_url)
        for line in await part2(args, db_url, home, model_dir):
            print(line)


if __name__ == "__main__":
    asyncio.run(main())
