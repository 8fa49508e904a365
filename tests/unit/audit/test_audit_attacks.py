"""Every attack of issue 9, written as an attacker with write access to the database would
do it (plain SQL, triggers disabled on PostgreSQL as a superuser can), on SQLite and
PostgreSQL, and caught through the real `flexgate` entry point with the right exit code and
the first bad seq."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import fill, records, rewrite_ledger, tamper
from click.testing import CliRunner, Result
from sqlalchemy import text

from audit import anchor
from audit.anchor import ANCHOR_FILE, AnchorRefused, Anchors
from audit.canonical import stored_record_hash
from audit.checkpoints import create_checkpoint
from audit.db import make_engine, make_sessionmaker
from audit.ledger import NewRecord, append_many
from audit.signing import PUBLIC_KEY_FILE, Signer
from audit.summary import fold_usage
from audit.verify import verify
from audit.writer import LedgerWriter
from gateway.cli import cli

# fill(40, checkpoint_at=(10, 30)): checkpoints of size 10 (record 11) and 31 (record 32),
# records 33..42 after them; all anchored in FLEXGATE_HOME.
N, MARKS, TOTAL = 40, (10, 30), 42


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def cli_run(db_url: str, home: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("FLEXGATE_DATABASE_URL", db_url)
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> Result:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == code, (args, result.output)
        assert "Traceback" not in result.output
        return result

    return invoke


@pytest.fixture
def seeded(db_url: str, home: Path) -> Signer:
    signer = Signer.load_or_create(home)

    async def main() -> None:
        engine = make_engine(db_url)
        try:
            await fill(engine, N, signer=signer, checkpoint_at=MARKS)
        finally:
            await engine.dispose()

    _run(main())
    anchor.reset_health()
    return signer


def _on(db_url: str, work: Any) -> Any:
    async def main() -> Any:
        engine = make_engine(db_url)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return _run(main())


def _report(result: Result) -> dict[str, Any]:
    return json.loads(result.stdout)


def test_anchor_file_holds_every_checkpoint(seeded: Signer, home: Path, cli_run: Any) -> None:
    lines = (home / ANCHOR_FILE).read_text().splitlines()
    assert [json.loads(x)["size"] for x in lines] == [0, 10, 31]
    assert oct((home / ANCHOR_FILE).stat().st_mode & 0o777) == "0o600"
    assert _report(cli_run("audit", "verify"))["anchored_size"] == 31


def test_delete_checkpoints_rewrite_and_rechain(
    seeded: Signer, db_url: str, home: Path, cli_run: Any
) -> None:
    """Delete the checkpoints, rewrite the license record 7 and rechain everything: the
    database verifies on its own, but not against its anchor, and the writer's next
    checkpoint is refused (the gateway turns not-ready)."""

    async def attack(engine: Any) -> None:
        rows = [r for r in await records(engine) if r["kind"] != "checkpoint"]
        assert rows[6]["kind"] == "license.granted"
        rows[6]["payload"] = rows[6]["payload"].replace('"app-1"', '"app-evil"')
        await rewrite_ledger(engine, rows)

    _on(db_url, attack)
    report = _report(cli_run("audit", "verify", code=1))
    assert report["first_bad_seq"] == 1 and "forked" in report["reason"]

    async def next_checkpoint(engine: Any) -> None:
        async with make_sessionmaker(engine).begin() as s:
            await create_checkpoint(s, seeded)

    with pytest.raises(AnchorRefused, match="does not extend"):
        _on(db_url, next_checkpoint)
    assert not anchor.health().ok and "does not extend" in (anchor.health().detail or "")
    refused = cli_run("audit", "checkpoint", code=1)
    assert "does not extend its anchored checkpoint" in refused.output

    async def writer_checkpoint(engine: Any) -> None:
        async with LedgerWriter(engine, signer=seeded, checkpoint_every=1) as w:
            await w.append(kind="ok", principal="p", payload={})  # appends go on
            with pytest.raises(AnchorRefused):
                await w.checkpoint()

    _on(db_url, writer_checkpoint)
    assert [json.loads(x)["size"] for x in (home / ANCHOR_FILE).read_text().splitlines()] == [
        0,
        10,
        31,
    ]


def test_truncate_the_tail_with_its_checkpoints(seeded: Signer, db_url: str, cli_run: Any) -> None:
    async def attack(engine: Any) -> None:
        await rewrite_ledger(engine, (await records(engine))[:20], drop_checkpoints=False)
        await tamper(engine, "DELETE FROM ledger_checkpoints WHERE size >= 20")

    _on(db_url, attack)
    report = _report(cli_run("audit", "verify", code=1))
    assert report["first_bad_seq"] == 21 and "behind" in report["reason"]


def test_restore_an_older_copy(
    seeded: Signer, db_url: str, tmp_path: Path, cli_run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy of the database taken at 42 records is restored after more were anchored."""
    from tests.conftest import pg_create_database, pg_drop_database

    if db_url.startswith("sqlite"):
        path = db_url.split("///", 1)[1]
        copy = tmp_path / "copy.db"
        shutil.copyfile(path, copy)
        copy_url, drop = f"sqlite+aiosqlite:///{copy}", None
    else:
        name = f"fgt_{uuid.uuid4().hex[:12]}"
        copy_url = pg_create_database(name, template=db_url.rsplit("/", 1)[1])
        drop = name

    async def more(engine: Any) -> None:
        await fill(engine, 20, signer=seeded, checkpoint_at=(20,))

    try:
        _on(db_url, more)
        monkeypatch.setenv("FLEXGATE_DATABASE_URL", copy_url)
        report = _report(cli_run("audit", "verify", code=1))
        assert report["first_bad_seq"] == TOTAL + 1 and "behind" in report["reason"]
    finally:
        if drop:
            pg_drop_database(drop)


