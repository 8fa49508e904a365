"""API keys: 256-bit secrets shown once, stored as a hash, expiry, revocation, last use."""

from __future__ import annotations

import base64
import hmac
import re
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest
from gov_helpers import OPERATOR, World
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from audit.models import LedgerRecord
from governance import keys
from governance.auth import authenticate, bearer_token
from governance.errors import AuthenticationFailed
from governance.models import ApiKey

KEY_RE = re.compile(r"fg_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")


async def test_keys_are_random_hashed_and_shown_once(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with world.sm() as s:
        row, token = await keys.create_key(s, actor=OPERATOR, principal_id="app-1")
        _, other = await keys.create_key(s, actor=OPERATOR, principal_id="app-1")
    m = KEY_RE.fullmatch(token)
    assert m is not None and m.group(1) == row.id
    assert len(base64.urlsafe_b64decode(m.group(2) + "=")) * 8 >= 256
    assert token != other
    async with world.sm() as s:
        stored = (await s.execute(select(ApiKey).where(ApiKey.id == row.id))).scalar_one()
        ledger = list((await s.execute(select(LedgerRecord))).scalars())
    assert stored.secret_hash == keys.hash_token(token)
    secret = m.group(2)
    assert secret not in repr(vars(stored))
    assert not any(
        secret in repr(r.payload) or stored.secret_hash in repr(r.payload) for r in ledger
    )

    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return bool(real(a, b))

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with world.sm() as s:
        who = await authenticate(s, f"Bearer {token}")
    assert (who.id, who.roles, who.groups, who.via, who.key_id) == (
        "app-1",
        frozenset({"application"}),
        frozenset({"research"}),
        "key",
        row.id,
    )
    assert calls == [(keys.hash_token(token), stored.secret_hash)]


async def test_bad_expired_and_revoked_keys_fail(world: World) -> None:
    now = datetime.now(UTC)
    async with world.sm() as s:
        row, token = await keys.create_key(
            s, actor=OPERATOR, principal_id="app-2", expires_in=timedelta(days=1)
        )
        # the same key id with another secret, an unknown id, garbage
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        for bad, reason in [
            (forged, "unknown"),
            ("fg_0123456789abcdef_" + "A" * 43, "unknown"),
            ("fg_short_secret", "malformed"),
            (token + "x", "malformed"),
        ]:
            with pytest.raises(AuthenticationFailed, match=reason):
                await keys.authenticate_key(s, bad)
        # valid now, expired one day later (expiry is exclusive)
        assert (await keys.authenticate_key(s, token, now=now)).id == "app-2"
        with pytest.raises(AuthenticationFailed, match="expired"):
            await keys.authenticate_key(s, token, now=row.expires_at)
        await keys.revoke_key(s, actor=OPERATOR, key_id=row.id)
        with pytest.raises(AuthenticationFailed, match="revoked"):
            await keys.authenticate_key(s, token, now=now)
        listed = await keys.list_keys(s, "app-2")
        assert [(k.id, k.revoked_by) for k in listed] == [(row.id, OPERATOR.id)]


async def test_last_used_is_recorded_at_most_once_a_minute(world: World) -> None:
    t0 = datetime.now(UTC)
    async with world.sm() as s:
        row, token = await keys.create_key(s, actor=OPERATOR, principal_id="app-3")
        assert row.last_used_at is None
        for at, expected in [
            (t0, t0),
            (t0 + timedelta(seconds=30), t0),  # within the minute: no write
            (t0 + timedelta(seconds=61), t0 + timedelta(seconds=61)),
        ]:
            await keys.authenticate_key(s, token, now=at)
            (listed,) = await keys.list_keys(s, "app-3")
            assert listed.last_used_at == expected


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    for bad in [None, "", "Basic abc", "Bearer", "Bearer  "]:
        with pytest.raises(AuthenticationFailed):
            bearer_token(bad)


async def test_unrecognised_credentials_fail_closed() -> None:
    no_db = cast(AsyncSession, None)  # refused before any database access
    for header in ["Bearer a.b.c", "Bearer sk-openai-style", "Token fg_x"]:
        with pytest.raises(AuthenticationFailed):
            await authenticate(no_db, header)  # no JWT verifier configured
