"""Admission: the experts a request may use, decided once, before any compute.

Governance's allowed set for (principal, purpose, now) intersected with the caller's own
narrowing (never widened). A malformed narrowing, an unknown expert id or a bad purpose is a
400 (governance raises it); no expert left is a 403 that says, for each expert, why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from gateway.errors import PERMISSION, ApiError
from gateway.inference.params import Plan
from governance.decisions import CALLER_EXCLUDED
from governance.identity import Identity
from governance.store import PolicySnapshot


@dataclass(frozen=True, slots=True)
class Admission:
    allowed: tuple[str, ...]
    excluded: dict[str, str]
    policy_version: int
    at: datetime


def admit(snapshot: PolicySnapshot, identity: Identity, plan: Plan) -> Admission:
    now = datetime.now(UTC)
    decision = snapshot.allowed_experts(
        identity, purpose=plan.purpose, at=now, narrowing=plan.narrowing
    )
    if not decision.allowed:
        reasons = ", ".join(f"{e}: {r}" for e, r in decision.excluded.items())
        only_caller = bool(decision.excluded) and all(
            r == CALLER_EXCLUDED for r in decision.excluded.values()
        )
        raise ApiError(
            403,
            f"no expert may serve this request (purpose {plan.purpose!r}): {reasons}",
            type=PERMISSION,
            code="no_expert_allowed",
            param="experts" if only_caller else None,
        )
    return Admission(decision.allowed, dict(decision.excluded), snapshot.version, now)