def test_losing_every_anchor_while_a_key_exists(seeded: Signer, home: Path, cli_run: Any) -> None:
    (home / ANCHOR_FILE).unlink()
    assert "checkpoints were lost" in _report(cli_run("audit", "verify", code=1))["reason"]
    (home / ANCHOR_FILE).write_text("")  # an empty anchor: the same loss
    assert "lost" in _report(cli_run("audit", "verify", code=1))["reason"]
    # The operator's explicit recovery: check, then anchor the ledger as it is.
    cli_run("audit", "checkpoint", "--reanchor")
    assert _report(cli_run("audit", "verify"))["ok"]


def test_auditor_checkpoint_on_another_machine(
    seeded: Signer, db_url: str, home: Path, tmp_path: Path, cli_run: Any
) -> None:
    kept = tmp_path / "kept.json"
    kept.write_text(cli_run("audit", "checkpoint").stdout)

    async def attack(engine: Any) -> None:
        rows = [r for r in await records(engine) if r["kind"] != "checkpoint"]
        assert rows[19]["kind"] == "inference"
        rows[19]["payload"] = rows[19]["payload"].replace('"demo"', '"fake"')
        filler = [{**rows[-1], "id": str(uuid.uuid4())} for _ in range(5)]
        await rewrite_ledger(engine, [*rows, *filler])  # as many records as before, or more

    _on(db_url, attack)
    pub = tmp_path / "pub.pem"
    pub.write_bytes((home / PUBLIC_KEY_FILE).read_bytes())
    for name in os.listdir(home):  # a machine with the public key and the kept checkpoint only
        if not name.endswith(".db") and not name.startswith("flexgate.db"):
            (home / name).unlink()
    report = _report(
        cli_run("audit", "verify", "--public-key", str(pub), "--checkpoint", str(kept), code=1)
    )
    assert report["first_bad_seq"] == 1 and "forked" in report["reason"]


def _export(cli_run: Any, path: Path, *args: str) -> list[dict[str, Any]]:
    cli_run("audit", "export", "--format", "jsonl", "-o", str(path), *args)
    return [json.loads(x) for x in path.read_text().splitlines()]


