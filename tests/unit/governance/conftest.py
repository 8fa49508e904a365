"""Governance fixtures: a sessionmaker on each database, a model folder, seeded principals."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit.db import make_sessionmaker
from governance.experts import sync_experts
from governance.identity import Identity
from governance.principals import add_principal
from governance.store import PolicyStore

OPERATOR = Identity.operator()

# The demo model's experts: router rows 0..3, owners as experts.json names them.
EXPERTS = [
    {"id": "public", "owner": "", "description": "the public model's FFN"},
    {"id": "code", "owner": "olga", "description": "Python code"},
    {"id": "news", "owner": "oscar", "description": "news wire"},
    {"id": "math", "owner": "nobody-yet", "description": "set.mm"},
]


def write_model(folder: Path, experts: list[dict[str, str]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experts.json").write_text(json.dumps({"experts": experts or EXPERTS}))
    return folder


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model")


@pytest.fixture
def sm(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(db_engine)


@dataclass
class World:
    """A registered model with two data owners, applications in groups, and an officer."""

    sm: async_sessionmaker[AsyncSession]
    model_dir: Path
    store: PolicyStore

    async def snapshot(self):  # type: ignore[no-untyped-def]
        async with self.sm() as s:
            return await self.store.snapshot(s)


PRINCIPALS = [
    ("olga", ["data_owner"], []),
    ("oscar", ["data_owner"], []),
    ("app-1", ["application"], ["research"]),
    ("app-2", ["application"], ["research", "partners"]),
    ("app-3", ["application"], []),
    ("carl", ["compliance_officer"], []),
]


@pytest.fixture
async def world(sm: async_sessionmaker[AsyncSession], model_dir: Path) -> AsyncIterator[World]:
    async with sm() as s:
        for pid, roles, groups in PRINCIPALS:
            await add_principal(s, actor=OPERATOR, principal_id=pid, roles=roles, groups=groups)
        await sync_experts(s, actor=OPERATOR, model_dir=model_dir)
    yield World(sm=sm, model_dir=model_dir, store=PolicyStore())
