"""API keys: `fg_<key id>_<secret>`, shown once, stored only as a SHA-256 hash.

The key id (16 hex characters, 64 random bits) is public: it finds the row, names the key in
`keys list` / `keys revoke` and in audit records. The secret carries 256 random bits from
`secrets`, so a fast unsalted hash is enough (nothing to brute-force; the same reasoning as
GitHub's and Stripe's tokens) and comparing hashes with `hmac.compare_digest` keeps the check
constant-time. Revocation, expiry and the principal are re-read from the database on every
authentication, so a revocation committed by any process applies to the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from governance.changes import change, fresh
from governance.errors import AuthenticationFailed, InvalidInput, InvalidState, UnknownKey
from governance.identity import Identity
from governance.models import ApiKey, Principal
from governance.principals import get_principal, require_admin

TOKEN_PREFIX = "fg"
SECRET_BYTES = 32  # 256 bits
KEY_ID_BYTES = 8
MAX_KEY_LIFETIME = timedelta(days=36525)  # a century; far beyond it, dates stop being dates
LAST_USED_RESOLUTION = timedelta(seconds=60)  # write last_used_at at most once a minute
_KEY_ID_RE = re.compile(r"[0-9a-f]{16}")
_SECRET_RE = re.compile(r"[A-Za-z0-9_-]{43}")
# Compared against when the key id is unknown, so that case costs the same hash and compare.
_DUMMY_HASH = hashlib.sha256(b"flexgate-no-such-key").hexdigest()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def parse_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    parts = token.split("_", 2)
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        return None
    key_id, secret = parts[1], parts[2]
    if not _KEY_ID_RE.fullmatch(key_id) or not _SECRET_RE.fullmatch(secret):
        return None
    return key_id, secret


def looks_like_key(token: str) -> bool:
    return token.startswith(TOKEN_PREFIX + "_")


async def create_key(
    session: AsyncSession,
    *,
    actor: Identity,
    principal_id: str,
    expires_in: timedelta | None = None,
    now: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key for a principal (admin only); returns the row and the key, shown once."""
    require_admin(actor, "create keys")
    now = now or datetime.now(UTC)
    if expires_in is not None and expires_in <= timedelta(0):
        raise InvalidInput("a key's lifetime must be positive")
    if expires_in is not None and expires_in > MAX_KEY_LIFETIME:
        raise InvalidInput(f"a key's lifetime is at most {MAX_KEY_LIFETIME.days} days")
    key_id = secrets.token_hex(KEY_ID_BYTES)
    token = f"{TOKEN_PREFIX}_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    async with change(session, actor) as ch:
        await get_principal(session, principal_id)
        row = ApiKey(
            id=key_id,
            principal_id=principal_id,
            secret_hash=hash_token(token),
            created_at=now,
            created_by=actor.id,
            expires_at=None if expires_in is None else now + expires_in,
        )
        session.add(row)
        await ch.record(
            "key.created",
            {
                "key_id": key_id,
                "principal_id": principal_id,
                "expires_at": None if row.expires_at is None else row.expires_at.isoformat(),
            },
        )
    return row, token


async def list_keys(session: AsyncSession, principal_id: str | None = None) -> Sequence[ApiKey]:
    stmt = select(ApiKey).order_by(ApiKey.principal_id, ApiKey.created_at)
    if principal_id is not None:
        await get_principal(session, principal_id)
        stmt = stmt.where(ApiKey.principal_id == principal_id)
    return (await session.execute(stmt.execution_options(populate_existing=True))).scalars().all()


async def revoke_key(session: AsyncSession, *, actor: Identity, key_id: str) -> ApiKey:
    """Revoke a key (admin only); the next request with it, in any process, gets 401."""
    require_admin(actor, "revoke keys")
    async with change(session, actor) as ch:
        row: ApiKey | None = await fresh(session, ApiKey, key_id)
        if row is None:
            raise UnknownKey(f"unknown key {key_id!r}")
        if row.revoked_at is not None:
            raise InvalidState(f"key {key_id} is already revoked")
        row.revoked_at = datetime.now(UTC)
        row.revoked_by = actor.id
        await ch.record("key.revoked", {"key_id": key_id, "principal_id": row.principal_id})
    return row


