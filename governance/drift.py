"""Policy drift: the governance tables recomputed from the ledger and compared with the tables.

The ledger is the evidence; `casbin_rule` (what every decision reads), `experts`, `licenses`,
`denials`, `principals` and `api_keys` are state derived from it. Someone who can write to the
database behind the application's back can add a grant, delete a deny rule, widen a purpose,
flip a withdrawn expert back or un-revoke a key without any ledger record: the chain still
verifies, but the rules in force are no longer the ones the records say. This replays the
governance records (read through audit's query API) in seq order, derives each table's
expected content with the same encoders the services use (governance.policy), and reports
every difference. `flexgate audit verify` runs it through the entry point group
`flexgate.derived_checks`; it reads only, and trusts the records it replays (the chain itself is
audit verify's own check).

Not derivable from the ledger, and so not checked: key secrets (only their hash is stored, and
no record holds it), display names, notes, descriptions and last-used times.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from audit.db import make_sessionmaker
from audit.derived import DerivedFinding
from audit.ledger import Entry
from audit.query import MAX_LIMIT, RecordQuery, query_records
from governance import policy
from governance.models import ApiKey, CasbinRule, Denial, Expert, License, Principal

GOVERNANCE_KINDS = (
    "principal.created",
    "key.created",
    "key.revoked",
    "expert.registered",
    "expert.updated",
    "expert.owner_assigned",
    "expert.withdrawn",
    "expert.reinstated",
    "license.granted",
    "license.revoked",
    "license.denied",
    "license.deny_lifted",
)
_SHOWN = 5  # differences spelled out per table; the rest are counted

RuleRow = tuple[str, ...]


@dataclass
class Replayed:
    """The governance state the ledger's records describe."""

    principals: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)
    keys: dict[str, tuple[str, str | None, bool]] = field(default_factory=dict)
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)
    licenses: dict[str, RuleRow] = field(default_factory=dict)  # active: id -> p rule
    revoked_licenses: set[str] = field(default_factory=set)
    denials: dict[str, RuleRow] = field(default_factory=dict)  # active: id -> p rule
    lifted_denials: set[str] = field(default_factory=set)

    def apply(self, entry: Entry) -> None:
        p, kind = entry.payload, entry.kind
        if kind == "principal.created":
            self.principals[p["principal_id"]] = (tuple(p["roles"]), tuple(p["groups"]))
        elif kind == "key.created":
            self.keys[p["key_id"]] = (p["principal_id"], _instant(p.get("expires_at")), False)
        elif kind == "key.revoked" and p["key_id"] in self.keys:
            principal, expires, _ = self.keys[p["key_id"]]
            self.keys[p["key_id"]] = (principal, expires, True)
        elif kind == "expert.registered":
            self.experts[p["expert"]] = {"owner": None, "status": "active"}
        elif kind == "expert.owner_assigned":
            self.experts.setdefault(p["expert"], {"status": "active"})["owner"] = p["owner"]
        elif kind in ("expert.withdrawn", "expert.reinstated"):
            status = "withdrawn" if kind == "expert.withdrawn" else "active"
            self.experts.setdefault(p["expert"], {"owner": None})["status"] = status
        elif kind == "license.granted":
            rule = policy.license_rule(
                grantee=p["grantee"],
                expert_id=p["expert"],
                purposes=p["purposes"],
                valid_from=_when(p.get("valid_from")),
                expires_at=_when(p.get("expires_at")),
            )
            self.licenses[p["license_id"]] = tuple(rule)
        elif kind == "license.revoked":
            self.licenses.pop(p["license_id"], None)
            self.revoked_licenses.add(p["license_id"])
        elif kind == "license.denied":
            rule = policy.denial_rule(grantee=p["grantee"], expert_id=p["expert"])
            self.denials[p["denial_id"]] = tuple(rule)
        elif kind == "license.deny_lifted":
            self.denials.pop(p["denial_id"], None)
            self.lifted_denials.add(p["denial_id"])

    def rules(self) -> Counter[RuleRow]:
        """Every Casbin rule the records put in force, as (ptype, v0, v1, …)."""
        out: Counter[RuleRow] = Counter()
        for pid, (roles, groups) in self.principals.items():
            for link in policy.principal_links(pid, roles, groups):
                out[("g", *link)] += 1
        for rule in [*self.licenses.values(), *self.denials.values()]:
            out[("p", *rule)] += 1
        for eid, expert in self.experts.items():
            if expert.get("status") == "withdrawn":
                out[("g2", *policy.withdrawal_link(eid))] += 1
        return out


def _when(text: str | None) -> datetime | None:
    """A time a record holds (ISO 8601, with a zone), or None."""
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