def _write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))


def test_forged_records_after_the_checkpoint_in_an_export(
    seeded: Signer, tmp_path: Path, cli_run: Any
) -> None:
    out = tmp_path / "export.jsonl"
    lines = _export(cli_run, out)
    header, body, trailer = lines[0], lines[1:-1], lines[-1]
    cp = header["flexgate_export"]["checkpoint"]
    assert body[-1]["seq"] == cp["size"] + 1 == TOTAL + 1  # stops at its checkpoint record
    last = body[-1]
    forged = {
        "seq": last["seq"] + 1,
        "id": str(uuid.uuid4()),
        "kind": "license.granted",
        "at": last["at"],
        "principal": "owner-1",
        "payload": {"expert": "code", "grantee": "app-evil"},
        "prev_hash": last["hash"],
    }
    forged["hash"] = stored_record_hash(
        last["hash"], forged["seq"], forged["id"], forged["kind"], forged["at"],
        "owner-1", json.dumps(forged["payload"], separators=(",", ":"), sort_keys=True),
    )  # fmt: skip
    end = trailer["flexgate_export_end"]
    end.update(records=end["records"] + 1, last_seq=forged["seq"], last_hash=forged["hash"])
    _write(out, [header, *body, forged, trailer])
    report = _report(cli_run("audit", "verify-export", str(out), code=1))
    assert report["first_bad_seq"] == TOTAL + 2 and "beyond the checkpoint" in report["reason"]


def test_export_re_anchored_to_an_older_checkpoint(
    seeded: Signer, db_url: str, tmp_path: Path, cli_run: Any
) -> None:
    """An old genuine export handed over as the current one: it verifies alone, but not
    against the checkpoint the auditor kept since."""
    old = tmp_path / "old.jsonl"
    _export(cli_run, old)  # covered by the checkpoint of size 42

    async def more(engine: Any) -> None:
        await fill(engine, 10, signer=seeded)

    _on(db_url, more)
    kept = tmp_path / "kept.json"
    kept.write_text(cli_run("audit", "checkpoint").stdout)
    cli_run("audit", "verify-export", str(old))
    report = _report(cli_run("audit", "verify-export", str(old), "--checkpoint", str(kept), code=1))
    assert report["first_bad_seq"] == TOTAL + 1 and "older than the auditor's" in report["reason"]
    # A current export extends the kept checkpoint, with the proof it carries.
    size = json.loads(kept.read_text())["checkpoint"]["size"]
    new = tmp_path / "new.jsonl"
    _export(cli_run, new, "--since", "2000-01-01", "--consistency-from", "31")
    older = tmp_path / "older.json"
    older.write_text(
        json.dumps({"checkpoint": _report(cli_run("audit", "consistency", "31", str(size)))["old"]})
    )
    assert _report(cli_run("audit", "verify-export", str(new), "--checkpoint", str(older)))["ok"]


