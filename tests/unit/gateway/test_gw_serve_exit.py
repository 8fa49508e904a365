"""`flexgate serve` refuses to start with the exit codes of docs/cli.md, and no traceback:
a bad setting is bad input (2), a database it cannot use is unavailable (3)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "FLEXGATE_HOME": str(tmp_path / "home"), **env}
    full.pop("FLEXGATE_TEST_DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", "0", "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=120,
        env=full,
    )


def test_bad_setting_is_2(tmp_path: Path) -> None:
    r = _serve(tmp_path, FLEXGATE_MAX_BODY_BYTES="lots")
    assert r.returncode == 2, r.stderr
    assert "FLEXGATE_MAX_BODY_BYTES" in r.stderr and "Traceback" not in r.stderr


def test_unusable_database_is_3(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_text("this is not a database\n")
    r = _serve(tmp_path, FLEXGATE_DATABASE_URL=f"sqlite+aiosqlite:///{garbage}")
    assert r.returncode == 3, r.stderr


def test_workers_get_the_resolved_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With FLEXGATE_HOME unset the home is ./var; `serve` exports the resolved folder so the
    workers' engines share one kernel-choice file ($FLEXGATE_HOME/engine-kernels.json)
    instead of each measuring its own in memory."""
    import uvicorn
    from click.testing import CliRunner

    from contracts.settings import Settings
    from gateway.cli import cli

    seen: dict[str, str | None] = {}
    monkeypatch.setenv("FLEXGATE_HOME", "restored-absent-or-as-it-was-after-the-test")
    monkeypatch.delenv("FLEXGATE_HOME")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(
        uvicorn, "run", lambda *a, **k: seen.update(home=os.environ.get("FLEXGATE_HOME"))
    )
    result = CliRunner().invoke(cli, ["serve", "--port", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert seen["home"] == str(Settings.from_env().home)
    assert Path(str(seen["home"])).resolve() == (tmp_path / "var").resolve()
