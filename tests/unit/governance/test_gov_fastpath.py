"""The compiled allowed-set path gives Casbin's answers, and never allows without a grant.

Random policies (principals in groups and roles, nested groups, `*` grantees, purposes,
windows, allow and deny rules, withdrawals) are loaded into a plain pycasbin enforcer with
the project's model file; every (principal, expert, purpose, time) is then decided both by
`enforce` and by CompiledPolicy. A second property checks the answers and the reasons
against a naive reading of the rules that shares no code with either.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from governance import decisions, policy
from governance.decisions import CompiledPolicy

EXPERTS = ["e0", "e1", "e2", "e3"]
PRINCIPALS = ["u0", "u1", "u2", "u3"]
GROUPS = ["group:g0", "group:g1"]
ROLES = ["role:application", "role:data_owner"]
PURPOSES = ["general", "research", "ads"]
TIMES = [
    policy.TIME_MIN,
    "2026-01-01T00:00:00.000000Z",
    "2026-06-01T00:00:00.000000Z",
    "2027-01-01T00:00:00.000000Z",
    policy.TIME_MAX,
]
QUERY_TIMES = [
    "2025-12-31T23:59:59.999999Z",
    "2026-01-01T00:00:00.000000Z",
    "2026-03-01T00:00:00.000000Z",
    "2026-06-01T00:00:00.000000Z",
    "2026-12-31T23:59:59.999999Z",
    "2027-01-01T00:00:00.000000Z",
    "2030-01-01T00:00:00.000000Z",
]

subjects = st.sampled_from(["*", *PRINCIPALS, *GROUPS, *ROLES])
purpose_sets = st.one_of(
    st.just("*"),
    st.lists(st.sampled_from(PURPOSES), min_size=1, max_size=3, unique=True).map(
        lambda ps: "|".join(sorted(ps))
    ),
)


@st.composite
def windows(draw: st.DrawFn) -> tuple[str, str]:
    a, b = sorted(draw(st.lists(st.sampled_from(TIMES), min_size=2, max_size=2, unique=True)))
    return a, b


@st.composite
def p_rules(draw: st.DrawFn) -> list[str]:
    since, until = draw(windows())
    return [
        draw(subjects),
        draw(st.sampled_from(EXPERTS)),
        draw(purpose_sets),
        since,
        until,
        draw(st.sampled_from(["allow", "allow", "deny"])),
    ]


@dataclass
class RandomPolicy:
    p: list[list[str]]
    g: list[list[str]]
    g2: list[list[str]]


@st.composite
def random_policies(draw: st.DrawFn) -> RandomPolicy:
    p = draw(st.lists(p_rules(), max_size=25, unique_by=tuple))
    member = st.tuples(st.sampled_from(PRINCIPALS), st.sampled_from(GROUPS + ROLES))
    nested = st.tuples(st.sampled_from(GROUPS), st.sampled_from(GROUPS + ROLES))
    links = draw(st.lists(st.one_of(member, member, nested), max_size=8, unique=True))
    g = [list(link) for link in links if link[0] != link[1]]
    withdrawn = draw(st.lists(st.sampled_from(EXPERTS), max_size=2, unique=True))
    return RandomPolicy(p=p, g=g, g2=[[e, policy.WITHDRAWN] for e in withdrawn])


def _compile(rp: RandomPolicy) -> tuple[CompiledPolicy, object]:
    enforcer = policy.enforcer_from_rules(rp.p, rp.g, rp.g2)
    return CompiledPolicy(enforcer, EXPERTS), enforcer


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_policies())
def test_fast_path_equals_casbin_enforce(rp: RandomPolicy) -> None:
    compiled, enforcer = _compile(rp)
    for principal in PRINCIPALS:
        for purpose in PURPOSES:
            for t in QUERY_TIMES:
                allowed = set(compiled.decide(principal, purpose, t).allowed)
                expected = {e for e in EXPERTS if enforcer.enforce(principal, e, purpose, t)}  # type: ignore[attr-defined]
                assert allowed == expected, (principal, purpose, t)


def _naive_subjects(principal: str, g: list[list[str]]) -> set[str]:
    subs = {principal, "*"}
    changed = True
    while changed:
        changed = False
        for a, b in g:
            if a in subs and b not in subs:
                subs.add(b)
                changed = True
    return subs


@settings(max_examples=100, deadline=None)
@given(random_policies(), st.sampled_from(PRINCIPALS), st.sampled_from(PURPOSES))
def test_allowed_only_with_a_valid_grant_and_no_deny(
    rp: RandomPolicy, principal: str, purpose: str
) -> None:
    compiled, _ = _compile(rp)
    subs = _naive_subjects(principal, rp.g)
    withdrawn = {link[0] for link in rp.g2}
    for t in QUERY_TIMES:
        result = compiled.decide(principal, purpose, t)
        assert set(result.allowed) | set(result.excluded) == set(EXPERTS)
        assert not set(result.allowed) & set(result.excluded)
        for e in EXPERTS:
            mine = [
                r
                for r in rp.p
                if r[0] in subs and r[1] == e and (r[2] == "*" or purpose in r[2].split("|"))
            ]
            valid = [r for r in mine if r[3] <= t < r[4]]
            granted = any(r[5] == "allow" for r in valid)
            denied = any(r[5] == "deny" for r in valid)
            if e in result.allowed:
                assert granted and not denied and e not in withdrawn
                continue
            reason = result.excluded[e]
            if e in withdrawn:
                assert reason == decisions.WITHDRAWN_REASON
            elif denied:
                assert reason == decisions.DENIED
            else:
                assert not granted
                allows = [r for r in mine if r[5] == "allow"]
                if any(r[3] > t for r in allows):
                    assert reason == decisions.NOT_YET_VALID
                elif allows:
                    assert reason == decisions.EXPIRED
                else:
                    assert reason == decisions.NO_LICENSE


@given(random_policies(), st.sampled_from(PRINCIPALS), st.sampled_from(PURPOSES))
@settings(max_examples=40, deadline=None)
def test_memoised_answers_equal_fresh_ones(rp: RandomPolicy, principal: str, purpose: str) -> None:
    """The per-(principal, purpose) memo with its validity interval never serves a stale set."""
    warm, _ = _compile(rp)
    for t in QUERY_TIMES + list(reversed(QUERY_TIMES)):
        cold, _ = _compile(rp)
        assert warm.decide(principal, purpose, t) == cold.decide(principal, purpose, t)


@given(random_policies(), st.data())
@settings(max_examples=40, deadline=None)
def test_narrowing_only_removes(rp: RandomPolicy, data: st.DataObject) -> None:
    compiled, _ = _compile(rp)
    base = compiled.decide("u0", "general", QUERY_TIMES[2])
    chosen = data.draw(st.lists(st.sampled_from(EXPERTS), unique=True))
    mode = data.draw(st.sampled_from(["exclude", "only"]))
    narrowed = decisions.narrow(
        base, decisions.parse_narrowing({mode: chosen}, EXPERTS), compiled.experts
    )
    assert set(narrowed.allowed) <= set(base.allowed)
    for e, reason in base.excluded.items():
        assert narrowed.excluded[e] == reason  # the policy's reason wins
    for e in set(base.allowed) - set(narrowed.allowed):
        assert narrowed.excluded[e] == decisions.CALLER_EXCLUDED
