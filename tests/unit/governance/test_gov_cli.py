"""`flexgate principals | keys | experts | licenses`, run through the real entry point."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from audit.db import make_engine, make_sessionmaker
from audit.models import LedgerRecord
from contracts.settings import settings
from gateway.cli import cli
from governance.store import PolicyStore

KEY_LINE = re.compile(r"fg_[0-9a-f]{16}_[A-Za-z0-9_-]{43}\n")


@pytest.fixture
def run(db_url: str, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", db_url)
    monkeypatch.setenv("FLEXGATE_MODEL", str(model_dir))
    settings.cache_clear()
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> Result:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        return result

    return invoke


def _ledger_and_decision(url: str) -> tuple[list[LedgerRecord], Any]:
    async def main() -> tuple[list[LedgerRecord], Any]:
        engine = make_engine(url)
        try:
            async with make_sessionmaker(engine)() as s:
                records = list((await s.execute(select(LedgerRecord))).scalars())
                snap = await PolicyStore().snapshot(s)
                return records, snap.allowed_experts("app-1", "research")
        finally:
            await engine.dispose()

    return asyncio.run(main())


def test_operator_workflow(run: Any, db_url: str) -> None:
    run("principals", "add", "olga", "--role", "data_owner")
    run("principals", "add", "app-1", "--role", "application", "--group", "research")
    listed = json.loads(run("principals", "list", "--json").stdout)
    assert [(p["id"], p["roles"], p["groups"]) for p in listed] == [
        ("app-1", "application", "research"),
        ("olga", "data_owner", "-"),
    ]

    created = run("keys", "create", "app-1", "--expires-in", "30")
    assert KEY_LINE.fullmatch(created.stdout)  # the key alone on stdout
    key_id = created.stdout.split("_")[1]
    assert key_id in created.stderr and "not shown again" in created.stderr
    keys_out = run("keys", "list", "app-1").stdout
    assert key_id in keys_out and "active" in keys_out
    assert created.stdout.strip() not in keys_out

    experts_out = run("experts", "list")  # registers the model on first use
    assert "registered expert public" in experts_out.stderr
    assert "'nobody-yet' is not a principal" in experts_out.stderr
    rows = {r["id"]: r for r in json.loads(run("experts", "list", "--json").stdout)}
    assert list(rows) == ["public", "code", "news", "math"]
    assert rows["code"]["owner"] == "olga" and rows["news"]["owner"] == "(oscar?)"

    lic = run(
        "licenses", "grant", "code", "group:research", "--purpose", "research",
        "--expires-at", "2099-01-01",
    ).stdout.strip()  # fmt: skip
    assert lic.startswith("lic_")
    dup = run(
        "licenses", "grant", "code", "group:research", "--purpose", "research",
        "--expires-at", "2099-01-01T00:00:00Z", code=4,
    )  # fmt: skip
    assert "already grants" in dup.stderr
    assert (
        "invalid purpose"
        in run("licenses", "grant", "code", "app-1", "--purpose", "Bad!", code=2).stderr
    )
    assert (
        "ISO 8601"
        in run("licenses", "grant", "code", "app-1", "--valid-from", "soon", code=2).stderr
    )
    assert "not after valid_from" in run(
        "licenses", "grant", "code", "app-1", "--valid-from", "2099-02-01",
        "--expires-at", "2099-01-01", code=2,
    ).stderr  # fmt: skip
    assert "unknown expert" in run("licenses", "grant", "nope", "app-1", code=4).stderr

    _, decision = _ledger_and_decision(db_url)
    assert decision.allowed == ("public", "code")

    den = run("licenses", "deny", "code", "app-1").stdout.strip()
    listing = json.loads(run("licenses", "list", "code", "--json").stdout)
    assert {(r["id"], r["kind"], r["status"]) for r in listing} == {
        (lic, "license", "active"),
        (den, "deny", "active"),
    }
    _, decision = _ledger_and_decision(db_url)
    assert decision.excluded["code"] == "denied"
    run("licenses", "lift-deny", den)
    run("licenses", "revoke", lic)
    assert "already revoked" in run("licenses", "revoke", lic, code=4).stderr
    assert "unknown license" in run("licenses", "revoke", "lic_nope", code=4).stderr

    run("experts", "assign-owner", "math", "olga")
    assert "data_owner" in run("experts", "assign-owner", "news", "app-1", code=2).stderr
    run("experts", "withdraw", "code")
    assert "already withdrawn" in run("experts", "withdraw", "code", code=4).stderr
    run("experts", "reinstate", "code")
    run("keys", "revoke", key_id)
    assert "revoked" in run("keys", "list").stdout
    assert "up to date" in run("experts", "sync").stdout

    records, decision = _ledger_and_decision(db_url)
    assert decision.excluded["code"] == "no-license"
    kinds = [r.kind for r in records]
    for kind in [
        "principal.created",
        "key.created",
        "expert.registered",
        "license.granted",
        "license.denied",
        "license.deny_lifted",
        "license.revoked",
        "expert.owner_assigned",
        "expert.withdrawn",
        "expert.reinstated",
        "key.revoked",
    ]:
        assert kind in kinds, kind
    assert {r.principal for r in records} == {"operator:cli"}


def test_out_of_date_schema_is_refused(empty_db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", empty_db_url)
    settings.cache_clear()
    result = CliRunner().invoke(cli, ["principals", "list"])
    assert result.exit_code == 3 and "flexgate db upgrade" in result.stderr