def test_key_in_the_file_is_never_trusted(
    seeded: Signer, home: Path, tmp_path: Path, cli_run: Any
) -> None:
    out = tmp_path / "export.jsonl"
    lines = _export(cli_run, out)
    # An attacker re-signs the checkpoint with their own key and carries it in the file.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from audit.format import Checkpoint

    evil = Signer.from_private_key(Ed25519PrivateKey.generate())
    header = lines[0]["flexgate_export"]
    cp = Checkpoint.from_dict(header["checkpoint"])
    unsigned = Checkpoint(cp.size, cp.root, cp.at, evil.key_id, "")
    header["checkpoint"] = Checkpoint(
        cp.size, cp.root, cp.at, evil.key_id, evil.sign(unsigned.signed_message())
    ).as_dict()
    header["public_key"] = evil.public_key_pem
    lines[-2]["payload"] = header["checkpoint"]  # the checkpoint record, re-signed likewise
    _write(out, lines)
    report = _report(cli_run("audit", "verify-export", str(out), code=1))
    assert "unknown key" in report["reason"] and report["first_bad_seq"] == TOTAL + 1
    genuine = tmp_path / "genuine.pem"
    genuine.write_bytes((home / PUBLIC_KEY_FILE).read_bytes())
    # --public-key replaces FLEXGATE_HOME's key: the genuine key alone refuses the file ...
    genuine_only = cli_run("audit", "verify-export", str(out), "--public-key", str(genuine), code=1)
    assert "unknown key" in _report(genuine_only)["reason"]
    # ... and with no key at hand at all there is nothing to trust: exit 2, not the file's key.
    for name in (PUBLIC_KEY_FILE, "audit-signing-key.pem"):
        (home / name).unlink()
    assert "no trusted public key" in cli_run("audit", "verify-export", str(out), code=2).output
    notkey = tmp_path / "notkey.pem"
    notkey.write_text("hello")
    assert (
        "not a PEM public key"
        in cli_run("audit", "verify-export", str(out), "--public-key", str(notkey), code=2).output
    )


def test_summary_edit(seeded: Signer, db_url: str, cli_run: Any) -> None:
    async def fold_then_edit(engine: Any) -> None:
        async with engine.begin() as conn:
            await fold_usage(conn, wait=True)
        await tamper(
            engine,
            "UPDATE ledger_usage SET tokens = tokens + 1 "
            "WHERE expert = 'code' AND requests = (SELECT max(requests) FROM ledger_usage "
            "WHERE expert = 'code')",
        )

    _on(db_url, fold_then_edit)
    report = _report(cli_run("audit", "verify", code=1))
    assert "ledger_usage" in report["reason"] and "code" in report["reason"]
    drift = [d for d in report["derived"] if not d["ok"]]
    assert [d["table"] for d in drift] == ["ledger_usage"]


def test_summary_tables_refuse_edits_on_postgresql(seeded: Signer, db_url: str) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("triggers on the derived tables are PostgreSQL's")
    from sqlalchemy.exc import DBAPIError

    async def attempts(engine: Any) -> None:
        async with engine.begin() as conn:
            await fold_usage(conn, wait=True)
        for sql in (
            "DELETE FROM ledger_usage",
            "TRUNCATE ledger_usage",
            "UPDATE ledger_usage SET tokens = tokens - 1",
            "UPDATE ledger_usage_mark SET seq = 0",
            "UPDATE ledger_head SET seq = seq - 1",
            "DELETE FROM ledger_head",
        ):
            with pytest.raises(DBAPIError, match="refused"):
                async with engine.begin() as conn:
                    await conn.execute(text(sql))

    _on(db_url, attempts)


def test_downgrade_needs_consent(seeded: Signer, db_url: str, cli_run: Any) -> None:
    refused = cli_run("db", "downgrade", "base", code=4)
    assert "--i-understand-this-destroys-the-ledger" in refused.output
    assert _report(cli_run("audit", "verify"))["ok"]  # nothing was dropped
    cli_run("db", "downgrade", "0101_ledger_pipeline")  # above the ledger: no consent needed
    assert "out of date" in cli_run("db", "current").stdout
    cli_run("db", "upgrade")
    assert "up to date" in cli_run("db", "current").stdout
    assert _report(cli_run("audit", "verify"))["ok"]
    cli_run("db", "downgrade", "base", "--i-understand-this-destroys-the-ledger")
    assert "current: none" in cli_run("db", "current").stdout
    assert "nosuchrev" in cli_run("db", "downgrade", "nosuchrev", code=2).output


