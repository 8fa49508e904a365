"""`flexgate audit …` through the real entry point: exit codes, output, errors."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import fill, tamper
from click.testing import CliRunner, Result

from audit.db import make_engine
from audit.signing import Signer
from gateway.cli import cli


@pytest.fixture
def run(db_url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", db_url)
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> Result:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        return result

    return invoke


def _seed(db_url: str, n: int = 30, **kw: Any) -> None:
    async def main() -> None:
        engine = make_engine(db_url)
        try:
            await fill(engine, n, signer=Signer.load_or_create(), **kw)
        finally:
            await engine.dispose()

    asyncio.run(main())


def _tamper(db_url: str, *sql: str) -> None:
    async def main() -> None:
        engine = make_engine(db_url)
        try:
            await tamper(engine, *sql)
        finally:
            await engine.dispose()

    asyncio.run(main())


def test_verify_exit_codes(run: Any, db_url: str) -> None:
    _seed(db_url, checkpoint_at=(10,))
    report = json.loads(run("audit", "verify").stdout)
    assert report["ok"] and report["records"] == 31
    assert json.loads(run("audit", "verify", "--from-seq", "12").stdout)["records"] == 20
    assert json.loads(run("audit", "verify", "--workers", "1").stdout)["ok"]
    assert "--workers" in run("audit", "verify", "--workers", "0", code=2).output
    _tamper(db_url, "DELETE FROM ledger_records WHERE seq = 4")
    bad = json.loads(run("audit", "verify", code=1).stdout)
    assert (bad["ok"], bad["first_bad_seq"]) == (False, 4)


def test_query_usage_and_errors(run: Any, db_url: str) -> None:
    _seed(db_url)
    lines = run("audit", "query", "--kind", "license.granted").stdout.splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [7, 14, 21, 28]
    page = run("audit", "query", "--limit", "2", "--expert", "code")
    assert len(page.stdout.splitlines()) == 2 and "more: --after" in page.stderr
    usage = [json.loads(x) for x in run("audit", "usage", "--by", "expert").stdout.splitlines()]
    assert {u["key"] for u in usage} == {"code", "public"}
    for args in (["--limit", "5000"], ["--after", "x"], ["--since", "someday"]):
        result = run("audit", "query", *args, code=2)
        assert "invalid" in result.output


def test_export_checkpoint_and_verify_export(run: Any, db_url: str, tmp_path: Path) -> None:
    _seed(db_url)
    cp = json.loads(run("audit", "checkpoint").stdout)["checkpoint"]
    assert cp["size"] == 30 and set(cp) == {"size", "root", "at", "signature", "key_id"}
    for fmt in ("jsonl", "csv"):
        out = tmp_path / f"ledger.{fmt}"
        run("audit", "export", "--format", fmt, "--output", str(out))
        assert json.loads(run("audit", "verify-export", str(out)).stdout)["merkle_checked"]
        text = out.read_text()
        out.write_text(
            text.replace('"model":"demo"', '"model":"xxxx"', 1).replace(
                '""model"":""demo""', '""model"":""xxxx""', 1
            )
        )
        assert not json.loads(run("audit", "verify-export", str(out), code=1).stdout)["ok"]
    empty = tmp_path / "empty.jsonl"
    run("audit", "export", "--format", "jsonl", "--since", "2999-01-01", "-o", str(empty))
    assert empty.read_bytes() == b""
    proof = json.loads(run("audit", "proof", "3").stdout)
    assert proof["seq"] == 3 and proof["tree_size"] >= 30


def test_unanchored_export_needs_a_flag(run: Any, db_url: str, tmp_path: Path) -> None:
    _seed(db_url, 5)
    out = tmp_path / "plain.jsonl"
    run("audit", "export", "--format", "jsonl", "--no-checkpoint", "-o", str(out))
    assert "not anchored" in run("audit", "verify-export", str(out), code=1).stdout
    run("audit", "verify-export", str(out), "--allow-unanchored")


def test_unreachable_database(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:1/x")
    result = CliRunner().invoke(cli, ["audit", "verify"])
    assert result.exit_code == 3 and "unreachable" in result.output


def test_out_of_date_schema(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", f"sqlite+aiosqlite:///{home}/new.db")
    result = CliRunner().invoke(cli, ["audit", "query"])
    assert result.exit_code == 3 and "flexgate db upgrade" in result.output
