"""Fixtures of the audit tests: a signing key in a temporary FLEXGATE_HOME, ledgers with
records and checkpoints, and raw SQL access for tampering (PostgreSQL's append-only triggers
disabled as the superuser, as an attacker with database access could)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit.db import make_sessionmaker
from audit.signing import Signer
from audit.writer import LedgerWriter


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("FLEXGATE_HOME", str(path))
    return path


@pytest.fixture
def signer(home: Path) -> Signer:
    return Signer.load_or_create(home)


@pytest.fixture
def sm(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(db_engine)


@pytest.fixture
async def writer(db_engine: AsyncEngine, signer: Signer) -> AsyncIterator[LedgerWriter]:
    async with LedgerWriter(db_engine, signer=signer) as w:
        yield w


@pytest.fixture(autouse=True)
def _no_derived_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests write governance kinds with synthetic payloads (no Casbin rules behind
    them), which governance's installed drift check rightly reports as drift. The audit tests
    check audit's own derived state; governance's plugin is tested, through the same
    discovery, in tests/unit/governance/test_gov_drift.py."""
    import audit.derived

    monkeypatch.setattr(audit.derived, "plugin_checks", list)
