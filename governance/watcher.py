"""Tell running generations about policy changes within a second, in every process.

Admission needs no watcher (each request reads the version, see store.py). In-flight
generations do: a revocation or withdrawal committed anywhere must reach them within 1 s so
they stop using the expert from the next decoding step. `PolicyWatcher` polls the one-row
policy version every `interval` seconds (250 ms by default: a primary-key read, cheap on
both databases), reloads the snapshot when it moved and calls each subscriber with a
`PolicyChange`. The gateway's subscriber recomputes the allowed set of each running request
with `change.current.allowed_experts(...)` and narrows it; `change.withdrawn` names experts to
unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from governance.store import PolicySnapshot, PolicyStore

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.25


@dataclass(frozen=True, slots=True)
class PolicyChange:
    """The policy moved from `previous` (None at start) to `current`."""

    previous: PolicySnapshot | None
    current: PolicySnapshot

    @property
    def withdrawn(self) -> frozenset[str]:
        """Experts withdrawn since the previous snapshot."""
        before = self.previous.compiled.withdrawn if self.previous else frozenset()
        return self.current.compiled.withdrawn - before

    @property
    def reinstated(self) -> frozenset[str]:
        before = self.previous.compiled.withdrawn if self.previous else frozenset()
        return before - self.current.compiled.withdrawn


Subscriber = Callable[[PolicyChange], Awaitable[None] | None]


class PolicyWatcher:
    """Polls the policy version and notifies subscribers of every change it sees."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        store: PolicyStore,
        *,
        interval: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self._sessionmaker = sessionmaker
        self.store = store
        self.interval = interval
        self._subscribers: list[Subscriber] = []
        self._seen: PolicySnapshot | None = None
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber(change)` on each change; returns a function that unsubscribes."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    async def poll_once(self) -> PolicyChange | None:
        """Check the version once; notify and return the change if there was one."""
        async with self._sessionmaker() as session:
            snapshot = await self.store.snapshot(session)
        if self._seen is not None and snapshot.version == self._seen.version:
            return None
        change = PolicyChange(self._seen, snapshot)
        self._seen = snapshot
        for subscriber in list(self._subscribers):
            try:
                result = subscriber(change)
                if result is not None:
                    await result
            except Exception:
                log.exception("policy subscriber failed")
        return change

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # database briefly unreachable: keep watching
                log.exception("policy watcher poll failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="flexgate-policy-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> PolicyWatcher:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
