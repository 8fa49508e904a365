"""The policy version for the requests arriving now: one database read serves all of them.

Every request must see every governance change that committed before it arrived (a key
revoked through another worker is refused on the very next request), so every request needs
a version read that *started* after it arrived. Requests that arrive while a read is running
wait for the next one, which starts as soon as that read ends, and share it; a request that
finds no read running starts one at once. So one client pays one read per request, as
before, and 32 clients arriving together pay two or three reads, not 32 connections out of
the pool.
"""

from __future__ import annotations

import asyncio

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from audit.db import SqliteThread
from governance.changes import read_version, read_version_sync


class VersionReads:
    """Shared reads of the policy version (one per worker; see the module docstring)."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine | None = None
    ) -> None:
        """`engine`: the sessions' engine; on a SQLite file each read then runs on a thread
        of its own with a synchronous connection, one hand-off instead of several per read
        through aiosqlite (audit.db.SqliteThread)."""
        self._sessionmaker = sessionmaker
        self._sqlite = None if engine is None else SqliteThread.of(engine, "policy-version")
        self._next: asyncio.Future[int] | None = None
        """The read that has not started yet: requests arriving now wait for it."""
        self._reader: asyncio.Task[None] | None = None
        self.reads = 0
        """Reads made so far (the tests count them)."""

    async def current(self) -> int:
        """The version, read by a read that started after this call."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        waiting = self._next
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(
                self._read_all(), name="policy-version-reads"
            )
        # shielded: one caller going away must not cancel the read the others wait for
        return await asyncio.shield(waiting)

    async def _read_all(self) -> None:
        while self._next is not None:
            done, self._next = self._next, None
            try:
                version = await self._read()
                self.reads += 1
            except Exception as exc:  # every request waiting on this read fails alike
                if not done.done():
                    done.set_exception(exc)
                    done.exception()  # retrieved: a caller that went away must not warn
                continue
            if not done.done():
                done.set_result(version)

    async def _read(self) -> int:
        if self._sqlite is None:
            async with self._sessionmaker() as session:
                return await read_version(session)
        return await self._sqlite.run(_read_sync)

    async def close(self) -> None:
        """Let go of the synchronous engine and its thread (a later read starts them again)."""
        if self._sqlite is not None:
            await self._sqlite.close()


def _read_sync(engine: Engine) -> int:
    with engine.connect() as connection:
        return read_version_sync(connection)