def test_nul_in_a_payload_fails_alone(db_url: str, home: Path, cli_run: Any) -> None:
    async def work(engine: Any) -> None:
        async with LedgerWriter(engine) as w:
            results = await asyncio.gather(
                *(
                    w.append(
                        kind="ok", principal="p", payload={"i": i, "t": "a\x00b" if i == 3 else ""}
                    )
                    for i in range(8)
                ),
                return_exceptions=True,
            )
        bad = [r for r in results if isinstance(r, BaseException)]
        assert len(bad) == 1 and "U+0000" in str(bad[0])
        with pytest.raises(ValueError, match=r"U\+0000"):
            async with make_sessionmaker(engine).begin() as s:
                await append_many(s, [NewRecord("ok", None, {"k\x00": 1})])

    _on(db_url, work)
    assert _report(cli_run("audit", "verify"))["records"] == 7
    assert len(cli_run("audit", "query", "--kind", "ok").stdout.splitlines()) == 7


def test_malformed_record_in_a_group_commit(db_url: str, home: Path, cli_run: Any) -> None:
    """Records that the database itself would refuse (a NUL or control character in the
    principal, a lone surrogate, a huge integer) fail alone; the batch commits."""
    bad_items = [
        ("ok", "app\x00", {}),
        ("ok", "app\n", {}),
        ("ok", "p", {"s": "\ud800"}),
        ("ok", "p", {"n": 2**64}),
        ("ok", "p", {"f": float("nan")}),
        ("inference", "p", {"usage": {"x": {"tokens": -1, "weight": 0}}}),
    ]

    async def work(engine: Any) -> None:
        async with LedgerWriter(engine) as w:
            good = [w.append(kind="ok", principal="p", payload={"i": i}) for i in range(10)]
            bad = [w.append(kind=k, principal=p, payload=x) for k, p, x in bad_items]
            results = await asyncio.gather(*good, *bad, return_exceptions=True)
        assert all(not isinstance(r, BaseException) for r in results[:10])
        assert all(isinstance(r, ValueError) for r in results[10:])

    _on(db_url, work)
    assert _report(cli_run("audit", "verify"))["records"] == 10


def test_appender_cannot_write_kind_checkpoint(db_url: str, home: Path, cli_run: Any) -> None:
    async def work(engine: Any) -> None:
        async with LedgerWriter(engine) as w:
            with pytest.raises(ValueError, match="reserved"):
                await w.append(kind="checkpoint", principal=None, payload={"size": 0})
        with pytest.raises(ValueError, match="reserved"):
            async with make_sessionmaker(engine).begin() as s:
                await append_many(s, [NewRecord("checkpoint", None, {})])
        # Written as plain SQL instead, correctly chained: verify refuses it.
        async with engine.begin() as conn:
            head = (await conn.execute(text("SELECT seq, hash FROM ledger_head"))).first()
        rows = await records(engine)
        fake = {
            "id": str(uuid.uuid4()),
            "kind": "checkpoint",
            "at": "2026-12-01T00:00:00.000000Z",
            "principal": None,
            "payload": '{"at":"2026-12-01T00:00:00.000000Z","key_id":"' + "0" * 64
            + '","root":"' + "0" * 64 + '","signature":"' + "0" * 128 + '","size":'
            + str(head[0]) + "}",
        }  # fmt: skip
        await rewrite_ledger(engine, [*rows, fake], drop_checkpoints=False)

    async def seed(engine: Any) -> None:
        async with make_sessionmaker(engine).begin() as s:
            await append_many(s, [NewRecord("ok", "p", {"i": i}) for i in range(3)])

    _on(db_url, seed)
    _on(db_url, work)
    report = _report(cli_run("audit", "verify", code=1))
    assert report["first_bad_seq"] == 4


