"""`flexgate model|expert|demo`: sub-commands from the engine, the kit and governance."""

from __future__ import annotations

import subprocess
import sys

from gateway.cli import GROUPS


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_groups_list_their_sub_commands() -> None:
    top = _cli("--help")
    assert top.returncode == 0
    for group in ("model", "expert", "demo"):
        assert group in top.stdout
    model = _cli("model", "--help")
    for sub in ("inspect", "pretrain", "merge", "router-tune", "eval"):
        assert sub in model.stdout
    assert set(GROUPS["expert"]) == {"embed", "train"}
    assert set(GROUPS["demo"]) == {"build", "principals"}


def test_model_inspect_is_still_the_engines(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from engine.checkpoints import build_tiny_checkpoint

    d = build_tiny_checkpoint(tmp_path / "tiny", ("public", "code"))
    r = _cli("model", "inspect", str(d), "--json")
    assert r.returncode == 0, r.stderr
    assert '"code"' in r.stdout and '"public"' in r.stdout


def test_kit_is_not_imported_by_the_entry_point() -> None:
    code = "import gateway.cli, sys; gateway.cli.cli(['keys', '--help'], standalone_mode=False); "
    code += "print('kit' in sys.modules, 'torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().splitlines()[-1] == "False False", r.stdout + r.stderr
