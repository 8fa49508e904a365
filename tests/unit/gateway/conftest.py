"""Gateway fixtures: a tiny model, a migrated database with principals and keys, an app.

- `gw_model_dir` (session): a tiny FlexOlmo checkpoint with experts.json (public, code, news,
  math; owners `owner-<id>`) and a chat template;
- `gw_engine` (session): that model loaded once (tests share the scheduler; each request
  passes its own allowed set);
- `gw_settings`: Settings on this test's database (`db_url`: SQLite and PostgreSQL) and home;
- `gw_world`: principals of every role and one key each (`world.keys[role]`, bearer tokens),
  created before the app starts so the lifespan's expert registration assigns the owners;
- `gw_app` / `gw_client`: the app (lifespan run) and an `AsyncTestClient` on it;
- `gw_live`: the same app served by uvicorn on a free loopback port in a thread (real HTTP:
  streams arrive as they are sent; the `openai` client talks to it); `.base_url`;
- `auth(token)`: the Authorization header.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from audit.db import make_engine, make_sessionmaker
from contracts.settings import Settings
from governance.identity import Identity
from governance.keys import create_key
from governance.principals import add_principal

OPERATOR = Identity.operator()
EXPERT_IDS = ("public", "code", "news", "math")
MODEL_NAME = "tiny-flexolmo"
WINDOW = 1024

# principal id, roles — one per role, plus the owners experts.json names
PRINCIPALS: list[tuple[str, list[str]]] = [
    ("app-1", ["application"]),
    ("app-2", ["application"]),
    ("owner-code", ["data_owner"]),
    ("owner-news", ["data_owner"]),
    ("officer", ["compliance_officer"]),
    ("root", ["admin"]),
]
ROLE_PRINCIPAL = {
    "application": "app-1",
    "data_owner": "owner-code",
    "compliance_officer": "officer",
    "admin": "root",
}


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class GwWorld:
    settings: Settings
    sm: async_sessionmaker[AsyncSession]
    keys: dict[str, str] = field(default_factory=dict)
    """role -> bearer token of ROLE_PRINCIPAL[role]; also principal id -> token."""

    def headers(self, who: str) -> dict[str, str]:
        return auth(self.keys[who])


@pytest.fixture(scope="session")
def gw_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.checkpoints import build_tiny_checkpoint

    # A window long enough for a stream to outlive a policy change by far.
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("gwmodel") / MODEL_NAME,
        expert_ids=EXPERT_IDS,
        max_position_embeddings=WINDOW,
    )


@pytest.fixture(scope="session")
def gw_engine(gw_model_dir: Path) -> Iterator[Any]:
    from engine import load_engine

    eng = load_engine(gw_model_dir)
    yield eng
    eng.close()


@pytest.fixture
def gw_settings(db_url: str, tmp_path: Path, gw_model_dir: Path) -> Settings:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return Settings(
        home=home,
        database_url=db_url,
        model_dir=gw_model_dir,
        model_name=MODEL_NAME,
        policy_poll_s=0.05,
    )


@pytest.fixture
async def gw_world(gw_settings: Settings) -> AsyncIterator[GwWorld]:
    db = make_engine(gw_settings.database_url)
    sm = make_sessionmaker(db)
    world = GwWorld(gw_settings, sm)
    try:
        async with sm() as s:
            for pid, roles in PRINCIPALS:
                await add_principal(s, actor=OPERATOR, principal_id=pid, roles=roles)
                _row, token = await create_key(s, actor=OPERATOR, principal_id=pid)
                world.keys[pid] = token
        for role, pid in ROLE_PRINCIPAL.items():
            world.keys[role] = world.keys[pid]
        yield world
    finally:
        await db.dispose()


@pytest.fixture
def gw_app(gw_world: GwWorld, gw_engine: Any) -> Litestar:
    from gateway.app import create_app

    return create_app(gw_world.settings, engine=gw_engine)


@pytest.fixture
async def gw_client(gw_app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=gw_app) as client:
        yield client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    app: Litestar
    base_url: str
    server: Any
    thread: threading.Thread


@pytest.fixture
def gw_live(gw_app: Litestar) -> Iterator[LiveServer]:
    import uvicorn

    port = free_port()
    config = uvicorn.Config(gw_app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gw-live", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(gw_app, f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(30)
