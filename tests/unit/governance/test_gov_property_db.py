"""Property, end to end on both databases: whatever sequence of grants, revocations, deny
rules, withdrawals and reinstatements the services accept, the allowed set (read back through
the Casbin adapter and the compiled policy) holds exactly the experts with a matching, valid,
unrevoked license row and no active deny row, with the reasons the rows imply.

Examples share the test's database and build on one another's state (a fresh database per
example would cost a second each on PostgreSQL); the property must hold in any state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from gov_helpers import OPERATOR, PRINCIPALS, World
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from governance.errors import GovernanceError
from governance.experts import reinstate_expert, withdraw_expert
from governance.licenses import deny, grant_license, lift_denial, revoke_license
from governance.models import Denial, Expert, License
from governance.store import PolicyStore

NOW = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)
T1, T2, T3 = (NOW + timedelta(days=d) for d in (10, 20, 30))
TIMES = [NOW, T1 - timedelta(microseconds=1), T1, T2, T3, T3 + timedelta(days=1)]
EXPERT_IDS = ["public", "code", "news", "math"]
GRANTEES = ["app-1", "app-2", "app-3", "group:research", "group:partners", "role:application", "*"]
PURPOSES = ["general", "research"]

grant_op = st.tuples(
    st.just("grant"),
    st.sampled_from(EXPERT_IDS),
    st.sampled_from(GRANTEES),
    st.one_of(st.none(), st.lists(st.sampled_from(PURPOSES), min_size=1, unique=True)),
    st.sampled_from([None, T1, T2]),
    st.sampled_from([None, T2, T3]),
)
ops = st.lists(
    st.one_of(
        grant_op,
        grant_op,
        st.tuples(st.just("revoke"), st.integers(0, 20)),
        st.tuples(st.just("deny"), st.sampled_from(EXPERT_IDS), st.sampled_from(GRANTEES)),
        st.tuples(st.just("lift"), st.integers(0, 20)),
        st.tuples(st.sampled_from(["withdraw", "reinstate"]), st.sampled_from(EXPERT_IDS)),
    ),
    min_size=1,
    max_size=8,
)


async def _apply(world: World, op: tuple[Any, ...]) -> None:
    async with world.sm() as s:
        try:
            if op[0] == "grant":
                _, e, grantee, purposes, valid_from, expires_at = op
                await grant_license(
                    s,
                    actor=OPERATOR,
                    expert_id=e,
                    grantee=grantee,
                    purposes=purposes,
                    valid_from=valid_from,
                    expires_at=expires_at,
                )
            elif op[0] in ("revoke", "lift"):
                model = License if op[0] == "revoke" else Denial
                ids = sorted((await s.execute(select(model.id))).scalars())
                if ids:
                    target = ids[op[1] % len(ids)]
                    if op[0] == "revoke":
                        await revoke_license(s, actor=OPERATOR, license_id=target)
                    else:
                        await lift_denial(s, actor=OPERATOR, denial_id=target)
            elif op[0] == "deny":
                await deny(s, actor=OPERATOR, expert_id=op[1], grantee=op[2])
            elif op[0] == "withdraw":
                await withdraw_expert(s, actor=OPERATOR, expert_id=op[1])
            else:
                await reinstate_expert(s, actor=OPERATOR, expert_id=op[1])
        except GovernanceError:
            pass  # refused input writes nothing; the property must hold all the same


def _oracle(
    rows: tuple[list[Expert], list[License], list[Denial]],
    subs: set[str],
    purpose: str,
    t: datetime,
) -> tuple[tuple[str, ...], dict[str, str]]:
    experts, licenses, denials = rows
    allowed: list[str] = []
    excluded: dict[str, str] = {}
    for e in experts:
        mine = [
            lic
            for lic in licenses
            if lic.expert_id == e.id
            and lic.revoked_at is None
            and lic.grantee in subs
            and ("*" in lic.purposes or purpose in lic.purposes)
        ]
        valid = [
            lic
            for lic in mine
            if (lic.valid_from is None or lic.valid_from <= t)
            and (lic.expires_at is None or t < lic.expires_at)
        ]
        denied = any(
            d.expert_id == e.id and d.lifted_at is None and d.grantee in subs for d in denials
        )
        if e.status == "withdrawn":
            excluded[e.id] = "withdrawn"
        elif denied:
            excluded[e.id] = "denied"
        elif valid:
            allowed.append(e.id)
        elif any(lic.valid_from is not None and lic.valid_from > t for lic in mine):
            excluded[e.id] = "not-yet-valid"
        elif mine:
            excluded[e.id] = "expired"
        else:
            excluded[e.id] = "no-license"
    return tuple(allowed), excluded


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(sequence=ops)
async def test_allowed_set_matches_the_rows(world: World, sequence: list[tuple[Any, ...]]) -> None:
    for op in sequence:
        await _apply(world, op)
    async with world.sm() as s:
        snap = await PolicyStore().snapshot(s)
        rows = (
            list((await s.execute(select(Expert).order_by(Expert.position))).scalars()),
            list((await s.execute(select(License))).scalars()),
            list((await s.execute(select(Denial))).scalars()),
        )
    for pid, roles, groups in PRINCIPALS:
        subs = {pid, "*", *(f"role:{r}" for r in roles), *(f"group:{g}" for g in groups)}
        for purpose in PURPOSES:
            for t in TIMES:
                got = snap.allowed_experts(pid, purpose, t)
                assert (got.allowed, got.excluded) == _oracle(rows, subs, purpose, t), (
                    pid,
                    purpose,
                    t,
                )
