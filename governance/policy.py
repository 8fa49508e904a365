"""The Casbin side of governance: the model file, rule encoding, the adapter, the enforcer.

Domain rows (licenses, denials, principals, withdrawals) are turned into Casbin rules here and
nowhere else, so the services, the loader and the tests agree on one encoding (see
policy_model.conf for what each field means).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import casbin
from casbin.persist import load_policy_line
from casbin_async_sqlalchemy_adapter import Adapter
from sqlalchemy.ext.asyncio import AsyncSession

from governance.models import CasbinRule
from governance.names import ANY, GROUP_PREFIX, PURPOSE_SEPARATOR, ROLE_PREFIX

MODEL_PATH = Path(__file__).with_name("policy_model.conf")
ROUTE_POLICY_PATH = Path(__file__).with_name("route_policy.csv")

TIME_MIN = "0001-01-01T00:00:00.000000Z"
TIME_MAX = "9999-12-31T23:59:59.999999Z"
WITHDRAWN = "status:withdrawn"
ALLOW = "allow"
DENY = "deny"

Rule = list[str]


def encode_time(at: datetime | None, default: str) -> str:
    """Fixed-width UTC text, so that comparing the strings compares the instants."""
    if at is None:
        return default
    if at.tzinfo is None:
        raise ValueError("naive datetime: pass an aware (UTC) datetime")
    at = at.astimezone(UTC)
    return (
        f"{at.year:04d}-{at.month:02d}-{at.day:02d}T"
        f"{at.hour:02d}:{at.minute:02d}:{at.second:02d}.{at.microsecond:06d}Z"
    )


def purpose_match(requested: str, granted: str) -> bool:
    """Casbin function `purposeMatch`: exact membership of one purpose in `a|b|c`, or `*`."""
    return granted == ANY or requested in granted.split(PURPOSE_SEPARATOR)


def license_rule(
    *,
    grantee: str,
    expert_id: str,
    purposes: Sequence[str],
    valid_from: datetime | None,
    expires_at: datetime | None,
) -> Rule:
    return [
        grantee,
        expert_id,
        PURPOSE_SEPARATOR.join(purposes),
        encode_time(valid_from, TIME_MIN),
        encode_time(expires_at, TIME_MAX),
        ALLOW,
    ]


def denial_rule(*, grantee: str, expert_id: str) -> Rule:
    return [grantee, expert_id, ANY, TIME_MIN, TIME_MAX, DENY]


def principal_links(principal_id: str, roles: Iterable[str], groups: Iterable[str]) -> list[Rule]:
    """`g` rules: the principal inherits the subjects role:R and group:G."""
    return [[principal_id, ROLE_PREFIX + r] for r in sorted(set(roles))] + [
        [principal_id, GROUP_PREFIX + g] for g in sorted(set(groups))
    ]


def withdrawal_link(expert_id: str) -> Rule:
    return [expert_id, WITHDRAWN]


def adapter(session: AsyncSession) -> Adapter:
    """The Casbin SQLAlchemy adapter bound to `session`: its writes join that transaction.

    Its own table creation is never used; migrations/ creates `casbin_rule`.
    """
    return Adapter(session.bind, db_class=CasbinRule, db_session=session)


def route_rules(path: Path = ROUTE_POLICY_PATH) -> list[Rule]:
    """The `p2` lines of the route policy file, parsed by Casbin's own line parser."""
    model = casbin.Enforcer(str(MODEL_PATH)).get_model()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            load_policy_line(line, model)
    return [list(rule) for rule in model.model["p"]["p2"].policy]


def _finish(enforcer: Any, routes: Sequence[Rule]) -> None:
    enforcer.add_function("purposeMatch", purpose_match)
    enforcer.enable_auto_save(False)  # nothing an enforcer holds is written back through it
    model = enforcer.get_model()
    for rule in routes:
        model.model["p"]["p2"].policy.append(list(rule))


async def load_enforcer(
    session: AsyncSession, routes: Sequence[Rule] | None = None
) -> casbin.AsyncEnforcer:
    """An enforcer holding every stored rule plus the route policy, read through `session`."""
    enforcer = casbin.AsyncEnforcer(str(MODEL_PATH), adapter(session))
    await enforcer.load_policy()
    _finish(enforcer, route_rules() if routes is None else routes)
    return enforcer


def enforcer_from_rules(
    p: Iterable[Sequence[str]] = (),
    g: Iterable[Sequence[str]] = (),
    g2: Iterable[Sequence[str]] = (),
    routes: Sequence[Rule] = (),
) -> casbin.Enforcer:
    """A plain in-memory enforcer over the given rules (tests and the benchmark baseline)."""
    enforcer = casbin.Enforcer(str(MODEL_PATH))
    model = enforcer.get_model()
    model.model["p"]["p"].policy.extend(list(r) for r in p)
    model.model["g"]["g"].policy.extend(list(r) for r in g)
    model.model["g"]["g2"].policy.extend(list(r) for r in g2)
    enforcer.build_role_links()
    _finish(enforcer, routes)
    return enforcer
