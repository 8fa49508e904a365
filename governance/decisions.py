"""The allowed-expert set: Casbin's answer, precomputed so a request pays microseconds.

A plain `enforce` walks every `p` rule with a Python expression evaluator (~140 ms per call
at 10,000 rules here), and an allowed set needs one call per expert. `CompiledPolicy` reads
the same rules and role links out of the enforcer once per policy version and indexes them by
subject, expert and purpose; for each such triple it sweeps the rules' validity windows into
a step function of time (`_Timeline`), so a decision costs a few dict lookups and one
bisection per (caller subject, expert), whatever the number of licenses. It reproduces the
model's matcher exactly (the property tests compare it with `enforce` on random policies):

    allowed(sub, e, purpose, t) =
        e is not withdrawn (g2 link to status:withdrawn)
        and some allow rule with p.sub in subjects(sub), p.obj == e, purpose in p.act,
            p.since <= t < p.until
        and no deny rule matching the same way

where subjects(sub) = {sub, "*"} plus every subject the `g` role manager links sub to (within
its hierarchy limit). On top of the boolean it says why an expert is excluded:
withdrawn > denied > not-yet-valid > expired > no-license, and caller-excluded for an expert the
policy allows but the caller's own narrowing removes (callers narrow, never widen).

Results are memoised per (subjects, purpose) with the time interval over which they hold (the
nearest rule boundaries around `at`), so repeated requests cost one dict lookup.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from governance.errors import InvalidNarrowing
from governance.names import ANY, GROUP_PREFIX, PURPOSE_SEPARATOR, ROLE_PREFIX, check_purpose
from governance.policy import (
    ALLOW,
    DENY,
    TIME_MAX,
    TIME_MIN,
    WITHDRAWN,
    encode_time,
)

NO_LICENSE = "no-license"
DENIED = "denied"
EXPIRED = "expired"
NOT_YET_VALID = "not-yet-valid"
WITHDRAWN_REASON = "withdrawn"
CALLER_EXCLUDED = "caller-excluded"
REASONS = (NO_LICENSE, DENIED, EXPIRED, NOT_YET_VALID, WITHDRAWN_REASON, CALLER_EXCLUDED)

Narrowing = Mapping[str, Sequence[str]]
_MEMO_LIMIT = 65_536


class AllowedSet(NamedTuple):
    """`allowed` in router-row order; `excluded` maps every other expert to its reason."""

    allowed: tuple[str, ...]
    excluded: dict[str, str]


# Flags of a timeline segment: some allow / deny rule is active, some allow rule starts later,
# some allow rule has ended. OR-ing them over the caller's subjects gives the decision.
_ALLOW, _DENY, _FUTURE, _PAST = 1, 2, 4, 8
_WILDCARD = "*"  # key of the timeline for purposes no rule names explicitly


@dataclass(frozen=True, slots=True)
class _Rule:
    purposes: frozenset[str] | None  # None: every purpose
    since: str
    until: str
    deny: bool


class _Timeline:
    """The flags of a set of rules as a step function of time, for bisection.

    `flags[i]` holds on [bounds[i-1], bounds[i]) (the first before bounds[0], the last from
    bounds[-1] on), so a lookup costs O(log rules) however many rules a subject has.
    """

    __slots__ = ("bounds", "flags")

    def __init__(self, rules: Iterable[_Rule]) -> None:
        starts: dict[str, int] = {}
        ends: dict[str, int] = {}
        deny_starts: dict[str, int] = {}
        deny_ends: dict[str, int] = {}
        future = 0
        for r in rules:
            if r.deny:
                deny_starts[r.since] = deny_starts.get(r.since, 0) + 1
                deny_ends[r.until] = deny_ends.get(r.until, 0) + 1
            else:
                starts[r.since] = starts.get(r.since, 0) + 1
                ends[r.until] = ends.get(r.until, 0) + 1
                future += 1
        self.bounds = tuple(sorted({*starts, *ends, *deny_starts, *deny_ends}))
        allow = deny = past = 0
        flags = [_FUTURE if future else 0]
        for b in self.bounds:  # sweep: rules start at `since` and stop at `until`
            allow += starts.get(b, 0) - ends.get(b, 0)
            future -= starts.get(b, 0)
            past += ends.get(b, 0)
            deny += deny_starts.get(b, 0) - deny_ends.get(b, 0)
            flags.append(
                (_ALLOW if allow else 0)
                | (_DENY if deny else 0)
                | (_FUTURE if future else 0)
                | (_PAST if past else 0)
            )
        self.flags = tuple(flags)

    def at(self, t: str) -> tuple[int, str, str]:
        """(flags, start, end) of the segment holding time `t`."""
        i = bisect_right(self.bounds, t)
        lo = self.bounds[i - 1] if i else TIME_MIN
        hi = self.bounds[i] if i < len(self.bounds) else TIME_MAX
        return self.flags[i], lo, hi


def _timelines(rules: Sequence[_Rule]) -> dict[str, _Timeline]:
    """Per purpose named by some rule, the timeline of the rules that cover it; `*` for others."""
    named = {p for r in rules if r.purposes is not None for p in r.purposes}
    out = {p: _Timeline(r for r in rules if r.purposes is None or p in r.purposes) for p in named}
    everyone = [r for r in rules if r.purposes is None]
    if everyone:
        out[_WILDCARD] = _Timeline(everyone)
    return out


class CompiledPolicy:
    """An index of one enforcer's `p`, `g` and `g2` rules over a fixed list of experts."""

    def __init__(self, enforcer: Any, experts: Sequence[str]) -> None:
        model = enforcer.get_model().model
        self.experts: tuple[str, ...] = tuple(experts)
        self._known = frozenset(self.experts)
        grouped: dict[str, dict[str, list[_Rule]]] = {}
        for sub, obj, act, since, until, eft in model["p"]["p"].policy:
            # Casbin ignores other effects (indeterminate); an empty window never matches.
            if obj not in self._known or eft not in (ALLOW, DENY) or not since < until:
                continue
            purposes = None if act == ANY else frozenset(act.split(PURPOSE_SEPARATOR))
            rule = _Rule(purposes, since, until, eft == DENY)
            grouped.setdefault(sub, {}).setdefault(obj, []).append(rule)
        self._index: dict[str, dict[str, dict[str, _Timeline]]] = {
            sub: {obj: _timelines(rules) for obj, rules in by_obj.items()}
            for sub, by_obj in grouped.items()
        }
        self._rm = enforcer.get_named_role_manager("g")
        self._depth = int(getattr(self._rm, "max_hierarchy_level", 10))
        g2 = enforcer.get_named_role_manager("g2")
        self.withdrawn = frozenset(e for e in self.experts if g2.has_link(e, WITHDRAWN))
        self._closure: dict[str, frozenset[str]] = {}
        self._memo: dict[tuple[Any, ...], tuple[str, str, AllowedSet]] = {}

    # -- subjects -------------------------------------------------------------------------

    def subjects(self, name: str) -> frozenset[str]:
        """`name` and every subject `g` links it to, as Casbin's role manager walks them."""
        cached = self._closure.get(name)
        if cached is not None:
            return cached
        seen = {name}
        frontier = [name]
        for _ in range(self._depth - 1):
            nxt = []
            for n in frontier:
                for role in self._rm.get_roles(n):
                    if role not in seen:
                        seen.add(role)
                        nxt.append(role)
            if not nxt:
                break
            frontier = nxt
        result = frozenset(seen)
        if len(self._closure) < _MEMO_LIMIT:
            self._closure[name] = result
        return result

    # -- decisions ------------------------------------------------------------------------

    def decide(
        self,
        principal: str,
        purpose: str,
        at: datetime | str | None = None,
        *,
        extra_subjects: Iterable[str] = (),
    ) -> AllowedSet:
        """The policy's allowed set for a principal (plus subjects its token carries)."""
        t = at if isinstance(at, str) else encode_time(at or datetime.now(UTC), TIME_MIN)
        extra = tuple(sorted(set(extra_subjects)))
        key = (principal, extra, purpose)
        hit = self._memo.get(key)
        if hit is not None and hit[0] <= t < hit[1]:
            return hit[2]
        subs = set(self.subjects(principal))
        for s in extra:
            subs |= self.subjects(s)
        subs.add(ANY)
        lo, hi, result = self._compute(subs, purpose, t)
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = (lo, hi, result)
        return result

    def _compute(self, subs: set[str], purpose: str, t: str) -> tuple[str, str, AllowedSet]:
        lo, hi = TIME_MIN, TIME_MAX
        per_sub = [self._index[s] for s in subs if s in self._index]
        allowed: list[str] = []
        excluded: dict[str, str] = {}
        for e in self.experts:
            if e in self.withdrawn:
                excluded[e] = WITHDRAWN_REASON
                continue
            flags = 0
            for by_obj in per_sub:
                by_purpose = by_obj.get(e)
                if by_purpose is None:
                    continue
                timeline = by_purpose.get(purpose) or by_purpose.get(_WILDCARD)
                if timeline is None:
                    continue
                f, start, end = timeline.at(t)
                flags |= f
                # The answer can only change at a rule boundary: keep the nearest ones.
                lo = max(lo, start)
                hi = min(hi, end)
            if flags & _DENY:
                excluded[e] = DENIED
            elif flags & _ALLOW:
                allowed.append(e)
            elif flags & _FUTURE:
                excluded[e] = NOT_YET_VALID
            elif flags & _PAST:
                excluded[e] = EXPIRED
            else:
                excluded[e] = NO_LICENSE
        return lo, hi, AllowedSet(tuple(allowed), excluded)


