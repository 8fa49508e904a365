"""Management bodies are decoded as strictly as inference bodies: `"5"` is not 5, `"x"` is
not a list; each is a 400 naming the field, and nothing is written."""

from __future__ import annotations

from typing import Any

import pytest
from gw_helpers import assert_error
from litestar.testing import AsyncTestClient
from mgmt_helpers import ledger_head

from gateway.bodies import optional_body, strict_body
from gateway.schemas.governance import KeyIn

Client = AsyncTestClient[Any]

BAD: list[tuple[str, str, str, Any, str]] = [
    ("owner", "POST", "/v1/experts/code/licenses", {"grantee": 5}, "grantee"),
    (
        "owner",
        "POST",
        "/v1/experts/code/licenses",
        {"grantee": "app-2", "purposes": "x"},
        "purposes",
    ),
    ("owner", "POST", "/v1/experts/code/denials", {"grantee": ["app-2"]}, "grantee"),
    ("admin", "POST", "/v1/admin/principals", {"id": "app-9", "roles": "application"}, "roles"),
    ("admin", "POST", "/v1/admin/principals/app-2/keys", {"rpm": "5"}, "rpm"),
    (
        "admin",
        "POST",
        "/v1/admin/principals/app-2/keys",
        {"expires_in_days": 1.0},
        "expires_in_days",
    ),
    ("admin", "PUT", "/v1/admin/keys/{key}/limits", {"rpm": "5"}, "rpm"),
    ("admin", "PUT", "/v1/admin/keys/{key}/limits", {"max_parallel": True}, "max_parallel"),
]
WHO = {"owner": "data_owner", "admin": "admin"}


def _key_id(token: str) -> str:
    return token.split("_")[1]


@pytest.mark.parametrize(("who", "method", "path", "body", "param"), BAD)
async def test_a_wrong_type_is_a_400_naming_the_field_and_writes_nothing(
    gw_client: Client, gw_world: Any, who: str, method: str, path: str, body: Any, param: str
) -> None:
    url = gw_world.settings.database_url
    path = path.format(key=_key_id(gw_world.keys["app-1"]))
    before = await ledger_head(url)
    r = await gw_client.request(method, path, json=body, headers=gw_world.headers(WHO[who]))
    assert_error(r, 400, param)
    assert await ledger_head(url) == before  # no governance record: nothing was written


async def test_the_same_bodies_with_the_right_types_are_accepted(
    gw_client: Client, gw_world: Any
) -> None:
    admin = gw_world.headers("admin")
    key = _key_id(gw_world.keys["app-1"])
    r = await gw_client.put(f"/v1/admin/keys/{key}/limits", json={"rpm": 5}, headers=admin)
    assert r.status_code == 200 and r.json()["rpm"] == 5, r.text
    r = await gw_client.post(
        "/v1/admin/principals/app-2/keys", json={"expires_in_days": 1}, headers=admin
    )
    assert r.status_code == 201, r.text
    r = await gw_client.post("/v1/admin/principals/app-2/keys", headers=admin)  # no body
    assert r.status_code == 201, r.text
    r = await gw_client.post(
        "/v1/experts/code/licenses",
        json={"grantee": "app-2", "purposes": ["research"]},
        headers=gw_world.headers("data_owner"),
    )
    assert r.status_code == 201, r.text


class _Body:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    async def body(self) -> bytes:
        return self.raw


async def test_the_decoders_themselves() -> None:
    assert await optional_body(_Body(b""), KeyIn) is None  # type: ignore[arg-type]
    assert await optional_body(_Body(b"null"), KeyIn) is None  # type: ignore[arg-type]
    got = await optional_body(_Body(b'{"rpm": 3}'), KeyIn)  # type: ignore[arg-type]
    assert got == KeyIn(rpm=3)
    from gateway.errors import ApiError

    with pytest.raises(ApiError) as err:
        await strict_body(_Body(b'{"rpm": "3"}'), KeyIn)  # type: ignore[arg-type]
    assert err.value.status == 400 and err.value.param == "rpm"
    with pytest.raises(ApiError, match="not valid JSON"):
        await strict_body(_Body(b"{"), KeyIn)  # type: ignore[arg-type]
    with pytest.raises(ApiError) as unknown:
        await strict_body(_Body(b'{"rpmm": 3}'), KeyIn)  # type: ignore[arg-type]
    assert unknown.value.param == "rpmm"
