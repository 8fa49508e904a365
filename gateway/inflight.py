"""Running generations under a moving policy: narrow them when a revocation bites.

A request is admitted with the allowed set for (principal, purpose, now, narrowing) and its
stream is registered here. The registry subscribes to governance's PolicyWatcher; on every
policy change, committed in any process, it recomputes each running request's set with the new
snapshot and narrows the stream to the intersection, so the engine stops using a revoked or
withdrawn expert from its next decoding step. A running request is never widened (a grant made
while it runs does not apply to it). What was taken away, and why, stays on the entry for the
request's audit record.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from governance.decisions import Narrowing
from governance.identity import Identity
from governance.store import PolicySnapshot
from governance.watcher import PolicyChange

log = logging.getLogger(__name__)

REVOKED_PREFIX = "revoked-"
"""Reason prefix for experts taken away mid-generation: `revoked-no-license`, …"""


class Narrowable(Protocol):
    """What the registry needs of a running generation (engine.GenerationStream has it)."""

    @property
    def allowed(self) -> tuple[str, ...]: ...

    def narrow(self, allowed: Iterable[str]) -> tuple[str, ...]: ...


@dataclass
class Inflight:
    """One running request: who asked, for what, and what the policy took away since."""

    request_id: str
    principal: str | Identity
    purpose: str
    narrowing: Narrowing | None
    stream: Narrowable
    policy_version: int
    revoked: dict[str, str] = field(default_factory=dict)
    """expert id -> `revoked-<reason>` for experts removed while the request ran."""
    revoked_at_version: int | None = None
    narrowed_monotonic: float | None = None
    """time.monotonic() of the last narrowing, to measure how fast a revocation bit."""


class InflightRegistry:
    """The running requests of one worker process; subscribe `on_policy_change` to a watcher."""

    def __init__(self) -> None:
        self._running: dict[str, Inflight] = {}

    def __len__(self) -> int:
        return len(self._running)

    def register(
        self,
        request_id: str,
        stream: Narrowable,
        *,
        principal: str | Identity,
        purpose: str,
        narrowing: Narrowing | None,
        policy_version: int,
    ) -> Inflight:
        if request_id in self._running:
            raise ValueError(f"request {request_id!r} is already running")
        entry = Inflight(request_id, principal, purpose, narrowing, stream, policy_version)
        self._running[request_id] = entry
        return entry

    def finish(self, request_id: str) -> Inflight | None:
        """Forget a request that ended; returns its entry (for the audit record)."""
        return self._running.pop(request_id, None)

    def recheck(self, snapshot: PolicySnapshot, at: datetime | None = None) -> list[Inflight]:
        """Narrow every running request to what `snapshot` allows at `at`; returns those
        that lost an expert."""
        changed: list[Inflight] = []
        for entry in list(self._running.values()):
            decision = snapshot.allowed_experts(
                entry.principal, purpose=entry.purpose, at=at, narrowing=entry.narrowing
            )
            current = entry.stream.allowed
            lost = [e for e in current if e not in decision.allowed]
            if not lost:
                continue
            for expert in lost:
                reason = decision.excluded.get(expert, "no-license")
                entry.revoked[expert] = REVOKED_PREFIX + reason
            # Narrowing to nothing ends the request (engine: finish reason "cancelled").
            entry.stream.narrow([e for e in current if e in decision.allowed])
            entry.revoked_at_version = snapshot.version
            entry.narrowed_monotonic = time.monotonic()
            changed.append(entry)
            log.info(
                "request %s lost %s at policy version %s",
                entry.request_id,
                lost,
                snapshot.version,
            )
        return changed

    def on_policy_change(self, change: PolicyChange) -> None:
        """PolicyWatcher subscriber."""
        self.recheck(change.current)