def test_record_beyond_the_chain_head(seeded: Signer, db_url: str, cli_run: Any) -> None:
    """A record appended behind the head's back, correctly chained onto the last one: only the
    "beyond the chain head" check sees it (the head itself still matches record 42)."""

    async def attack(engine: Any) -> None:
        last = (await records(engine))[-1]
        rid, at, payload = str(uuid.uuid4()), last["at"], '{"x":1}'
        digest = stored_record_hash(last["hash"], TOTAL + 1, rid, "ok", at, None, payload)
        await tamper(
            engine,
            "INSERT INTO ledger_records (seq, id, kind, at, principal, payload, prev_hash, hash) "
            "VALUES (:seq, :id, 'ok', :at, NULL, :payload, :prev, :hash)",
            seq=TOTAL + 1,
            id=rid,
            at=at,
            payload=payload,
            prev=last["hash"],
            hash=digest,
        )

    _on(db_url, attack)
    for workers in ("1", "2"):
        report = _report(cli_run("audit", "verify", "--workers", workers, code=1))
        assert report["first_bad_seq"] == TOTAL + 1 and "beyond the chain head" in report["reason"]


def test_workers_cannot_be_hijacked_from_the_working_directory(
    db_url: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder `audit/` in the working directory whose worker says every chunk is fine (and
    leaves a mark): the verifier's workers never import it, and the tampering is found."""
    signer = Signer.load_or_create(home)
    evil = tmp_path / "cwd"
    (evil / "audit").mkdir(parents=True)
    mark = tmp_path / "hijacked"
    (evil / "audit" / "__init__.py").write_text(f"open({str(mark)!r}, 'w').write('x')\n")
    (evil / "audit" / "verify_worker.py").write_text(
        f"open({str(mark)!r}, 'w').write('x')\nraise SystemExit(0)\n"
    )

    async def work(engine: Any) -> Any:
        await fill(engine, 300, signer=signer, checkpoint_at=(100,))
        await tamper(
            engine, "UPDATE ledger_records SET payload = replace(payload, 'demo', 'xxxx') "
            "WHERE seq = 250"
        )  # fmt: skip
        monkeypatch.chdir(evil)
        monkeypatch.setenv("PYTHONPATH", f"{evil}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        async with make_sessionmaker(engine)() as s:
            return await verify(
                s, public_keys={signer.key_id: signer.public_key}, workers=2, chunk=64
            )

    report = _on(db_url, work)
    assert (report.ok, report.first_bad_seq) == (False, 250)
    assert report.worker_chunks >= 1  # workers did run (isolated), and found no evil code
    assert not mark.exists()
    assert sys.executable  # the workers ran with this interpreter


def test_anchor_with_a_forged_line_is_reported(seeded: Signer, home: Path, cli_run: Any) -> None:
    lines = (home / ANCHOR_FILE).read_text().splitlines()
    forged = json.loads(lines[-1])
    forged["size"] = 1000
    (home / ANCHOR_FILE).write_text("\n".join([*lines, json.dumps(forged)]) + "\n")
    report = _report(cli_run("audit", "verify", code=1))
    assert "anchor" in report["reason"] and "invalid signature" in report["reason"]


def test_directory_and_command_witnesses(
    seeded: Signer, db_url: str, home: Path, tmp_path: Path, cli_run: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    wdir = tmp_path / "witness"
    got = tmp_path / "cmd.jsonl"
    script = tmp_path / "witness.py"
    script.write_text(f"import sys\nopen({str(got)!r}, 'ab').write(sys.stdin.buffer.read())\n")
    monkeypatch.setenv("FLEXGATE_AUDIT_WITNESSES", f"dir:{wdir},cmd:{sys.executable} -I {script}")
    cp = _report(cli_run("audit", "checkpoint"))["checkpoint"]
    assert json.loads((wdir / anchor.WITNESS_FILE).read_text().splitlines()[-1]) == cp
    assert json.loads(got.read_text().splitlines()[-1]) == cp
    # The directory witness is read back by verify: losing the home anchor alone is survivable
    # when a witness still holds a newer checkpoint than the database.
    (home / ANCHOR_FILE).write_text((home / ANCHOR_FILE).read_text().splitlines()[0] + "\n")
    assert _report(cli_run("audit", "verify"))["anchored_size"] == cp["size"]
    anchors = Anchors.from_settings()
    assert [c.size for c in anchors.checkpoints({seeded.key_id: seeded.public_key})][-1] == cp[
        "size"
    ]
