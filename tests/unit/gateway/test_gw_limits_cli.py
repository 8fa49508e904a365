"""`flexgate keys create --rpm/--tpm/--max-parallel` and `flexgate keys limits`."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from click.testing import CliRunner, Result

from gateway.cli import cli

KEY_LINE = re.compile(r"fg_([0-9a-f]{16})_[A-Za-z0-9_-]{43}\n")


@pytest.fixture
def run(db_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", db_url)
    monkeypatch.setenv("FLEXGATE_HOME", str(tmp_path))
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> Result:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        return result

    return invoke


def test_keys_create_with_limits_and_keys_limits(run: Any) -> None:
    run("principals", "add", "app-1", "--role", "application")
    created = run("keys", "create", "app-1", "--rpm", "60", "--max-parallel", "2")
    m = KEY_LINE.fullmatch(created.stdout)
    assert m, created.stdout  # the key alone on stdout, limits on stderr
    key_id = m.group(1)
    assert "rpm 60" in created.stderr and "tpm default" in created.stderr
    shown = json.loads(run("keys", "limits", key_id, "--json").stdout)
    assert shown == {"key_id": key_id, "rpm": 60, "tpm": None, "max_parallel": 2}
    run("keys", "limits", key_id, "--tpm", "5000")
    shown = json.loads(run("keys", "limits", key_id, "--json").stdout)
    assert shown == {"key_id": key_id, "rpm": 60, "tpm": 5000, "max_parallel": 2}
    run("keys", "limits", key_id, "--reset", "--rpm", "7")
    shown = json.loads(run("keys", "limits", key_id, "--json").stdout)
    assert shown == {"key_id": key_id, "rpm": 7, "tpm": None, "max_parallel": None}
    # bad input: a clear error, nothing changed
    bad = run("keys", "limits", key_id, "--rpm", "0", code=2)
    assert "--rpm" in bad.output and "Traceback" not in bad.output
    missing = run("keys", "limits", "0" * 16, "--rpm", "5", code=4)  # not found: refused
    assert "unknown key" in missing.output
    assert json.loads(run("keys", "limits", key_id, "--json").stdout)["rpm"] == 7
    refused = run("keys", "create", "app-1", "--tpm", "-3", code=2)
    assert refused.stdout == "" or not KEY_LINE.search(refused.stdout)
