"""bench/reproduce.py end to end on tiny data (``--mode tiny``: a micro model, a few steps):
a well-formed table and JSON with every method row, resumption after an interruption that
skips the finished stages, the same JSON from an uninterrupted run with the same seed, and a
run with other settings refused. The numbers themselves are the full run's business
(docs/reproduction.md)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bench.repro.plan import DOMAINS
from bench.reproduce import main

pytestmark = pytest.mark.slow

ROW_KEYS = (
    ["public"]
    + [f"moe2:{d}" for d in DOMAINS]
    + [f"dense:{d}" for d in DOMAINS]
    + ["soup", "btm", "flexolmo", "flexolmo-dropbias", "flexolmo-normtopk"]
    + ["flexolmo-tuned"]
    + ["ablation:random-router", "ablation:no-bias", "ablation:no-frozen-public", "joint"]
    + [f"{b}-minus:{d}" for b in ("flexolmo", "flexolmo-tuned") for d in DOMAINS]
)


def _finite(x: Any) -> bool:
    return isinstance(x, float) and math.isfinite(x)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_tiny_run_resumes_and_is_deterministic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "a"
    assert main(["--mode", "tiny", "--out", str(work), "--stop-after", "experts"]) == 0
    err = capsys.readouterr().err
    assert "stopped after stage experts" in err
    assert (work / "experts" / "coordinated" / DOMAINS[-1] / "manifest.json").is_file()
    assert not (work / "experts" / "dense").exists() and not (work / "results").exists()
    public = work / "models" / "public" / "model.safetensors"
    before = public.stat().st_mtime_ns

    assert main(["--mode", "tiny", "--out", str(work)]) == 0
    err = capsys.readouterr().err
    assert "skip pretrain the public model" in err and "skip coordinated expert 1/5" in err
    assert "  dense expert 1/5" in err and "stage 13/13: report" in err
    assert public.stat().st_mtime_ns == before

    result = json.loads((work / "results" / "results.json").read_text())
    assert set(result) >= {
        "mode",
        "seed",
        "plan",
        "domains",
        "tokens",
        "methods",
        "claims",
        "extraction",
        "run",
    }
    assert result["mode"] == "tiny" and result["domains"] == list(DOMAINS)
    rows = {r["key"]: r for r in result["methods"]}
    assert list(rows) == ROW_KEYS
    for r in rows.values():
        assert set(r["perplexity"]) == {"public", *DOMAINS}
        assert all(_finite(v) and v > 0 for v in r["perplexity"].values())
        assert _finite(r["average"]) and _finite(r["relative_to_public"])
    assert rows["public"]["relative_to_public"] == 0.0
    budget = result["tokens"]["budget_per_expert"]
    assert budget == 2 * 4 * 32
    assert {t for v in result["tokens"]["per_expert"].values() for t in v.values()} == {budget}
    assert result["tokens"]["joint_moe"] == budget * len(DOMAINS)
    for base in ("flexolmo", "flexolmo-tuned"):
        c = result["claims"][base]
        assert _finite(c["relative_to_public"]) and set(c["opt_out"]) == set(DOMAINS)
        assert set(c["relative_to_prior_merging"]) == {"soup", "btm"}
    for model in ("flexolmo", "flexolmo-tuned"):
        shares = result["routing"][model]
        assert set(shares) == {"public", *DOMAINS}
        for v in shares.values():
            assert set(v["weight"]) == {"public", *DOMAINS}
            assert sum(v["weight"].values()) == pytest.approx(1.0)
            assert sum(v["selections"].values()) == pytest.approx(1.0)
    assert "### Routing (flexolmo)" in (work / "results" / "tables.md").read_text()
    ex = result["extraction"]
    assert ex["domain"] == "legal" and ex["documents"] == 2 and len(ex["models"]) == 4
    for v in ex["models"].values():
        assert all(0.0 <= v[m] <= 1.0 for m in ("greedy", "sampled"))
    run = result["run"]
    assert run["stage_cpu_s"] > 0 and len(run["sessions"]) == 2

    tables = (work / "results" / "tables.md").read_text()
    for r in rows.values():
        assert f"| {r['label']} |" in tables
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert bool(result["figures"]) == has_mpl
    for name in result["figures"]:
        assert (work / "results" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # an uninterrupted run with the same seed: the same JSON (timings and paths aside)
    other = tmp_path / "b"
    assert main(["--mode", "tiny", "--out", str(other)]) == 0
    again = json.loads((other / "results" / "results.json").read_text())
    result.pop("run"), again.pop("run")
    assert again == result

    # another seed in the same folder is refused, and nothing there changes
    capsys.readouterr()
    assert main(["--mode", "tiny", "--out", str(work), "--seed", "1"]) == 4
    assert "other settings" in capsys.readouterr().err
    assert public.stat().st_mtime_ns == before
