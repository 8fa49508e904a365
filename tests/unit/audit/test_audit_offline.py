"""The standalone verifier (`python -m audit.offline`) on exports from SQLite and PostgreSQL:
a separate interpreter that imports nothing but the standard library, `cryptography` and the
stdlib-only audit modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from audit_helpers import fill
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.checkpoints import create_checkpoint
from audit.export import export_lines
from audit.signing import PUBLIC_KEY_FILE, Signer

ROOT = Path(__file__).resolve().parents[3]


def _offline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "audit.offline", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_imports_only_the_standard_library_and_cryptography() -> None:
    probe = (
        "import sys, audit.offline; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'sqlalchemy', 'asyncpg', 'aiosqlite', 'alembic', 'click', 'contracts', 'rfc8785'}); "
        "print(bad); "
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith('audit.')}))"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); {probe}"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.splitlines()  # fmt: skip
    assert out[0] == "[]"
    assert out[1] == "['audit']"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
async def test_offline_verifier_on_both_databases(
    db_engine: AsyncEngine, signer: Signer, sm: Any, home: Path, tmp_path: Path, fmt: str
) -> None:
    await fill(db_engine, 120, signer=signer, checkpoint_at=(50,))
    async with sm.begin() as s:
        await create_checkpoint(s, signer)
    async with sm() as s:
        lines = [line async for line in await export_lines(s, fmt=fmt, consistency_from=[50])]
    out = tmp_path / f"export.{fmt}"
    out.write_text("".join(lines))
    pub = home / PUBLIC_KEY_FILE
    kept = tmp_path / "kept.json"
    kept.write_text(
        json.dumps(
            {"checkpoint": json.loads((home / "audit-anchor.jsonl").read_text().splitlines()[1])}
        )
    )
    good = _offline(str(out), "--public-key", str(pub), "--checkpoint", str(kept))
    assert good.returncode == 0, good.stderr
    report = json.loads(good.stdout)
    assert (report["records"], report["checkpoint_size"], report["auditor_size"]) == (122, 121, 50)
    text = out.read_text()
    out.write_text(text.replace("req-7", "req-X", 1))
    bad = _offline(str(out), "--public-key", str(pub))
    assert bad.returncode == 1 and json.loads(bad.stdout)["first_bad_seq"] == 8  # req-7 is record 8
    assert _offline(str(out)).returncode == 2  # a trusted key is required
    notkey = tmp_path / "x.pem"
    notkey.write_text("x")
    usage = _offline(str(out), "--public-key", str(notkey))
    assert usage.returncode == 2 and "not a PEM public key" in usage.stderr
    assert "Traceback" not in usage.stderr + bad.stderr
