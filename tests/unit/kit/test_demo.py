"""A miniature demo end to end (`flexgate demo build --quick`), then its principals."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine import load_engine


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
    )


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    r = _cli({"FLEXGATE_HOME": str(home)}, "demo", "build", "--quick")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out perplexity" in r.stderr and "5/5 evaluate" in r.stderr
    return home


def test_quick_demo_builds_a_servable_model(demo_home: Path) -> None:
    model = demo_home / "demo-model"
    experts = json.loads((model / "experts.json").read_text())["experts"]
    assert [e["id"] for e in experts] == ["public", "code", "legal", "literature", "biomedical"]
    assert {e["id"]: e["owner"] for e in experts[1:]} == {
        "code": "alice",
        "legal": "alice",
        "literature": "bob",
        "biomedical": "bob",
    }
    eng = load_engine(model)
    assert eng.config.num_experts == 5 and eng.config.num_experts_per_tok == 2
    report = json.loads((demo_home / "demo-build" / "report.json").read_text())
    assert set(report["perplexity"]["all"]) == {
        "public",
        "code",
        "legal",
        "literature",
        "biomedical",
    }
    assert set(report["gains"]) == {"code", "legal", "literature", "biomedical"}
    for name in ("public", "code"):
        assert (demo_home / "demo-data" / name / "valid.txt").stat().st_size > 0
    eng.close()


def test_demo_build_is_idempotent(demo_home: Path) -> None:
    before = (demo_home / "demo-model" / "model.safetensors").stat().st_mtime_ns
    r = _cli({"FLEXGATE_HOME": str(demo_home)}, "demo", "build", "--quick")
    assert r.returncode == 0 and "exists; nothing to do" in r.stderr
    assert (demo_home / "demo-model" / "model.safetensors").stat().st_mtime_ns == before


def test_demo_principals_created_once(demo_home: Path, db_url: str, tmp_path: Path) -> None:
    env = {
        "FLEXGATE_HOME": str(tmp_path),
        "FLEXGATE_MODEL": str(demo_home / "demo-model"),
        "FLEXGATE_DATABASE_URL": db_url,
    }
    r = _cli(env, "demo", "principals")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "created the demo principals" in r.stderr
    keys_file = tmp_path / "demo-keys.json"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    data = json.loads(keys_file.read_text())
    assert set(data["keys"]) == {"demo-app", "alice", "bob", "officer", "admin"}
    assert set(data["licenses"]) == {"code", "legal", "literature", "biomedical"}
    assert data["owners"]["code"] == "alice" and data["owners"]["biomedical"] == "bob"
    assert data["keys"]["demo-app"] in r.stdout and "curl" in r.stdout
    assert f"/v1/experts/code/licenses/{data['licenses']['code']}" in r.stdout
    again = _cli(env, "demo", "principals")
    assert again.returncode == 0 and "reusing" in again.stderr
    assert json.loads(keys_file.read_text()) == data
    listed = _cli(env, "principals", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert {p["id"] for p in json.loads(listed.stdout)} >= set(data["keys"])
