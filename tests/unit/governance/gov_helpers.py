"""Shared test helpers of the governance tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from audit.ledger import head
from governance.changes import read_version
from governance.identity import Identity
from governance.models import ApiKey, CasbinRule, Denial, Expert, License, Principal
from governance.store import PolicySnapshot, PolicyStore

OPERATOR = Identity.operator()
OLGA = Identity("olga", frozenset({"data_owner"}))
OSCAR = Identity("oscar", frozenset({"data_owner"}))

# The test model's experts: router rows 0..3, owners as experts.json names them.
EXPERTS = [
    {"id": "public", "owner": "", "description": "the public model's FFN"},
    {"id": "code", "owner": "olga", "description": "Python code"},
    {"id": "news", "owner": "oscar", "description": "news wire"},
    {"id": "math", "owner": "nobody-yet", "description": "set.mm"},
]

PRINCIPALS = [
    ("olga", ["data_owner"], []),
    ("oscar", ["data_owner"], []),
    ("app-1", ["application"], ["research"]),
    ("app-2", ["application"], ["research", "partners"]),
    ("app-3", ["application"], []),
    ("carl", ["compliance_officer"], []),
]


def write_model(folder: Path, experts: list[dict[str, Any]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "experts.json").write_text(json.dumps({"experts": experts or EXPERTS}))
    return folder


@dataclass
class World:
    """A registered model with two data owners, applications in groups, and an officer."""

    sm: async_sessionmaker[AsyncSession]
    model_dir: Path
    store: PolicyStore
    url: str

    async def snapshot(self) -> PolicySnapshot:
        async with self.sm() as s:
            return await self.store.snapshot(s)


async def state(sm: async_sessionmaker[AsyncSession]) -> dict[str, Any]:
    """Everything a failed change must leave untouched."""
    async with sm() as s:
        out: dict[str, Any] = {
            "version": await read_version(s),
            "ledger": await head(s),
        }
        for model in (Principal, ApiKey, Expert, License, Denial, CasbinRule):
            out[model.__tablename__] = (
                await s.execute(select(func.count()).select_from(model))
            ).scalar_one()
        out["experts_status"] = sorted(
            (e.id, e.status, e.owner_id) for e in (await s.execute(select(Expert))).scalars()
        )
        out["revoked"] = sorted(
            lic.id for lic in (await s.execute(select(License))).scalars() if lic.revoked_at
        )
        return out
