"""`flexgate model eval` and `flexgate model router-tune` through the real entry point.

In this process (click's runner on `gateway.cli.cli`): each command would otherwise pay a
fresh interpreter's import of torch and transformers, several times per test. The exit code,
stdout and stderr are the process's; an exception escaping a command fails the test, as its
traceback would. The real process is tested in test_cli_wiring and test_pretrain.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from click.testing import CliRunner

from gateway.cli import cli
from kit.merge import merge


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = CliRunner().invoke(cli, list(args), prog_name="flexgate", catch_exceptions=False)
    return subprocess.CompletedProcess(
        ["flexgate", *args], result.exit_code, result.stdout, result.stderr
    )


def test_eval_json_and_table(
    tmp_path: Path, public_dir: Path, code_expert: Path, code_data: Path, public_data: Path
) -> None:
    model = merge(public_dir, [code_expert], tmp_path / "m")
    base = [
        "model",
        "eval",
        "--model",
        str(model),
        "--data",
        f"code={code_data}",
        "--data",
        f"public={public_data}",
    ]
    r = _cli(*base, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["allowed"] == ["public", "code"]
    assert set(out["perplexity"]) == {"code", "public"}
    assert all(v > 1.0 for v in out["perplexity"].values())
    r2 = _cli(*base, "--exclude", "code", "--json")
    without = json.loads(r2.stdout)
    assert without["allowed"] == ["public"]
    assert without["perplexity"]["code"] != out["perplexity"]["code"]
    r3 = _cli(*base, "--only", "public")
    assert r3.returncode == 0 and "allowed: public" in r3.stdout and "code" in r3.stdout
    r4 = _cli(*base, "--exclude", "nope")
    assert r4.returncode == 2 and "unknown expert id" in r4.stderr
    assert "Traceback" not in r4.stderr
    r5 = _cli("model", "eval", "--model", str(model), "--data", "no-equals-sign")
    assert r5.returncode == 2 and "expected NAME=PATH" in r5.stderr


def test_router_tune_trains_only_the_router(
    tmp_path: Path, public_dir: Path, code_expert: Path, code_data: Path, public_data: Path
) -> None:
    from safetensors.torch import load_file

    model = merge(public_dir, [code_expert], tmp_path / "m")
    out = tmp_path / "tuned"
    r = _cli(
        "model",
        "router-tune",
        "--model",
        str(model),
        "--data",
        f"code={code_data}",
        "--data",
        f"public={public_data}",
        "--out",
        str(out),
        "--steps",
        "3",
    )
    assert r.returncode == 0, r.stderr
    a = load_file(str(model / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        same = bool((a[k] == b[k]).all())
        assert same != (".mlp.gate." in k), k
    r = _cli(
        "model",
        "router-tune",
        "--model",
        str(model),
        "--data",
        f"math={code_data}",
        "--out",
        str(tmp_path / "t2"),
    )
    assert r.returncode == 2 and "unknown expert id" in r.stderr
