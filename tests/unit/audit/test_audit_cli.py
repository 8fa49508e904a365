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
    refused = run(
        "audit", "export", "--format", "jsonl", "--since", "2999-01-01", "-o", str(empty), code=4
    )
    assert "nothing exported" in refused.output and not empty.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    proof = json.loads(run("audit", "proof", "3").stdout)
    assert proof["seq"] == 3 and proof["tree_size"] >= 30


def test_unanchored_export_does_not_verify(run: Any, db_url: str, tmp_path: Path) -> None:
    _seed(db_url, 5)
    out = tmp_path / "plain.jsonl"
    run("audit", "export", "--format", "jsonl", "--no-checkpoint", "-o", str(out))
    assert (
        "not covered by a signed checkpoint"
        in run("audit", "verify-export", str(out), code=1).stdout
    )


def test_bad_input_is_refused_before_anything_is_signed(
    run: Any, db_url: str, home: Path, tmp_path: Path
) -> None:
    """Far-future and far-past dates, huge integers, a non-key file as a key, an unwritable
    output: a clear error, the right code, no traceback, and no checkpoint signed first."""
    _seed(db_url, 5)
    anchor = home / "audit-anchor.jsonl"
    before = anchor.read_text()
    notkey = tmp_path / "notkey.pem"
    notkey.write_text("not a key")
    cases = [
        (("audit", "export", "--format", "jsonl", "--since", "10000-01-01"), 2, "since"),
        (
            ("audit", "export", "--format", "jsonl", "--since", "0001-01-01T00:00:00+01:00"),
            2,
            "since",
        ),
        (
            (
                "audit",
                "export",
                "--format",
                "jsonl",
                "--since",
                "2026-01-02",
                "--until",
                "2026-01-01",
            ),
            2,
            "earlier",
        ),
        (
            ("audit", "export", "--format", "jsonl", "-o", str(tmp_path / "no" / "dir" / "x")),
            2,
            "cannot write",
        ),
        (("audit", "query", "--after", "99999999999999999999999"), 2, "after"),
        (("audit", "query", "--since", "0001-01-01"), 2, "since"),
        (("audit", "usage", "--until", "9999-12-31T23:59:59-14:00"), 2, "until"),
        (("audit", "verify", "--from-seq", "99999999999999999999999"), 2, "from-seq"),
        (("audit", "proof", "99999999999999999999999"), 2, "SEQ"),
        (("audit", "verify", "--public-key", str(notkey)), 2, "not a PEM public key"),
        (("audit", "verify", "--checkpoint", str(notkey)), 2, "not JSON"),
        (("audit", "verify-export", str(tmp_path / "missing.jsonl")), 2, "cannot read"),
    ]
    for args, code, words in cases:
        result = run(*args, code=code)
        assert words in result.output, (args, result.output)
        assert "Traceback" not in result.output
    assert anchor.read_text() == before  # nothing was signed
    assert json.loads(run("audit", "verify").stdout)["checkpoints"] == 0


def test_db_commands(run: Any, db_url: str) -> None:
    assert "up to date" in run("db", "current").stdout
    _seed(db_url, 5)
    from audit.db import head_revision

    head = head_revision()
    assert head is not None and f"current: {head}" in run("db", "current").stdout
    run("db", "downgrade", "0100_governance")  # the ledger's own tables stay (0001)
    run("db", "upgrade")
    assert json.loads(run("audit", "verify").stdout)["ok"]
    assert (
        "--i-understand-this-destroys-the-ledger" in run("db", "downgrade", "base", code=4).output
    )


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+asyncpg://postgres@127.0.0.1:1/x",
        "sqlite+aiosqlite:////proc/no/such/flexgate.db",
    ],
)
@pytest.mark.parametrize(
    "args",
    [
        ("audit", "verify"),
        ("audit", "query"),
        ("audit", "checkpoint"),
        ("db", "current"),
        ("db", "upgrade"),
    ],
)
def test_unreachable_database(
    home: Path, monkeypatch: pytest.MonkeyPatch, url: str, args: tuple[str, ...]
) -> None:
    """PostgreSQL not listening, and a SQLite file that cannot be opened: exit 3."""
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", url)
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 3, result.output
    assert "unreachable" in result.output or "cannot" in result.output
    assert "Traceback" not in result.output


def test_out_of_date_schema(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", f"sqlite+aiosqlite:///{home}/new.db")
    result = CliRunner().invoke(cli, ["audit", "query"])
    assert result.exit_code == 3 and "flexgate db upgrade" in result.output
