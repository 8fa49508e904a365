"""Console sessions: server-side, in files under FLEXGATE_HOME that every worker can read.

The browser holds only a random 256-bit session id (HttpOnly, SameSite=Strict cookie); what
the session knows lives on the server in `FLEXGATE_HOME/console-sessions/` (Litestar's
FileStore: one file per session, named by a BLAKE2 hash of the id, written atomically, mode
0600 in a 0700 folder). So any worker process of one host resolves any session, and signing
out deletes it for all of them. A session records how it was opened (the API key's id, never
the key; or the OIDC token's subject and expiry) and is re-checked against governance on
every page, so a revoked or expired key ends it at the next page. Timeouts: idle
(`console_idle_s`, renewed by each page) and absolute (`console_absolute_s` after sign-in).

Several hosts behind one load balancer would need a shared store (a database table); that
takes a migration and is not done here (docs/console.md).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from litestar.stores.file import FileStore

SESSION_ID_BYTES = 32
CSRF_BYTES = 32
# Writing last-seen on every page would rewrite the file per request; a few seconds of slack
# in the idle timeout is harmless.
TOUCH_EVERY_S = 5.0
GRACE_S = 3600


@dataclass
class ConsoleSession:
    """What the server remembers about one signed-in browser."""

    id: str
    principal: str
    roles: list[str]
    groups: list[str]
    via: str  # "key" or "jwt"
    key_id: str | None
    csrf: str
    created: float
    last_seen: float
    not_after: float  # absolute timeout, or the token's own expiry when sooner
    flash: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> ConsoleSession | None:
        try:
            data: Any = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError):
            return None


class SessionStore:
    """Create, load (with timeouts), touch and delete console sessions."""

    def __init__(self, folder: Path, *, idle_s: int, absolute_s: int) -> None:
        self.folder = folder
        self.idle_s = idle_s
        self.absolute_s = absolute_s
        self._store = FileStore(folder)

    def _ensure_folder(self) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)

    async def create(
        self,
        *,
        principal: str,
        roles: list[str],
        groups: list[str],
        via: str,
        key_id: str | None,
        expires_at: float | None = None,
        now: float | None = None,
    ) -> ConsoleSession:
        now = time.time() if now is None else now
        not_after = now + self.absolute_s
        if expires_at is not None:
            not_after = min(not_after, expires_at)
        sess = ConsoleSession(
            id=secrets.token_urlsafe(SESSION_ID_BYTES),
            principal=principal,
            roles=sorted(roles),
            groups=sorted(groups),
            via=via,
            key_id=key_id,
            csrf=secrets.token_urlsafe(CSRF_BYTES),
            created=now,
            last_seen=now,
            not_after=not_after,
        )
        self._ensure_folder()
        await self.save(sess)
        return sess

    async def save(self, sess: ConsoleSession) -> None:
        # The file outlives the session by a grace period, so that the next page can still
        # say why the session ended; `delete_expired` sweeps what nobody came back to.
        remaining = min(sess.not_after, sess.last_seen + self.idle_s) - time.time()
        await self._store.set(sess.id, sess.to_json(), expires_in=max(1, int(remaining)) + GRACE_S)

    async def load(
        self, session_id: str, *, now: float | None = None
    ) -> tuple[ConsoleSession | None, str | None]:
        """(session, None) when valid, else (None, why it ended) — "idle", "expired" or None
        when there is no such session."""
        now = time.time() if now is None else now
        if not session_id or len(session_id) > 128:
            return None, None
        raw = await self._store.get(session_id)
        sess = None if raw is None else ConsoleSession.from_json(raw)
        if sess is None or not secrets.compare_digest(sess.id, session_id):
            return None, None
        if now >= sess.not_after:
            await self.delete(session_id)
            return None, "expired"
        if now >= sess.last_seen + self.idle_s:
            await self.delete(session_id)
            return None, "idle"
        if now - sess.last_seen >= TOUCH_EVERY_S:
            sess.last_seen = now
            await self.save(sess)
        return sess, None

    async def delete(self, session_id: str) -> None:
        await self._store.delete(session_id)

    async def delete_expired(self) -> None:
        if self.folder.is_dir():
            await self._store.delete_expired()
