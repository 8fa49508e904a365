"""Governance fixtures: a sessionmaker on each database, a model folder, a seeded world."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gov_helpers import OPERATOR, PRINCIPALS, World, write_model
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit.db import make_sessionmaker
from governance.experts import sync_experts
from governance.principals import add_principal
from governance.store import PolicyStore


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model")


@pytest.fixture
def sm(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(db_engine)


@pytest.fixture
async def world(
    sm: async_sessionmaker[AsyncSession], model_dir: Path, db_url: str
) -> AsyncIterator[World]:
    """Principals of gov_helpers.PRINCIPALS and the four experts, registered."""
    async with sm() as s:
        for pid, roles, groups in PRINCIPALS:
            await add_principal(s, actor=OPERATOR, principal_id=pid, roles=roles, groups=groups)
        await sync_experts(s, actor=OPERATOR, model_dir=model_dir)
    yield World(sm=sm, model_dir=model_dir, store=PolicyStore(), url=db_url)
