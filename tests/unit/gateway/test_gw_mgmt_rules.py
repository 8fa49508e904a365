"""Ownership, data-owner scoping of the ledger, and bad input on the management routes."""

from __future__ import annotations

from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from mgmt_helpers import is_openai_error, ledger_head, seq_of

Client = AsyncTestClient[Litestar]


async def test_owner_cannot_manage_another_owners_expert(gw_client: Client, gw_world: Any) -> None:
    admin, owner = gw_world.headers("admin"), gw_world.headers("owner-code")
    r = await gw_client.post("/v1/experts/news/licenses", json={"grantee": "app-1"}, headers=admin)
    assert r.status_code == 201, r.text
    news_license = r.json()["id"]
    url = gw_world.settings.database_url
    attacks = [
        ("GET", "/v1/experts/news/licenses", None),
        ("POST", "/v1/experts/news/licenses", {"grantee": "app-2"}),
        ("DELETE", f"/v1/experts/news/licenses/{news_license}", None),
        # the license of news under the path of the owner's own expert
        ("DELETE", f"/v1/experts/code/licenses/{news_license}", None),
        ("POST", "/v1/experts/news/denials", {"grantee": "app-1"}),
        ("POST", "/v1/experts/news/withdraw", None),
        ("POST", "/v1/experts/news/reinstate", None),
    ]
    for method, path, body in attacks:
        before = await ledger_head(url)
        r = await gw_client.request(method, path, json=body, headers=owner)
        assert r.status_code in (403, 404), (method, path, r.status_code, r.text)
        assert is_openai_error(r.json())
        assert await ledger_head(url) == before, (method, path)
    r = await gw_client.get("/v1/experts/news/licenses", headers=admin)
    (lic,) = [x for x in r.json()["licenses"] if x["id"] == news_license]
    assert lic["revoked_at"] is None
    r = await gw_client.get("/v1/experts", headers=owner)
    news = next(e for e in r.json()["data"] if e["id"] == "news")
    assert news["status"] == "active"


async def test_data_owner_sees_only_records_about_own_experts(
    gw_client: Client, gw_world: Any
) -> None:
    admin, owner = gw_world.headers("admin"), gw_world.headers("owner-code")
    for expert in ("code", "news"):
        r = await gw_client.post(
            f"/v1/experts/{expert}/licenses", json={"grantee": "app-1"}, headers=admin
        )
        assert r.status_code == 201
    r = await gw_client.post(
        "/v1/completions",
        json={"model": "tiny-flexolmo", "prompt": "hi", "max_tokens": 3, "temperature": 0},
        headers=gw_world.headers("app-1"),
    )
    assert r.status_code == 200, r.text
    r = await gw_client.get("/v1/audit/records?limit=1000&expert_mode=any", headers=owner)
    assert r.status_code == 200, r.text
    records = r.json()["records"]
    assert records, "the owner sees the records about code"
    for rec in records:
        p = rec["payload"]
        if rec["kind"].startswith("inference"):
            # audit.query's owner view: redacted to the owner's experts, no text, no others
            assert p["redacted"] is True and set(p["experts"]) == {"code"}, rec
            assert p["experts"]["code"]["allowed"] is True
        else:
            assert p.get("expert") == "code", rec
    kinds = {rec["kind"] for rec in records}
    assert "inference" in kinds and "license.granted" in kinds
    # the officer sees more (the news grant, principals, keys)
    r = await gw_client.get(
        "/v1/audit/records?limit=1000", headers=gw_world.headers("compliance_officer")
    )
    assert len(r.json()["records"]) > len(records)
    # filters cannot widen the scope
    r = await gw_client.get("/v1/audit/records?expert=news&expert_mode=any", headers=owner)
    assert all("code" in str(rec["payload"]) for rec in r.json()["records"]), (
        "news-only records leaked"
    )
    news_seq = await seq_of(gw_world.settings.database_url, "license.granted", "news")
    for path in (f"/v1/audit/records/{news_seq}", f"/v1/audit/records/{news_seq}/proof"):
        r = await gw_client.get(path, headers=owner)
        assert r.status_code == 404 and is_openai_error(r.json()), r.text
    r = await gw_client.get(f"/v1/audit/records/{news_seq}", headers=gw_world.headers("officer"))
    assert r.status_code == 200 and r.json()["seq"] == news_seq
    # usage: only own experts
    r = await gw_client.get("/v1/audit/usage?by=expert", headers=owner)
    assert r.status_code == 200, r.text
    assert {row["key"] for row in r.json()["rows"]} <= {"code"}
    r = await gw_client.get("/v1/audit/usage?by=expert&expert=news", headers=owner)
    assert r.json()["rows"] == []
    r = await gw_client.get("/v1/audit/usage?by=expert", headers=gw_world.headers("officer"))
    assert "public" in {row["key"] for row in r.json()["rows"]}


