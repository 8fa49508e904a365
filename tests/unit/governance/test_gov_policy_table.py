"""The policy table: (principal, purpose, time) -> allowed set with reasons, on both databases.

One scenario, written through the services and read back through the Casbin adapter, covers
groups, roles, `*`, deny-override, the inclusive start and exclusive end of validity windows,
purposes, withdrawal and the caller's narrowing. Every row is also checked against plain
Casbin `enforce` on the loaded enforcer.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from gov_helpers import OLGA, OPERATOR, OSCAR, World

from governance.decisions import AllowedSet
from governance.errors import InvalidNarrowing, InvalidPurpose
from governance.experts import reinstate_expert, withdraw_expert
from governance.identity import Identity
from governance.licenses import deny, grant_license

BASE = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
T1 = BASE + timedelta(days=10)
T2 = BASE + timedelta(days=20)
T3 = BASE + timedelta(days=30)
US = timedelta(microseconds=1)

# principal, purpose, at, allowed, excluded (math is withdrawn throughout this table)
TABLE: list[tuple[str, str, datetime, list[str], dict[str, str]]] = [
    # group:research grant on code starts at T1 (inclusive) ...
    ("app-1", "research", T1 - US, ["public", "news"], {"code": "not-yet-valid"}),
    ("app-1", "research", T1, ["public", "code", "news"], {}),
    # ... and ends at T3 (exclusive); role:application on news ends at T2
    ("app-1", "research", T3 - US, ["public", "code"], {"news": "expired"}),
    ("app-1", "research", T3, ["public"], {"code": "expired", "news": "expired"}),
    # deny overrides app-2's group grant on code; a deny on group:partners hits news
    ("app-2", "research", T1, ["public"], {"code": "denied", "news": "denied"}),
    # app-3: a direct all-purpose grant on code, role grant on news
    ("app-3", "general", T1, ["public", "code", "news"], {}),
    ("app-3", "general", T2, ["public", "code"], {"news": "expired"}),
    ("app-3", "ads", T1, ["public", "code"], {"news": "no-license"}),
    # purposes: the group grant is for research only; app-1's marketing license starts at T2
    ("app-1", "marketing", T2 - US, ["public"], {"code": "no-license", "news": "not-yet-valid"}),
    ("app-1", "marketing", T2, ["public", "news"], {"code": "no-license"}),
    # a compliance officer and an unknown principal only get the public expert (`*`)
    ("carl", "general", T1, ["public"], {"code": "no-license", "news": "no-license"}),
    ("stranger", "general", T1, ["public"], {"code": "no-license", "news": "no-license"}),
]


async def _scenario(w: World) -> None:
    async with w.sm() as s:
        await grant_license(
            s,
            actor=OLGA,
            expert_id="code",
            grantee="group:research",
            purposes=["research"],
            valid_from=T1,
            expires_at=T3,
        )
        await grant_license(s, actor=OLGA, expert_id="code", grantee="app-3")
        await deny(s, actor=OLGA, expert_id="code", grantee="app-2")
        await grant_license(
            s,
            actor=OSCAR,
            expert_id="news",
            grantee="role:application",
            purposes=["general", "research"],
            expires_at=T2,
        )
        await grant_license(
            s,
            actor=OSCAR,
            expert_id="news",
            grantee="app-1",
            purposes=["marketing"],
            valid_from=T2,
        )
        await deny(s, actor=OSCAR, expert_id="news", grantee="group:partners")
        # math has no owner: only an admin can license it; then it is withdrawn
        await grant_license(s, actor=OPERATOR, expert_id="math", grantee="*", purposes=["research"])
        await withdraw_expert(s, actor=OPERATOR, expert_id="math")


async def test_policy_table(world: World) -> None:
    await _scenario(world)
    snap = await world.snapshot()
    for row in TABLE:
        principal, purpose, at, allowed, excluded = row
        result = snap.allowed_experts(principal, purpose, at)
        assert result == AllowedSet(tuple(allowed), {**excluded, "math": "withdrawn"}), row
        for e in snap.expert_ids:  # plain Casbin enforce agrees, expert by expert
            assert snap.enforce(principal, e, purpose, at) == (e in allowed), (row, e)


async def test_withdrawal_reinstatement_narrowing_and_tokens(world: World) -> None:
    await _scenario(world)
    snap = await world.snapshot()
    # a caller narrows, never widens; the policy's own reason wins over caller-excluded
    only_code = snap.allowed_experts("app-3", "general", T1, {"only": ["code", "math"]})
    assert only_code.allowed == ("code",)
    assert only_code.excluded == {
        "public": "caller-excluded",
        "news": "caller-excluded",
        "math": "withdrawn",
    }
    no_public = snap.allowed_experts("app-3", "general", T1, {"exclude": ["public"]})
    assert no_public.allowed == ("code", "news")
    with pytest.raises(InvalidNarrowing, match="nope"):
        snap.allowed_experts("app-3", "general", T1, {"exclude": ["nope"]})
    with pytest.raises(InvalidNarrowing):
        snap.allowed_experts("app-3", "general", T1, {"exclude": [], "only": []})
    with pytest.raises(InvalidPurpose):
        snap.allowed_experts("app-3", "Research!", T1)
    # a JWT identity carries its role in the token, without a principal row
    token_user = Identity("jwt-user", frozenset({"application"}), via="jwt")
    assert snap.allowed_experts(token_user, "general", T1).allowed == ("public", "news")
    assert snap.allowed_experts("jwt-user", "general", T1).allowed == ("public",)
    # reinstating math brings its `*` research license back
    async with world.sm() as s:
        await reinstate_expert(s, actor=OPERATOR, expert_id="math")
    snap = await world.snapshot()
    assert snap.allowed_experts("carl", "research", T1).allowed == ("public", "math")
    assert snap.allowed_experts("carl", "general", T1).excluded["math"] == "no-license"
