"""Bad input gives a typed error with a clear message and writes nothing, on both databases.

"Nothing" is checked wholesale after each attempt: the policy version, the ledger head, the
row counts of every governance table (Casbin rules included) and the experts' state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from gov_helpers import OLGA, OPERATOR, OSCAR, World, state
from sqlalchemy.ext.asyncio import AsyncSession

from governance import errors
from governance.experts import assign_owner, reinstate_expert, withdraw_expert
from governance.identity import Identity
from governance.keys import create_key, revoke_key
from governance.licenses import deny, grant_license, lift_denial, revoke_license
from governance.principals import add_principal

NOW = datetime.now(UTC)
APP = Identity("app-1", frozenset({"application"}))

Op = Callable[[AsyncSession], Awaitable[Any]]


def _grant(actor: Identity = OLGA, **kw: Any) -> Op:
    args: dict[str, Any] = {"expert_id": "code", "grantee": "app-1", **kw}
    return lambda s: grant_license(s, actor=actor, **args)


CASES: list[tuple[str, Op, type[errors.GovernanceError], str]] = [
    ("unknown expert", _grant(expert_id="nope"), errors.UnknownExpert, "unknown expert 'nope'"),
    ("unknown principal", _grant(grantee="ghost"), errors.UnknownPrincipal, "'ghost'"),
    ("bad grantee", _grant(grantee="group:a b"), errors.InvalidGrantee, "invalid group"),
    ("bad role grantee", _grant(grantee="role:king"), errors.InvalidGrantee, "unknown role"),
    ("colon grantee", _grant(grantee="x:y"), errors.InvalidGrantee, "invalid grantee"),
    ("upper-case purpose", _grant(purposes=["Research"]), errors.InvalidPurpose, "Research"),
    ("pipe in purpose", _grant(purposes=["a|b"]), errors.InvalidPurpose, "a|b"),
    ("comma in purpose", _grant(purposes=["a,b"]), errors.InvalidPurpose, "a,b"),
    ("empty purpose", _grant(purposes=[""]), errors.InvalidPurpose, "invalid purpose"),
    (
        "expiry before start",
        _grant(valid_from=NOW + timedelta(days=2), expires_at=NOW + timedelta(days=1)),
        errors.InvalidWindow,
        "not after valid_from",
    ),
    (
        "expiry at start",
        _grant(valid_from=NOW + timedelta(days=2), expires_at=NOW + timedelta(days=2)),
        errors.InvalidWindow,
        "not after valid_from",
    ),
    ("expiry past", _grant(expires_at=NOW - timedelta(days=1)), errors.InvalidWindow, "past"),
    (
        "naive time",
        _grant(expires_at=datetime(2099, 1, 1)),
        errors.InvalidWindow,
        "time zone",
    ),
    ("grant by non-owner", _grant(actor=OSCAR), errors.NotPermitted, "not its owner"),
    ("grant by application", _grant(actor=APP), errors.NotPermitted, "not its owner"),
    (
        "grant on unowned expert",
        _grant(actor=OLGA, expert_id="math"),
        errors.NotPermitted,
        "expert math",
    ),
    (
        "withdraw by non-owner",
        lambda s: withdraw_expert(s, actor=OSCAR, expert_id="code"),
        errors.NotPermitted,
        "may not withdraw",
    ),
    (
        "reinstate active",
        lambda s: reinstate_expert(s, actor=OLGA, expert_id="code"),
        errors.InvalidState,
        "not withdrawn",
    ),
    (
        "deny by non-owner",
        lambda s: deny(s, actor=OSCAR, expert_id="code", grantee="app-1"),
        errors.NotPermitted,
        "may not deny",
    ),
    (
        "deny unknown principal",
        lambda s: deny(s, actor=OLGA, expert_id="code", grantee="ghost"),
        errors.UnknownPrincipal,
        "ghost",
    ),
    (
        "revoke unknown license",
        lambda s: revoke_license(s, actor=OLGA, license_id="lic_nope"),
        errors.UnknownLicense,
        "lic_nope",
    ),
    (
        "lift unknown deny rule",
        lambda s: lift_denial(s, actor=OLGA, denial_id="den_nope"),
        errors.UnknownDenial,
        "den_nope",
    ),
    (
        "owner without data_owner role",
        lambda s: assign_owner(s, actor=OPERATOR, expert_id="math", owner_id="app-1"),
        errors.InvalidInput,
        "data_owner",
    ),
    (
        "owner assigned by a data owner",
        lambda s: assign_owner(s, actor=OLGA, expert_id="math", owner_id="olga"),
        errors.NotPermitted,
        "admin role required",
    ),
    (
        "owner unknown",
        lambda s: assign_owner(s, actor=OPERATOR, expert_id="math", owner_id="ghost"),
        errors.UnknownPrincipal,
        "ghost",
    ),
    (
        "duplicate principal",
        lambda s: add_principal(s, actor=OPERATOR, principal_id="olga", roles=["admin"]),
        errors.AlreadyExists,
        "already exists",
    ),
    (
        "principal id aliasing a group",
        lambda s: add_principal(s, actor=OPERATOR, principal_id="group:x", roles=["admin"]),
        errors.InvalidId,
        "invalid principal id",
    ),
    (
        "principal id `*`",
        lambda s: add_principal(s, actor=OPERATOR, principal_id="*", roles=["admin"]),
        errors.InvalidId,
        "invalid principal id",
    ),
    (
        "unknown role",
        lambda s: add_principal(s, actor=OPERATOR, principal_id="p", roles=["root"]),
        errors.InvalidRole,
        "unknown role 'root'",
    ),
    (
        "no role",
        lambda s: add_principal(s, actor=OPERATOR, principal_id="p", roles=[]),
        errors.InvalidInput,
        "at least one role",
    ),
    (
        "principal by non-admin",
        lambda s: add_principal(s, actor=OLGA, principal_id="p", roles=["admin"]),
        errors.NotPermitted,
        "admin role required",
    ),
    (
        "key for unknown principal",
        lambda s: create_key(s, actor=OPERATOR, principal_id="ghost"),
        errors.UnknownPrincipal,
        "ghost",
    ),
    (
        "key by non-admin",
        lambda s: create_key(s, actor=OLGA, principal_id="olga"),
        errors.NotPermitted,
        "admin",
    ),
    (
        "revoke unknown key",
        lambda s: revoke_key(s, actor=OPERATOR, key_id="0123456789abcdef"),
        errors.UnknownKey,
        "0123456789abcdef",
    ),
]


async def test_bad_input_is_refused_and_writes_nothing(world: World) -> None:
    before = await state(world.sm)
    for name, op, error, message in CASES:
        async with world.sm() as s:
            with pytest.raises(error, match=message):
                await op(s)
        assert await state(world.sm) == before, name


async def test_conflicts_are_refused_and_write_nothing(world: World) -> None:
    async with world.sm() as s:
        lic = await grant_license(
            s, actor=OLGA, expert_id="code", grantee="app-1", purposes=["research", "ads"]
        )
        den = await deny(s, actor=OLGA, expert_id="code", grantee="group:partners")
        await withdraw_expert(s, actor=OLGA, expert_id="code")
        key, _ = await create_key(s, actor=OPERATOR, principal_id="app-1")
        await revoke_key(s, actor=OPERATOR, key_id=key.id)
    before = await state(world.sm)
    conflicts: list[tuple[Op, type[errors.GovernanceError], str]] = [
        # the same grant, purposes in another order and repeated: still a duplicate
        (
            _grant(purposes=["ads", "research", "ads"]),
            errors.DuplicateGrant,
            f"license {lic.id} already grants",
        ),
        (
            lambda s: deny(s, actor=OLGA, expert_id="code", grantee="group:partners"),
            errors.DuplicateDenial,
            den.id,
        ),
        (
            lambda s: withdraw_expert(s, actor=OLGA, expert_id="code"),
            errors.InvalidState,
            "already withdrawn",
        ),
        (
            lambda s: revoke_key(s, actor=OPERATOR, key_id=key.id),
            errors.InvalidState,
            "already revoked",
        ),
        (
            lambda s: revoke_license(s, actor=OSCAR, license_id=lic.id),
            errors.NotPermitted,
            "not its owner",
        ),
        (
            lambda s: revoke_license(s, actor=OLGA, license_id=lic.id, expert_id="news"),
            errors.UnknownLicense,
            "expert news has no license",
        ),
        (
            lambda s: lift_denial(s, actor=OSCAR, denial_id=den.id),
            errors.NotPermitted,
            "not its owner",
        ),
    ]
    for op, error, message in conflicts:
        async with world.sm() as s:
            with pytest.raises(error, match=message):
                await op(s)
        assert await state(world.sm) == before, message
    # a different window is a different grant; revoking twice is a conflict
    async with world.sm() as s:
        await grant_license(
            s,
            actor=OLGA,
            expert_id="code",
            grantee="app-1",
            purposes=["research", "ads"],
            expires_at=NOW + timedelta(days=5),
        )
        await revoke_license(s, actor=OLGA, license_id=lic.id)
        with pytest.raises(errors.InvalidState, match="already revoked"):
            await revoke_license(s, actor=OLGA, license_id=lic.id)
        # once revoked, the same grant may be made again
        await grant_license(
            s, actor=OLGA, expert_id="code", grantee="app-1", purposes=["research", "ads"]
        )
        await lift_denial(s, actor=OLGA, denial_id=den.id)
        with pytest.raises(errors.InvalidState, match="already lifted"):
            await lift_denial(s, actor=OLGA, denial_id=den.id)