async def test_record_pagination_cursor(gw_client: Client, gw_world: Any) -> None:
    officer = gw_world.headers("officer")
    seen: list[int] = []
    after = None
    while True:
        q = "limit=2" + ("" if after is None else f"&after={after}")
        r = await gw_client.get(f"/v1/audit/records?{q}", headers=officer)
        assert r.status_code == 200, r.text
        seen += [rec["seq"] for rec in r.json()["records"]]
        after = r.json()["next_after"]
        if after is None:
            break
    assert seen == list(range(1, len(seen) + 1)) and len(seen) > 4


BAD: list[tuple[str, str, str, Any, int, str | None]] = [
    # who, method, path, body, status, param (None: any)
    ("admin", "POST", "/v1/experts/code/licenses", {"grantee": "app-1", "extra": 1}, 400, None),
    ("admin", "POST", "/v1/experts/code/licenses", {"grantee": "no such!"}, 400, "grantee"),
    ("admin", "POST", "/v1/experts/code/licenses", {"grantee": "nobody"}, 404, None),
    ("admin", "POST", "/v1/experts/code/licenses", {}, 400, None),
    ("admin", "POST", "/v1/experts/code/licenses", [1, 2], 400, None),
    (
        "admin",
        "POST",
        "/v1/experts/code/licenses",
        {"grantee": "app-1", "expires_at": "2026-01-01T00:00:00"},
        400,
        None,
    ),
    (
        "admin",
        "POST",
        "/v1/experts/code/licenses",
        {
            "grantee": "app-1",
            "valid_from": "2030-01-02T00:00:00Z",
            "expires_at": "2030-01-01T00:00:00Z",
        },
        400,
        "expires_at",
    ),
    (
        "admin",
        "POST",
        "/v1/experts/code/licenses",
        {"grantee": "app-1", "purposes": ["A B"]},
        400,
        None,
    ),
    ("admin", "POST", "/v1/experts/nosuch/licenses", {"grantee": "app-1"}, 404, None),
    ("admin", "DELETE", "/v1/experts/code/licenses/lic_nosuch", None, 404, None),
    ("admin", "POST", "/v1/experts/code/denials", {"grantee": 7}, 400, None),
    ("admin", "POST", "/v1/experts/code/reinstate", None, 409, None),
    ("admin", "POST", "/v1/admin/principals", {"id": "x", "roles": ["wizard"]}, 400, "roles"),
    ("admin", "POST", "/v1/admin/principals", {"id": "x", "roles": []}, 400, None),
    ("admin", "POST", "/v1/admin/principals", {"id": "app-1", "roles": ["application"]}, 409, None),
    ("admin", "POST", "/v1/admin/principals/nobody/keys", None, 404, None),
    ("admin", "POST", "/v1/admin/principals/app-1/keys", {"rpm": 0}, 400, None),
    ("admin", "POST", "/v1/admin/principals/app-1/keys", {"expires_in_days": -1}, 400, None),
    ("admin", "DELETE", "/v1/admin/keys/0000000000000000", None, 404, None),
    ("admin", "PUT", "/v1/admin/keys/0000000000000000/limits", {"rpm": 5}, 404, None),
    ("admin", "GET", "/v1/admin/keys/0000000000000000/limits", None, 404, None),
    ("officer", "GET", "/v1/audit/records?limit=5000", None, 400, None),
    ("officer", "GET", "/v1/audit/records?limit=0", None, 400, None),
    ("officer", "GET", "/v1/audit/records?bogus=1", None, 400, None),
    ("officer", "GET", "/v1/audit/records?since=yesterday", None, 400, None),
    ("officer", "GET", "/v1/audit/records?status=great", None, 400, None),
    ("officer", "GET", "/v1/audit/records?after=-1", None, 400, None),
    ("officer", "GET", "/v1/audit/records?kind=a&kind=b", None, 400, None),
    ("officer", "GET", "/v1/audit/records/999999", None, 404, None),
    ("officer", "GET", "/v1/audit/records/abc", None, 404, None),  # no such route
    ("officer", "GET", "/v1/audit/export?format=xml", None, 400, None),
    ("officer", "GET", "/v1/audit/export?since=2030-01-01&until=2029-01-01", None, 400, None),
    ("officer", "GET", "/v1/audit/usage?by=planet", None, 400, None),
    ("officer", "GET", "/v1/audit/usage?bogus=1", None, 400, None),
]


async def test_bad_input_is_a_4xx_in_openai_shape_and_appends_nothing(
    gw_client: Client, gw_world: Any
) -> None:
    url = gw_world.settings.database_url
    for who, method, path, body, status, param in BAD:
        before = await ledger_head(url)
        r = await gw_client.request(method, path, json=body, headers=gw_world.headers(who))
        assert r.status_code == status, (method, path, body, r.status_code, r.text)
        assert is_openai_error(r.json()), r.text
        if param is not None:
            assert r.json()["error"]["param"] == param, r.text
        assert await ledger_head(url) == before, (method, path, body)
    r = await gw_client.post(
        "/v1/experts/code/licenses",
        content=b'{"grantee": ',
        headers={**gw_world.headers("admin"), "content-type": "application/json"},
    )
    assert r.status_code == 400 and is_openai_error(r.json()), r.text
