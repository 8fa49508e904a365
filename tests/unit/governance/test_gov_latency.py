"""The allowed set costs the same whatever the number of licenses (issue 4, item 5), checked
by counting work rather than timing it (the timing target, p99 <= 0.5 ms at 10,000 licenses and
8 experts, is bench/governance.py's `--check`; see docs/benchmarks.md).

A cold decision (memo cleared) must never call Casbin's `enforce` (which walks every rule) and
must look up at most one timeline per (caller subject, expert), each a bisection over that
timeline's own boundaries; so its work is bounded by the caller, not by the policy's size.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from governance import decisions, policy
from governance.decisions import CompiledPolicy

BENCH = Path(__file__).resolve().parents[3] / "bench" / "governance.py"


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("flexgate_bench_governance", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _work_per_decision(n: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int]:
    """(most timeline lookups, most bisection steps bound, most rules a lookup could see)."""
    bench = _bench()
    rng = random.Random(4)
    p, g, g2, principals = bench.synthetic_policy(n, rng)
    assert len(p) == n and len(bench.EXPERTS) == 8
    enforcer = policy.enforcer_from_rules(p, g, g2)
    compiled = CompiledPolicy(enforcer, bench.EXPERTS)

    def no_enforce(*args: Any, **kwargs: Any) -> bool:
        raise AssertionError("a decision called Casbin's enforce")

    monkeypatch.setattr(enforcer, "enforce", no_enforce)
    lookups: list[int] = []
    widest: list[int] = []
    real_at = decisions._Timeline.at

    def counting_at(self: Any, t: str) -> Any:
        lookups.append(1)
        widest.append(len(self.bounds))
        return real_at(self, t)

    monkeypatch.setattr(decisions._Timeline, "at", counting_at)
    most = deepest = 0
    for _ in range(300):
        who, purpose = rng.choice(principals), rng.choice(bench.PURPOSES)
        compiled._memo.clear()
        lookups.clear()
        result = compiled.decide(who, purpose, bench.NOW)
        assert len(result.allowed) + len(result.excluded) == 8
        subjects = len(compiled.subjects(who)) + 1  # and `*`
        assert len(lookups) <= subjects * len(bench.EXPERTS), (who, len(lookups))
        most = max(most, len(lookups))
        deepest = max(deepest, *widest, 0)
        widest.clear()
    monkeypatch.undo()
    return most, deepest, len(p)


def test_cold_decision_work_does_not_grow_with_licenses(monkeypatch: pytest.MonkeyPatch) -> None:
    small_lookups, _, _ = _work_per_decision(1_000, monkeypatch)
    big_lookups, big_bounds, rules = _work_per_decision(10_000, monkeypatch)
    assert rules == 10_000
    # the same callers' structure (up to two groups each): the same number of lookups
    assert big_lookups <= small_lookups + 8, (small_lookups, big_lookups)
    # a timeline holds the boundaries of one (subject, expert, purpose), never the policy's
    assert big_bounds <= 64, big_bounds
    assert big_bounds < rules // 100