async def _identity_of(session: AsyncSession, row: ApiKey, now: datetime) -> Identity:
    """The key's principal as it is now; AuthenticationFailed if the key is revoked or expired."""
    if row.revoked_at is not None:
        raise AuthenticationFailed("revoked API key")
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthenticationFailed("expired API key")
    principal: Principal | None = await fresh(session, Principal, row.principal_id)
    if principal is None:  # pragma: no cover - the foreign key forbids it
        raise AuthenticationFailed("API key without principal")
    return Identity(
        id=principal.id,
        roles=frozenset(principal.roles),
        groups=frozenset(principal.groups),
        via="key",
        key_id=row.id,
    )


async def identity_of_key(
    session: AsyncSession, key_id: str, *, now: datetime | None = None
) -> Identity:
    """Re-check a key already authenticated once, by its id (the console's sessions).

    The same revocation, expiry and principal checks as `authenticate_key`, read fresh, so a
    session opened with a key ends on the first page after the key is revoked or expires.
    """
    if not _KEY_ID_RE.fullmatch(key_id):
        raise AuthenticationFailed("malformed key id")
    row: ApiKey | None = await fresh(session, ApiKey, key_id)
    if row is None:
        raise AuthenticationFailed("unknown API key")
    return await _identity_of(session, row, now or datetime.now(UTC))


async def _authenticate_row(
    session: AsyncSession, token: str, now: datetime
) -> tuple[ApiKey, Identity]:
    parsed = parse_token(token)
    if parsed is None:
        raise AuthenticationFailed("malformed API key")
    key_id, _secret = parsed
    row: ApiKey | None = await fresh(session, ApiKey, key_id)
    presented = hash_token(token)
    if not hmac.compare_digest(presented, row.secret_hash if row is not None else _DUMMY_HASH):
        raise AuthenticationFailed("unknown API key")
    assert row is not None
    return row, await _identity_of(session, row, now)


async def _note_used(session: AsyncSession, key_id: str, now: datetime) -> None:
    """Write `last_used_at` (at most once per LAST_USED_RESOLUTION, whoever else writes it)."""
    await session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id)
        .where(
            or_(
                ApiKey.last_used_at.is_(None),
                ApiKey.last_used_at <= now - LAST_USED_RESOLUTION,
            )
        )
        .values(last_used_at=now)
    )


def _due(last_used: datetime | None, now: datetime) -> bool:
    return last_used is None or last_used <= now - LAST_USED_RESOLUTION


async def authenticate_key(
    session: AsyncSession, token: str, *, now: datetime | None = None
) -> Identity:
    """The principal a key belongs to, or AuthenticationFailed (unknown, expired, revoked).

    Commits the session: it records the last-used time (at most once a minute per key).
    """
    now = now or datetime.now(UTC)
    row, identity = await _authenticate_row(session, token, now)
    if _due(row.last_used_at, now):
        await _note_used(session, row.id, now)
    await session.commit()
    return identity


@dataclass(slots=True)
class _Known:
    identity: Identity
    expires_at: datetime | None
    last_used_at: datetime | None


class KeyCache:
    """Keys one process has authenticated, good for one policy version.

    Every change to a key, its principal or its limits is a governance change, which bumps the
    policy version in its own transaction (governance.changes). A caller that reads the
    version on every request (the gateway does: its policy snapshot needs it) can therefore
    trust a key it authenticated at that same version: when anything moves, in any process,
    the version moves and the whole cache is dropped. So a revocation still applies to the
    next request, while an unchanged policy costs no key or principal read. Expiry is checked
    against the clock on every use; failures are never kept (an unknown or revoked key is
    read, and refused, every time).
    """

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._version: int | None = None
        self._known: dict[str, _Known] = {}

    async def authenticate_key(
        self, session: AsyncSession, token: str, *, version: int, now: datetime | None = None
    ) -> Identity:
        """`authenticate_key`, from the cache when this key was seen at `version` (the policy
        version the caller read in `session` for this request)."""
        now = now or datetime.now(UTC)
        if version != self._version:
            self._known.clear()
            self._version = version
        digest = hash_token(token)
        known = self._known.get(digest)
        if known is None:
            row, identity = await _authenticate_row(session, token, now)
            known = _Known(identity, row.expires_at, row.last_used_at)
            if len(self._known) >= self.limit:
                self._known.clear()
            if self._version == version:  # not moved on by a newer request meanwhile
                self._known[digest] = known
        elif known.expires_at is not None and known.expires_at <= now:
            del self._known[digest]
            raise AuthenticationFailed("expired API key")
        if _due(known.last_used_at, now):
            assert known.identity.key_id is not None
            await _note_used(session, known.identity.key_id, now)
            await session.commit()
            known.last_used_at = now
        return known.identity
