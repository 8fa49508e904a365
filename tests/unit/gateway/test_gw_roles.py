"""Every route of the gateway core x every role (and no / a bad / a revoked credential)."""

from __future__ import annotations

from typing import Any

import pytest
from gw_helpers import MODEL, assert_error, chat, completion
from litestar import Litestar
from litestar.testing import AsyncTestClient

from governance.identity import Identity
from governance.keys import revoke_key

ROLES = ["application", "data_owner", "compliance_officer", "admin"]

# method, path, body, roles that get 200 (every other role: 403)
ROUTES: list[tuple[str, str, Any, set[str]]] = [
    ("GET", "/healthz", None, set(ROLES)),
    ("GET", "/readyz", None, set(ROLES)),
    ("GET", "/v1/models", None, {"application"}),
    ("POST", "/v1/completions", completion(max_tokens=2), {"application"}),
    ("POST", "/v1/chat/completions", chat(max_tokens=2), {"application"}),
    ("POST", "/tokenize", {"prompt": "hello", "model": MODEL}, {"application"}),
    ("POST", "/detokenize", {"tokens": [264, 80]}, {"application"}),
]
PUBLIC = {"/healthz", "/readyz"}


async def _call(
    client: AsyncTestClient[Litestar], method: str, path: str, body: Any, headers: dict[str, str]
) -> Any:
    if method == "GET":
        return await client.get(path, headers=headers)
    return await client.post(path, json=body, headers=headers)


async def test_every_route_every_role(gw_client: AsyncTestClient[Litestar], gw_world: Any) -> None:
    for method, path, body, allowed in ROUTES:
        for role in ROLES:
            r = await _call(gw_client, method, path, body, gw_world.headers(role))
            if role in allowed:
                assert r.status_code == 200, (method, path, role, r.text)
            else:
                assert_error(r, 403)
        r = await _call(gw_client, method, path, body, {})
        if path in PUBLIC:
            assert r.status_code == 200
        else:
            err = assert_error(r, 401)
            assert err["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        for bad in ("Bearer fg_0123456789abcdef_" + "x" * 43, "Basic abc", "Bearer nonsense"):
            r = await _call(gw_client, method, path, body, {"Authorization": bad})
            assert r.status_code == (200 if path in PUBLIC else 401), (path, bad)


@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions"])
async def test_revoked_key_is_refused_on_the_next_request(
    gw_client: AsyncTestClient[Litestar], gw_world: Any, path: str
) -> None:
    token = gw_world.keys["app-2"]
    headers = {"Authorization": f"Bearer {token}"}
    body = completion(max_tokens=1)
    r = await _call(gw_client, "GET" if path == "/v1/models" else "POST", path, body, headers)
    assert r.status_code == 200, r.text
    async with gw_world.sm() as s:
        await revoke_key(s, actor=Identity.operator(), key_id=token.split("_")[1])
    r = await _call(gw_client, "GET" if path == "/v1/models" else "POST", path, body, headers)
    assert_error(r, 401)
