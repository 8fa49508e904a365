"""KeyCache: a key authenticated at a policy version is not read again at that version, and
any governance change (revocation, a principal added, limits set), made in any session,
moves the version and so reaches the very next authentication."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from gov_helpers import OPERATOR, World
from sqlalchemy import event

from governance import keys
from governance.auth import authenticate
from governance.changes import read_version
from governance.errors import AuthenticationFailed
from governance.key_limits import Limits, set_limits
from governance.principals import add_principal


class Reads:
    """Counts the statements that read the api_keys table."""

    def __init__(self, sm: Any) -> None:
        self.count = 0
        self._engine = sm.kw["bind"].sync_engine
        event.listen(self._engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "api_keys" in statement:
            self.count += 1

    def close(self) -> None:
        event.remove(self._engine, "before_cursor_execute", self._seen)


async def _auth(world: World, cache: keys.KeyCache, token: str, **kw: Any) -> Any:
    async with world.sm() as s:
        version = await read_version(s)
        return await authenticate(s, f"Bearer {token}", keys=cache, version=version, **kw)


async def test_a_known_key_is_not_read_again_until_the_version_moves(world: World) -> None:
    async with world.sm() as s:
        row, token = await keys.create_key(s, actor=OPERATOR, principal_id="app-1")
    cache = keys.KeyCache()
    reads = Reads(world.sm)

    async def key_reads() -> int:
        before = reads.count
        assert (await _auth(world, cache, token)).key_id == row.id
        return reads.count - before

    try:
        assert await key_reads() == 1
        assert [await key_reads() for _ in range(3)] == [0, 0, 0]  # answered from the cache
        async with world.sm() as s:  # an unrelated change still moves the version
            await add_principal(s, actor=OPERATOR, principal_id="app-9", roles=["application"])
        assert await key_reads() == 1
        assert await key_reads() == 0
        async with world.sm() as s:
            await set_limits(s, actor=OPERATOR, key_id=row.id, limits=Limits(rpm=5))
        assert await key_reads() == 1
    finally:
        reads.close()


async def test_a_revocation_in_another_session_applies_to_the_next_request(
    world: World,
) -> None:
    async with world.sm() as s:
        row, token = await keys.create_key(s, actor=OPERATOR, principal_id="app-2")
    cache = keys.KeyCache()
    assert (await _auth(world, cache, token)).id == "app-2"
    async with world.sm() as s:  # "another process": its own session and transaction
        await keys.revoke_key(s, actor=OPERATOR, key_id=row.id)
    with pytest.raises(AuthenticationFailed, match="revoked"):
        await _auth(world, cache, token)
    with pytest.raises(AuthenticationFailed):  # failures are never kept
        await _auth(world, cache, token)


async def test_expiry_is_checked_on_every_use_and_bad_keys_are_refused(world: World) -> None:
    async with world.sm() as s:
        _row, token = await keys.create_key(
            s, actor=OPERATOR, principal_id="app-3", expires_in=timedelta(hours=1)
        )
    cache = keys.KeyCache()
    now = datetime.now(UTC)
    assert (await _auth(world, cache, token, now=now)).id == "app-3"
    with pytest.raises(AuthenticationFailed, match="expired"):
        await _auth(world, cache, token, now=now + timedelta(hours=2))
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(AuthenticationFailed, match="unknown"):
        await _auth(world, cache, forged, now=now)
    with pytest.raises(AuthenticationFailed, match="malformed"):
        await _auth(world, cache, "fg_nope", now=now)
