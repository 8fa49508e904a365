"""Database layer: one async engine per URL, the shared declarative Base, schema checks.

Every table of the project is declared on `Base` (governance imports it), and the one Alembic
history in migrations/ creates them; nothing here calls `create_all`.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import Engine, MetaData, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

from audit.errors import AuditError, DatabaseUnavailable, SchemaOutOfDate
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


def sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    for pragma in SQLITE_PRAGMAS:
        cur.execute(pragma)
    cur.close()


def make_engine(url: str | None = None, **kwargs: Any) -> AsyncEngine:
    """Create an async engine for `url` (default: Settings.from_env().database_url)."""
    url = url or Settings.from_env().database_url
    if is_sqlite(url):
        path = url.split("///", 1)[-1].split("?", 1)[0]
        in_memory = path == ":memory:" or "mode=memory" in url  # also `file:x?mode=memory`
        if path and not in_memory:
            file = Path(path)
            try:
                file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise DatabaseUnavailable(
                    f"cannot create the database file {file}: its folder {file.parent} cannot "
                    f"be created ({exc.strerror or exc})"
                ) from exc
            try:
                create_private_file(file)
            except OSError as exc:
                raise DatabaseUnavailable(f"cannot create the database file: {exc}") from exc
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", sqlite_on_connect)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_async_engine(url, **kwargs)


def sync_sqlite_engine(engine: AsyncEngine) -> Engine | None:
    """A synchronous engine on the same SQLite file as `engine`, with its pragmas, for code
    that runs a whole transaction on a thread of its own (one hand-off instead of several per
    statement through aiosqlite, each waiting for the GIL while the engine's scheduler thread
    decodes). None for PostgreSQL, whose driver is natively async, and for an in-memory
    database (another connection would see another database)."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    if url.query.get("mode") == "memory" or str(url.database).startswith("file::memory:"):
        return None
    sync = create_engine(url.set(drivername="sqlite"))
    event.listen(sync, "connect", sqlite_on_connect)
    return sync


class SqliteThread:
    """A synchronous engine on an async engine's SQLite file and the one thread that uses it
    (`sync_sqlite_engine`): `run(fn)` runs `fn(engine)` there. The thread is started by the
    first run and ended by `close()`, which may come twice; a run after it starts another."""

    def __init__(self, engine: Engine, name: str) -> None:
        self.engine = engine
        self._name = name
        self._thread: ThreadPoolExecutor | None = None

    @classmethod
    def of(cls, engine: AsyncEngine, name: str) -> SqliteThread | None:
        """One for `engine`'s file; None where `sync_sqlite_engine` gives none."""
        sync = sync_sqlite_engine(engine)
        return None if sync is None else cls(sync, name)

    async def run(self, fn: Callable[[Engine], T]) -> T:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, self.engine)

    async def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.get_running_loop().run_in_executor(thread, self.engine.dispose)
            thread.shutdown(wait=False)


def create_private_file(path: Path) -> None:
    """Create the SQLite file (and its folder, 0700) with mode 0600 if it does not exist, so
    the ledger is never readable by others; SQLite gives its -wal and -shm files the same
    mode. An existing file keeps its mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


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


LEDGER_REVISION = "0001_ledger"  # the migration that creates the ledger's tables


class LedgerDestructionRefused(AuditError):
    """A downgrade would drop the ledger while it holds records, without explicit consent."""


def downgrade(url: str | None, revision: str, *, destroy_ledger: bool = False) -> None:
    """Migrate down to `revision`. Below the ledger's creation while it holds records this
    is refused (LedgerDestructionRefused) unless `destroy_ledger`: the records are the
    evidence. The migration itself checks the same (for plain `alembic downgrade`)."""
    from alembic import command

    cfg = alembic_config(url)
    if _drops_ledger(cfg, revision) and not destroy_ledger:
        count = asyncio.run(_ledger_records(url or Settings.from_env().database_url))
        if count:
            raise LedgerDestructionRefused(
                f"downgrading to {revision} drops the audit ledger and its {count} records: "
                "export it first (`flexgate audit export`), then pass "
                "--i-understand-this-destroys-the-ledger"
            )
    cfg.attributes["flexgate_destroy_ledger"] = destroy_ledger
    command.downgrade(cfg, revision)


def _drops_ledger(cfg: Any, revision: str) -> bool:
    """Whether migrating down to `revision` undoes the ledger's migration."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(cfg)
    if revision in ("base", "0"):
        return True
    if revision.startswith("-"):
        return True  # relative: resolved by Alembic; the migration's own check decides
    try:
        target = script.get_revision(revision)
    except Exception:
        return False  # Alembic reports the unknown revision itself
    if target is None:
        return True
    below = {r.revision for r in script.iterate_revisions(target.revision, "base")}
    return LEDGER_REVISION not in below


async def _ledger_records(url: str) -> int:
    from sqlalchemy import text

    engine = make_engine(url)
    try:
        async with translate_errors(), engine.connect() as conn:
            try:
                count = (await conn.execute(text("SELECT count(*) FROM ledger_records"))).scalar()
                return int(count or 0)
            except DBAPIError:
                return 0  # no ledger table: nothing to destroy
    finally:
        await engine.dispose()