def _instant(text: str | None) -> str | None:
    """A stored time, as one canonical text (the ledger keeps ISO 8601 of several shapes)."""
    when = _when(text)
    return None if when is None else policy.encode_time(when, "")


def _at(value: datetime | None) -> str | None:
    return None if value is None else policy.encode_time(value, "")


async def replay(session: AsyncSession) -> Replayed:
    """Fold every governance record, in seq order, into the state it describes."""
    entries: list[Entry] = []
    for kind in GOVERNANCE_KINDS:
        after: int | None = None
        while True:
            page = await query_records(
                session, RecordQuery(kind=kind, after=after, limit=MAX_LIMIT)
            )
            entries.extend(page.records)
            if page.next_after is None:
                break
            after = page.next_after
    state = Replayed()
    for entry in sorted(entries, key=lambda e: e.seq):
        state.apply(entry)
    return state


def _finding(table: str, problems: Sequence[str]) -> DerivedFinding:
    if not problems:
        return DerivedFinding(table, True, "matches the ledger")
    shown = "; ".join(problems[:_SHOWN])
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return DerivedFinding(table, False, f"{len(problems)} not in the ledger: {shown}{more}")


def _rule_text(rule: RuleRow) -> str:
    return ", ".join(rule)


def _compare_rules(expected: Counter[RuleRow], rows: Iterable[Any]) -> list[str]:
    found: Counter[RuleRow] = Counter()
    for r in rows:
        values = [r.v0, r.v1, r.v2, r.v3, r.v4, r.v5]
        while values and values[-1] in (None, ""):
            values.pop()
        found[(str(r.ptype), *(v or "" for v in values))] += 1
    problems = [
        f"rule added [{_rule_text(rule)}]" for rule in sorted((found - expected).elements())
    ]
    problems += [
        f"rule deleted [{_rule_text(rule)}]" for rule in sorted((expected - found).elements())
    ]
    return problems


def _compare(
    what: str, expected: dict[str, Any], found: dict[str, Any], extra_ok: Iterable[str] = ()
) -> list[str]:
    problems: list[str] = []
    allowed_extra = set(extra_ok)
    for key in sorted(set(expected) | set(found)):
        if key not in found:
            problems.append(f"{what} {key} missing")
        elif key not in expected:
            if key not in allowed_extra:
                problems.append(f"{what} {key} has no record")
        elif expected[key] != found[key]:
            problems.append(f"{what} {key} is {found[key]!r}, the records say {expected[key]!r}")
    return problems


async def check_policy_drift(engine: AsyncEngine) -> list[DerivedFinding]:
    """One finding per derived governance table: ok, or what differs from the ledger."""
    from governance.licenses import license_rule

    async with make_sessionmaker(engine)() as session:
        state = await replay(session)

        async def rows(model: type[Any]) -> list[Any]:
            # plain rows with the columns' attribute names: no ORM objects to build
            return list(await session.execute(select(*model.__table__.columns)))

        casbin = _compare_rules(state.rules(), await rows(CasbinRule))
        principals = _compare(
            "principal",
            {k: (sorted(r), sorted(g)) for k, (r, g) in state.principals.items()},
            {p.id: (sorted(p.roles), sorted(p.groups)) for p in await rows(Principal)},
        )
        keys = _compare(
            "key",
            {k: v for k, v in state.keys.items()},
            {
                k.id: (k.principal_id, _at(k.expires_at), k.revoked_at is not None)
                for k in await rows(ApiKey)
            },
        )
        experts = _compare(
            "expert",
            {k: (v.get("owner"), v.get("status")) for k, v in state.experts.items()},
            {e.id: (e.owner_id, e.status) for e in await rows(Expert)},
        )
        license_rows = await rows(License)
        licenses = _compare(
            "license",
            {
                **{k: ("active", rule) for k, rule in state.licenses.items()},
                **{k: ("revoked", None) for k in state.revoked_licenses},
            },
            {
                lic.id: ("revoked", None)
                if lic.revoked_at is not None
                else ("active", tuple(license_rule(lic)))
                for lic in license_rows
            },
        )
        denials = _compare(
            "deny rule",
            {
                **{k: ("active", rule) for k, rule in state.denials.items()},
                **{k: ("lifted", None) for k in state.lifted_denials},
            },
            {
                d.id: ("lifted", None)
                if d.lifted_at is not None
                else ("active", tuple(policy.denial_rule(grantee=d.grantee, expert_id=d.expert_id)))
                for d in await rows(Denial)
            },
        )
    return [
        _finding("casbin_rule", casbin),
        _finding("principals", principals),
        _finding("api_keys", keys),
        _finding("experts", experts),
        _finding("licenses", licenses),
        _finding("denials", denials),
    ]
