"""Shared fixtures: fresh, migrated databases on SQLite and (when configured) PostgreSQL.

Each test that asks for `db_url` gets its own database, copied from a template migrated once
per session: a new SQLite file, or a PostgreSQL database created `TEMPLATE` the migrated one.
PostgreSQL runs when FLEXGATE_TEST_DATABASE_URL is set (CI sets it) and is skipped with that
reason otherwise.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

PG_ENV = "FLEXGATE_TEST_DATABASE_URL"

# Under pytest-xdist (`make test` runs two workers) each worker's torch would start an OpenMP
# team as large as the machine, so the workers together would run more threads than there are
# cores and every small operator would pay a wake-up (DESIGN.md, "Threads"). Each worker takes
# its share of the cores instead (set before any test imports torch); the servers and commands
# a test starts inherit it.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _XDIST_WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _XDIST_WORKERS))


def pg_base_url() -> str | None:
    return os.environ.get(PG_ENV) or None


async def _pg_admin(sql: list[str]) -> None:
    import asyncpg

    url = make_url(pg_base_url() or "")
    conn = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        database=url.database,
        password=url.password,
    )
    try:
        for stmt in sql:
            await conn.execute(stmt)
    finally:
        await conn.close()


def pg_create_database(name: str, template: str | None = None) -> str:
    tpl = f" TEMPLATE {template}" if template else ""
    asyncio.run(_pg_admin([f"CREATE DATABASE {name}{tpl}"]))
    return make_url(pg_base_url() or "").set(database=name).render_as_string(hide_password=False)


def pg_drop_database(name: str) -> None:
    asyncio.run(_pg_admin([f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"]))


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from audit.db import upgrade

    path = tmp_path_factory.mktemp("dbtemplate") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def _pg_template() -> Iterator[str]:
    if pg_base_url() is None:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (CI sets it)")
    from audit.db import upgrade

    name = f"fgt_tpl_{uuid.uuid4().hex[:12]}"
    url = pg_create_database(name)
    try:
        upgrade(url)
        yield name
    finally:
        pg_drop_database(name)


@contextmanager
def fresh_database(request: pytest.FixtureRequest, backend: str, folder: Path) -> Iterator[str]:
    """A fresh database at the migrations' head on `backend`, dropped on exit: a copy of the
    SQLite template in `folder`, or a PostgreSQL database made from the migrated template.
    Fixtures of any scope use it (`db_url` per test, a module's shared servers per module)."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = folder / "flexgate.db"
        shutil.copyfile(template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    tpl: str = request.getfixturevalue("_pg_template")
    name = f"fgt_{uuid.uuid4().hex[:12]}"
    url = pg_create_database(name, template=tpl)
    try:
        yield url
    finally:
        pg_drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh database at the migrations' head, on each backend."""
    with fresh_database(request, request.param, tmp_path) as url:
        yield url


@pytest.fixture
def empty_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty database (no schema) on each backend the test is parametrised with."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    if pg_base_url() is None:
        pytest.skip(f"PostgreSQL tests need {PG_ENV} (CI sets it)")
    name = f"fgt_{uuid.uuid4().hex[:12]}"
    url = pg_create_database(name)
    try:
        yield url
    finally:
        pg_drop_database(name)


@pytest.fixture
async def db_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    from audit.db import make_engine

    engine = make_engine(db_url)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture(autouse=True)
def _settings_per_test() -> Iterator[None]:
    """Tests point the process at other folders and databases, and `contracts.settings` reads
    the environment once per process: no test may see another's settings (a test that changes
    the environment mid-way clears the cache itself)."""
    from contracts.settings import settings

    settings.cache_clear()
    yield
    settings.cache_clear()
