"""Database layer: one async engine per URL, the shared declarative Base, schema checks.

Every table of the project is declared on `Base` (governance imports it), and the one Alembic
history in migrations/ creates them; nothing here calls `create_all`.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import MetaData, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

from audit.errors import DatabaseUnavailable, SchemaOutOfDate
from contracts.settings import Settings

P = ParamSpec("P")
T = TypeVar("T")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


# WAL lets readers run beside the single writer; busy_timeout makes concurrent processes wait
# for the write lock instead of failing at once; synchronous=FULL: a commit that returned
# survives a power loss too (NORMAL in WAL mode only survives a crash of the process), and
# with group commit the extra fsync is shared by a whole batch.
SQLITE_PRAGMAS = (
    "PRAGMA journal_mode=WAL",
    "PRAGMA busy_timeout=30000",
    "PRAGMA synchronous=FULL",
    "PRAGMA foreign_keys=ON",
)


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in SQLITE_PRAGMAS:
        cur.execute(pragma)
    cur.close()


def make_engine(url: str | None = None, **kwargs: Any) -> AsyncEngine:
    """Create an async engine for `url` (default: Settings.from_env().database_url)."""
    url = url or Settings.from_env().database_url
    if is_sqlite(url):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise DatabaseUnavailable(f"cannot create the database folder: {exc}") from exc
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def translate_errors() -> AsyncIterator[None]:
    """Turn driver-level connection failures into DatabaseUnavailable."""
    try:
        yield
    except BrokenPipeError:
        raise  # our reader went away (`| head`): not the database
    except (OperationalError, DBAPIError, OSError, ConnectionError) as exc:
        if (
            isinstance(exc, DBAPIError)
            and not exc.connection_invalidated
            and not isinstance(exc, OperationalError)
        ):
            raise
        raise DatabaseUnavailable(f"database unreachable: {exc}") from exc


def db_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Decorate a library coroutine so connection failures surface as DatabaseUnavailable."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        async with translate_errors():
            return await fn(*args, **kwargs)

    return wrapper


def alembic_config(url: str | None = None) -> Any:
    """The Alembic configuration of the one migration history, for any URL."""
    from alembic.config import Config

    root = Path(__file__).resolve().parent.parent
    cfg = Config(str(root / "alembic.ini"))
    cfg.set_main_option("script_location", str(root / "migrations"))
    cfg.set_main_option(
        "sqlalchemy.url", (url or Settings.from_env().database_url).replace("%", "%%")
    )
    return cfg


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    def _current(sync_conn: Any) -> str | None:
        return MigrationContext.configure(sync_conn).get_current_revision()

    async with translate_errors(), engine.connect() as conn:
        return await conn.run_sync(_current)


async def ensure_schema_current(engine: AsyncEngine) -> None:
    """Refuse to run on a schema that is not at the migrations' head."""
    current = await current_revision(engine)
    head = head_revision()
    if current != head:
        raise SchemaOutOfDate(
            f"database schema is at {current or 'nothing'}, the code needs {head}: "
            "run `flexgate db upgrade`"
        )


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Migrate to `revision`; synchronous, so call it via asyncio.to_thread inside a loop."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
