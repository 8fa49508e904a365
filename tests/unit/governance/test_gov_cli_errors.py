"""Exit codes and bad input of `flexgate principals | keys | experts | licenses` (docs/cli.md):
each bad input is one clear line with its code (2 bad input, 3 database or model unusable,
4 not found or conflict), never a traceback, and leaves the database as it was."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from gov_helpers import state

from audit.db import make_engine, make_sessionmaker
from contracts.exit_codes import ExitCode
from contracts.settings import settings
from gateway.cli import cli

USAGE, UNAVAILABLE, REFUSED = ExitCode.USAGE, ExitCode.UNAVAILABLE, ExitCode.REFUSED


def invoke(*args: str) -> Result:
    settings.cache_clear()  # the environment changed since the last command of this process
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _state(url: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        engine = make_engine(url)
        try:
            return await state(make_sessionmaker(engine))
        finally:
            await engine.dispose()

    return asyncio.run(main())


@pytest.fixture
def seeded(db_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", db_url)
    monkeypatch.setenv("FLEXGATE_MODEL", str(model_dir))
    for args in (
        ("principals", "add", "olga", "--role", "data_owner"),
        ("principals", "add", "app-1", "--role", "application"),
        ("experts", "list"),
        ("licenses", "deny", "code", "app-1"),
    ):
        assert invoke(*args).exit_code == 0, args
    return db_url


MANY_PURPOSES = [arg for n in range(8) for arg in ("--purpose", f"purpose-{n}-" + "x" * 40)]

BAD_INPUT: list[tuple[list[str], ExitCode, str]] = [
    # times far in the future, far in the past, and past the ends of UTC
    (["licenses", "grant", "code", "app-1", "--expires-at", "99999-01-01"], USAGE, "ISO 8601"),
    (["licenses", "grant", "code", "app-1", "--expires-at", "0001-01-01"], USAGE, "already past"),
    (["licenses", "grant", "code", "app-1", "--valid-from", "0001-01-01T00:00+01:00"], USAGE,
     "outside years 1 to 9999"),
    (["licenses", "grant", "code", "app-1", "--expires-at", "9999-12-31T23:59-01:00"], USAGE,
     "outside years 1 to 9999"),
    (["licenses", "grant", "code", "app-1", "--valid-from", "2099-02-01",
      "--expires-at", "2099-01-01"], USAGE, "not after valid_from"),
    # huge and non-positive integers
    (["keys", "create", "app-1", "--expires-in", str(10**30)], USAGE, "--expires-in"),
    (["keys", "create", "app-1", "--expires-in", "0"], USAGE, "--expires-in"),
    (["keys", "create", "app-1", "--expires-in", "ten"], USAGE, "--expires-in"),
    # ids, roles, grantees, purposes, free text
    (["principals", "add", "group:x", "--role", "application"], USAGE, "invalid principal id"),
    (["principals", "add", "x" * 129, "--role", "application"], USAGE, "invalid principal id"),
    (["principals", "add", "app-9", "--role", "wizard"], USAGE, "unknown role"),
    (["principals", "add", "app-9", "--role", "application", "--group", "a|b"], USAGE,
     "invalid group"),
    (["principals", "add", "app-9", "--role", "application", "--name", "a\x00b"], USAGE,
     "U+0000"),
    (["principals", "add", "app-9", "--role", "application", "--name", "n" * 300], USAGE,
     "at most 255"),
    (["licenses", "grant", "code", "app-1", "--note", "lone \udc80 surrogate"], USAGE, "U+DC80"),
    (["licenses", "grant", "code", "app-1", *MANY_PURPOSES], USAGE, "grant fewer"),
    (["licenses", "grant", "code", "app-1", "--purpose", "Bad!"], USAGE, "invalid purpose"),
    (["licenses", "grant", "co:de", "app-1"], USAGE, "invalid expert id"),
    (["licenses", "grant", "code", "group:"], USAGE, "invalid group"),
    (["licenses", "grant", "code", "role:wizard"], USAGE, "unknown role"),
    (["experts", "assign-owner", "code", "app-1"], USAGE, "lacks the data_owner role"),
    (["experts", "withdraw", "a:b"], USAGE, "invalid expert id"),
    (["experts", "assign-owner", "code", "*"], USAGE, "invalid principal id"),
    (["keys", "create", "group:x"], USAGE, "invalid principal id"),
    (["keys", "list", "a b"], USAGE, "invalid principal id"),
    (["licenses", "list", "x" * 200], USAGE, "invalid expert id"),
    # not found, already there, in conflict with the state
    (["licenses", "grant", "nope", "app-1"], REFUSED, "unknown expert"),
    (["licenses", "grant", "code", "app-404"], REFUSED, "unknown principal"),
    (["licenses", "revoke", "lic_nope"], REFUSED, "unknown license"),
    (["licenses", "lift-deny", "den_nope"], REFUSED, "unknown"),
    (["licenses", "deny", "code", "app-1"], REFUSED, "already"),
    (["keys", "revoke", "0123456789abcdef"], REFUSED, "unknown key"),
    (["keys", "create", "app-404"], REFUSED, "unknown principal"),
    (["principals", "add", "olga", "--role", "data_owner"], REFUSED, "already exists"),
    (["experts", "withdraw", "nope"], REFUSED, "unknown expert"),
    (["experts", "reinstate", "code"], REFUSED, "not withdrawn"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "code", "message"), BAD_INPUT, ids=lambda v: str(v)[:40])
def test_bad_input_is_one_line_with_its_code_and_writes_nothing(
    seeded: str, args: list[str], code: ExitCode, message: str
) -> None:
    before = _state(seeded)
    result = invoke(*args)
    assert result.exit_code == code, (args, result.output)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert _state(seeded) == before


def _sqlite(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


@pytest.mark.parametrize("command", [["principals", "list"], ["keys", "create", "app-1"],
                                     ["licenses", "grant", "code", "app-1"]])  # fmt: skip
@pytest.mark.parametrize(
    ("make_url", "code", "message"),
    [
        (lambda tmp: "postgresql+asyncpg://postgres@127.0.0.1:1/none", UNAVAILABLE, "unreachable"),
        (lambda tmp: _sqlite(tmp / "garbage.db"), UNAVAILABLE, "not a database"),
        (lambda tmp: _sqlite(tmp / "garbage.db" / "under-a-file.db"), UNAVAILABLE, "folder"),
        (lambda tmp: _sqlite(tmp / "empty.db"), UNAVAILABLE, "flexgate db upgrade"),
        (lambda tmp: "not-a-url", USAGE, "FLEXGATE_DATABASE_URL"),
    ],
    ids=["pg-down", "sqlite-garbage", "sqlite-unreachable-path", "schema-missing", "bad-url"],
)
def test_database_down_is_3_on_every_backend(
    tmp_path: Path,
    model_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
    make_url: Any,
    code: ExitCode,
    message: str,
) -> None:
    (tmp_path / "garbage.db").write_text("this is not a database\n")
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", make_url(tmp_path))
    monkeypatch.setenv("FLEXGATE_MODEL", str(model_dir))
    result = invoke(*command)
    assert result.exit_code == code, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert result.stdout == ""


def test_unusable_served_model_is_3(
    seeded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "experts.json").write_text(json.dumps({"experts": [{"id": "a:b"}]}))
    monkeypatch.setenv("FLEXGATE_MODEL", str(broken))
    before = _state(seeded)
    result = invoke("experts", "sync")
    assert result.exit_code == UNAVAILABLE and "invalid id 'a:b'" in result.stderr
    assert _state(seeded) == before


def test_bad_setting_is_2(seeded: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXGATE_AUDIT_CHECKPOINT_EVERY", "10**30x")
    result = invoke("principals", "list")
    assert result.exit_code == USAGE and "FLEXGATE_AUDIT_CHECKPOINT_EVERY" in result.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["keys", "create", "app-1", "--expires-in", str(10**30)], USAGE),
        (["licenses", "grant", "code", "app-1", "--expires-at", "0001-01-01T00:00+01:00"], USAGE),
        (["principals", "list"], UNAVAILABLE),
    ],
)
def test_exit_codes_of_the_real_process(
    tmp_path: Path, model_dir: Path, args: list[str], code: ExitCode
) -> None:
    """The same codes from `python -m gateway.cli` (no database at all: the port is closed)."""
    import os
    import subprocess
    import sys

    env = {
        **os.environ,
        "FLEXGATE_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/none",
        "FLEXGATE_MODEL": str(model_dir),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.count("\n") <= 4 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("Error: ")
    assert proc.stdout == ""
