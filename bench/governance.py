"""Allowed-set latency: FlexGate's compiled policy against a plain pycasbin enforce loop.

Both decide over the same synthetic policy (the project's Casbin model, 8 experts, N
licenses) for random (principal, purpose, time) queries; the baseline calls `enforce` once per
expert, as a straightforward integration would. Reported per N: p50 and p99 of

- compiled, cold: a fresh decision each query (the per-(principal, purpose) memo cleared);
- compiled, warm: the memo as a running server has it (queries drawn from a fixed population);
- casbin enforce loop: one `enforce` per expert;

and the ratio baseline / compiled-cold. Every baseline query is also checked for agreement.
The baseline scans every rule per call, so it runs fewer queries at large N (stated).

Usage: python bench/governance.py [--sizes 100,10000,100000] [--queries 2000] [--seed 7]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from governance import policy
from governance.decisions import CompiledPolicy

EXPERTS = ["public", "code", "news", "math", "law", "bio", "lit", "web"]
PURPOSES = ["general", "research", "ads", "support", "training", "eval"]
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def synthetic_policy(
    n: int, rng: random.Random
) -> tuple[list[list[str]], list[list[str]], list[list[str]], list[str]]:
    """p, g, g2 rules and the principals: grants mostly to principals and groups."""
    n_principals = max(50, n // 10)
    n_groups = max(5, n_principals // 20)
    principals = [f"app-{i}" for i in range(n_principals)]
    g = []
    for p in principals:
        g.append([p, "role:application"])
        for grp in rng.sample(range(n_groups), k=rng.randint(0, 2)):
            g.append([p, f"group:g{grp}"])
    p_rules: set[tuple[str, ...]] = {
        ("*", "public", "*", policy.TIME_MIN, policy.TIME_MAX, "allow")
    }
    while len(p_rules) < n:
        x = rng.random()
        if x < 0.70:
            sub = rng.choice(principals)
        elif x < 0.98:
            sub = f"group:g{rng.randrange(n_groups)}"
        elif x < 0.995:
            sub = "role:application"
        else:
            sub = "*"
        purposes = "*" if rng.random() < 0.3 else "|".join(sorted(rng.sample(PURPOSES, 2)))
        since, until = policy.TIME_MIN, policy.TIME_MAX
        if rng.random() < 0.5:
            since = policy.encode_time(NOW + timedelta(days=rng.randint(-400, 60)), "")
            until = policy.encode_time(NOW + timedelta(days=rng.randint(61, 800)), "")
        eft = "deny" if rng.random() < 0.05 else "allow"
        p_rules.add((sub, rng.choice(EXPERTS[1:]), purposes, since, until, eft))
    g2 = [["web", policy.WITHDRAWN]]
    return [list(r) for r in p_rules], g, g2, principals


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(n: int, queries: int, seed: int) -> dict[str, float | int]:
    rng = random.Random(seed + n)
    p, g, g2, principals = synthetic_policy(n, rng)
    enforcer = policy.enforcer_from_rules(p, g, g2)
    compiled = CompiledPolicy(enforcer, EXPERTS)
    population = [(rng.choice(principals), rng.choice(PURPOSES)) for _ in range(min(500, queries))]

    def query() -> tuple[str, str, datetime]:
        who, purpose = rng.choice(population)
        return who, purpose, NOW + timedelta(seconds=rng.randint(0, 3600))

    cold: list[float] = []
    for _ in range(queries):
        who, purpose, at = query()
        compiled._memo.clear()
        t0 = time.perf_counter()
        compiled.decide(who, purpose, at)
        cold.append(time.perf_counter() - t0)
    for who, purpose in population:  # as a running server has it: every caller seen before
        compiled.decide(who, purpose, NOW)
    warm: list[float] = []
    for _ in range(queries):
        who, purpose, at = query()
        t0 = time.perf_counter()
        compiled.decide(who, purpose, at)
        warm.append(time.perf_counter() - t0)
    # the baseline walks every rule per enforce call: bound its total time, not its quality
    per_call = max(1, queries // max(1, n // 50))
    base_queries = max(3, min(queries, per_call))
    base: list[float] = []
    for _ in range(base_queries):
        who, purpose, at = query()
        t = policy.encode_time(at, "")
        t0 = time.perf_counter()
        allowed = [e for e in EXPERTS if enforcer.enforce(who, e, purpose, t)]
        base.append(time.perf_counter() - t0)
        fast = compiled.decide(who, purpose, at).allowed
        assert list(fast) == allowed, (who, purpose, at, fast, allowed)
    return {
        "n": n,
        "rules": len(p),
        "queries": queries,
        "base_queries": base_queries,
        "cold_p50": pct(cold, 0.5),
        "cold_p99": pct(cold, 0.99),
        "warm_p50": pct(warm, 0.5),
        "warm_p99": pct(warm, 0.99),
        "base_p50": pct(base, 0.5),
        "base_p99": pct(base, 0.99),
        "mean_cold": statistics.fmean(cold),
    }


def ms(x: float) -> str:
    return f"{x * 1000:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,10000,100000")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    print(
        f"# {platform.python_implementation()} {platform.python_version()}, "
        f"{platform.machine()}, pycasbin enforce baseline, 8 experts, seed {args.seed}"
    )
    print(
        "| licenses | compiled cold p50 / p99 (ms) | compiled warm p50 / p99 (ms) "
        "| casbin enforce loop p50 / p99 (ms) | ratio p50 / p99 | queries (baseline) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(size, args.queries, args.seed)
        print(
            f"| {r['n']:,} | {ms(r['cold_p50'])} / {ms(r['cold_p99'])} "
            f"| {ms(r['warm_p50'])} / {ms(r['warm_p99'])} "
            f"| {ms(r['base_p50'])} / {ms(r['base_p99'])} "
            f"| {r['base_p50'] / r['cold_p50']:,.0f}x / {r['base_p99'] / r['cold_p99']:,.0f}x "
            f"| {r['queries']:,} ({r['base_queries']:,}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
