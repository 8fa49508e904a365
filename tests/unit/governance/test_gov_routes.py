"""Route authorisation through the same Casbin model (p2 rules), per DESIGN.md's route table."""

from __future__ import annotations

import pytest

from governance import policy
from governance.store import PolicySnapshot

APP, OWNER, OFFICER, ADMIN = "application", "data_owner", "compliance_officer", "admin"
EVERYONE = [APP, OWNER, OFFICER, ADMIN]

# method, path, roles that may call it (every other role gets 403)
ROUTES: list[tuple[str, str, list[str]]] = [
    ("GET", "/v1/models", [APP]),
    ("POST", "/v1/completions", [APP]),
    ("POST", "/v1/chat/completions", [APP]),
    ("GET", "/v1/experts", EVERYONE),
    ("GET", "/v1/experts/code/licenses", [OWNER, ADMIN]),
    ("POST", "/v1/experts/code/licenses", [OWNER, ADMIN]),
    ("DELETE", "/v1/experts/code/licenses/lic_0123", [OWNER, ADMIN]),
    ("POST", "/v1/experts/code/denials", [OWNER, ADMIN]),
    ("POST", "/v1/experts/code/withdraw", [OWNER, ADMIN]),
    ("POST", "/v1/experts/code/reinstate", [OWNER, ADMIN]),
    ("GET", "/v1/audit/records", [OFFICER, OWNER]),
    ("GET", "/v1/audit/records/42", [OFFICER, OWNER]),
    ("GET", "/v1/audit/records/42/proof", [OFFICER, OWNER]),
    ("GET", "/v1/audit/checkpoints/latest", [OFFICER, OWNER]),
    ("GET", "/v1/audit/verify", [OFFICER]),
    ("GET", "/v1/audit/usage", [OFFICER, OWNER]),
    ("GET", "/v1/audit/export", [OFFICER]),
    ("POST", "/v1/admin/principals", [ADMIN]),
    ("POST", "/v1/admin/principals/app-1/keys", [ADMIN]),
    ("DELETE", "/v1/admin/keys/0123456789abcdef", [ADMIN]),
    # nothing outside the table, and patterns match whole segments only
    ("GET", "/v1/admin/principals", []),
    ("DELETE", "/v1/experts/code/licenses", []),
    ("GET", "/v1/models/", []),
    ("GET", "/v1/modelsX", []),
    ("GET", "/v1/experts/a/b/licenses", []),
    ("GET", "/v1/audit/verify/../export", []),
    ("POST", "/v1/admin/principals/app-1/keys/extra", []),
    ("GET", "/v2/models", []),
]


@pytest.fixture(scope="module")
def snapshot() -> PolicySnapshot:
    enforcer = policy.enforcer_from_rules(routes=policy.route_rules())
    return PolicySnapshot(0, [], enforcer)


@pytest.mark.parametrize(("method", "path", "allowed"), ROUTES)
def test_route_table(snapshot: PolicySnapshot, method: str, path: str, allowed: list[str]) -> None:
    for role in EVERYONE:
        assert snapshot.authorize([role], method, path) == (role in allowed), role
    # several roles: any one suffices; none: only public routes
    assert snapshot.authorize(EVERYONE, method, path) == bool(allowed)
    assert snapshot.authorize([], method, path) is False


def test_health_is_public_and_methods_are_exact(snapshot: PolicySnapshot) -> None:
    assert snapshot.authorize([], "GET", "/healthz")
    assert snapshot.authorize([], "get", "/readyz")
    assert not snapshot.authorize([], "POST", "/healthz")
    assert snapshot.authorize([APP], "post", "/v1/completions")  # method case is folded
    assert not snapshot.authorize([APP], "GET", "/v1/completions")
    assert not snapshot.authorize(["root"], "GET", "/v1/models")  # unknown roles get nothing
