"""Every management route x every role -> the expected status, through HTTP (in-process).

One fresh database per role: the calls run in an order in which each allowed write succeeds
(grant, then revoke that license, ...), so a status other than expected is the route's fault.
Forbidden calls must leave the ledger as it was.
"""

from __future__ import annotations

from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from mgmt_helpers import checkpoint, is_openai_error, ledger_head, seq_of

from audit.export import verify_export
from audit.signing import trusted_public_keys

ROLES = ["application", "data_owner", "compliance_officer", "admin", None]

# (name, method, path, body) in the order they run; {lic}, {seq}, {key} filled in on the way.
CALLS: list[tuple[str, str, str, Any]] = [
    ("experts", "GET", "/v1/experts", None),
    ("licenses.list", "GET", "/v1/experts/code/licenses", None),
    ("licenses.grant", "POST", "/v1/experts/code/licenses", {"grantee": "app-2"}),
    ("licenses.revoke", "DELETE", "/v1/experts/code/licenses/{lic}", None),
    ("denials", "POST", "/v1/experts/code/denials", {"grantee": "app-2"}),
    ("withdraw", "POST", "/v1/experts/code/withdraw", None),
    ("reinstate", "POST", "/v1/experts/code/reinstate", None),
    ("audit.records", "GET", "/v1/audit/records", None),
    ("audit.record", "GET", "/v1/audit/records/{seq}", None),
    ("audit.proof", "GET", "/v1/audit/records/{seq}/proof", None),
    ("audit.checkpoint", "GET", "/v1/audit/checkpoints/latest", None),
    ("audit.verify", "GET", "/v1/audit/verify", None),
    ("audit.usage", "GET", "/v1/audit/usage", None),
    ("audit.export", "GET", "/v1/audit/export?format=jsonl", None),
    ("admin.principal", "POST", "/v1/admin/principals", {"id": "app-9", "roles": ["application"]}),
    ("admin.key", "POST", "/v1/admin/principals/app-9/keys", {"rpm": 5}),
    ("admin.limits.get", "GET", "/v1/admin/keys/{key}/limits", None),
    ("admin.limits.put", "PUT", "/v1/admin/keys/{key}/limits", {"tpm": 1000}),
    ("admin.revoke", "DELETE", "/v1/admin/keys/{key}", None),
    ("metrics", "GET", "/metrics", None),
]

OWNER_OK = {
    "experts": 200,
    "licenses.list": 200,
    "licenses.grant": 201,
    "licenses.revoke": 200,
    "denials": 201,
    "withdraw": 200,
    "reinstate": 200,
    "audit.records": 200,
    "audit.record": 200,
    "audit.proof": 200,
    "audit.checkpoint": 200,
    "audit.usage": 200,
}
EXPECTED: dict[str | None, dict[str, int]] = {
    "application": {"experts": 200},
    "data_owner": OWNER_OK,
    "compliance_officer": {
        "experts": 200,
        "audit.records": 200,
        "audit.record": 200,
        "audit.proof": 200,
        "audit.checkpoint": 200,
        "audit.verify": 200,
        "audit.usage": 200,
        "audit.export": 200,
    },
    "admin": {
        "experts": 200,
        "licenses.list": 200,
        "licenses.grant": 201,
        "licenses.revoke": 200,
        "denials": 201,
        "withdraw": 200,
        "reinstate": 200,
        "admin.principal": 201,
        "admin.key": 201,
        "admin.limits.get": 200,
        "admin.limits.put": 200,
        "admin.revoke": 200,
        "metrics": 200,
    },
}


@pytest.mark.parametrize("role", ROLES, ids=[r or "anonymous" for r in ROLES])
async def test_every_route_every_role(
    role: str | None, gw_client: AsyncTestClient[Litestar], gw_world: Any
) -> None:
    sm = gw_world.settings.database_url
    await checkpoint(sm, gw_world.settings.home)
    fill = {
        "seq": str(await seq_of(sm, "expert.registered", "code")),
        "lic": "lic_none",
        "key": "0" * 16,
    }
    # A license of `code` and a key that exist, for roles that cannot create their own.
    admin = gw_world.headers("admin")
    r = await gw_client.post("/v1/experts/code/licenses", json={"grantee": "app-1"}, headers=admin)
    assert r.status_code == 201, r.text
    fill["lic"] = r.json()["id"]
    r = await gw_client.post("/v1/admin/principals/app-2/keys", headers=admin)
    assert r.status_code == 201, r.text
    fill["key"] = r.json()["key_id"]

    headers = {} if role is None else gw_world.headers(role)
    expected = {} if role is None else EXPECTED[role]
    seen: dict[str, int] = {}
    for name, method, path, body in CALLS:
        before = await ledger_head(sm)
        url = path.format(**fill)
        r = await gw_client.request(method, url, json=body, headers=headers)
        seen[name] = r.status_code
        want = expected.get(name, 401 if role is None else 403)
        assert r.status_code == want, f"{role} {method} {url}: {r.status_code} {r.text[:300]}"
        if r.status_code >= 400:
            assert is_openai_error(r.json()), r.text
            assert await ledger_head(sm) == before, f"{name} refused but appended"
        if name == "licenses.grant" and r.status_code == 201:
            fill["lic"] = r.json()["id"]
        if name == "admin.key" and r.status_code == 201:
            fill["key"] = r.json()["key_id"]
            assert r.json()["key"].startswith("fg_")
            assert r.json()["limits"]["rpm"] == 5
        if name == "audit.export" and r.status_code == 200:
            assert r.headers["content-type"].startswith("application/x-ndjson")
            report = verify_export(
                r.text.splitlines(keepends=True),
                public_keys=trusted_public_keys(gw_world.settings.home),
            )
            assert report.ok, report
        if name == "metrics" and r.status_code == 200:
            assert r.headers["content-type"].startswith("text/plain")
    assert seen.keys() == {c[0] for c in CALLS}