def identity_subjects(roles: Iterable[str], groups: Iterable[str]) -> list[str]:
    """Policy subjects of roles and groups an identity carries (e.g. from a JWT)."""
    return [ROLE_PREFIX + r for r in roles] + [GROUP_PREFIX + g for g in groups]


def parse_narrowing(narrowing: Narrowing | None, experts: Sequence[str]) -> frozenset[str] | None:
    """The experts a caller's narrowing keeps (None: no narrowing); unknown ids are errors."""
    if narrowing is None:
        return None
    if not isinstance(narrowing, Mapping) or len(narrowing) != 1:
        raise InvalidNarrowing('experts must be {"exclude": [ids]} or {"only": [ids]}')
    ((mode, ids),) = narrowing.items()
    if mode not in ("exclude", "only") or isinstance(ids, str) or not isinstance(ids, Sequence):
        raise InvalidNarrowing('experts must be {"exclude": [ids]} or {"only": [ids]}')
    known = set(experts)
    for i in ids:
        if not isinstance(i, str) or i not in known:
            raise InvalidNarrowing(f"unknown expert {i!r} in experts.{mode}")
    chosen = frozenset(ids)
    return chosen if mode == "only" else frozenset(known - chosen)


def narrow(result: AllowedSet, keep: frozenset[str] | None, order: Sequence[str]) -> AllowedSet:
    """Apply a caller's narrowing: it removes experts, it never adds one.

    Returns a fresh AllowedSet (the memoised one is shared) with `excluded` in router order.
    """
    if keep is None:
        return AllowedSet(result.allowed, dict(result.excluded))
    allowed = tuple(e for e in result.allowed if e in keep)
    excluded: dict[str, str] = {}
    for e in order:
        reason = result.excluded.get(e)
        if reason is not None:
            excluded[e] = reason
        elif e not in keep:
            excluded[e] = CALLER_EXCLUDED
    return AllowedSet(allowed, excluded)


def decide(
    compiled: CompiledPolicy,
    principal: str,
    purpose: str,
    at: datetime | None = None,
    narrowing: Narrowing | None = None,
    *,
    extra_subjects: Iterable[str] = (),
) -> AllowedSet:
    """Validate the purpose and narrowing, then compute and narrow the allowed set."""
    check_purpose(purpose)
    keep = parse_narrowing(narrowing, compiled.experts)
    result = compiled.decide(principal, purpose, at, extra_subjects=extra_subjects)
    return narrow(result, keep, compiled.experts)
