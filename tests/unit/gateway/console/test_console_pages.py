"""The console in-process (Litestar's AsyncTestClient, SQLite and PostgreSQL): sessions, CSRF,
ownership, same services and ledger records as the API. The browser tests
(tests/integration/console) cover the same stories through Chromium against `flexgate serve`.
"""

from __future__ import annotations

import re
import time
from typing import Any

from litestar import Litestar
from litestar.testing import AsyncTestClient
from sqlalchemy import select

from audit.models import LedgerRecord
from gateway.console.sessions import SessionStore
from governance.keys import revoke_key
from governance.licenses import list_licenses
from tests.unit.gateway.conftest import OPERATOR, GwWorld

Client = AsyncTestClient[Litestar]
_CSRF = re.compile(r'name="_csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    m = _CSRF.search(html)
    assert m, "no CSRF field on the page"
    return m.group(1)


async def sign_in(client: Client, token: str) -> Any:
    client.cookies.clear()
    page = await client.get("/console/signin")
    return await client.post(
        "/console/signin",
        data={"_csrf": csrf_of(page.text), "credential": token, "next": "/console"},
        follow_redirects=False,
    )


async def test_sign_in_sets_a_strict_http_only_cookie_and_refuses_bad_keys(
    gw_client: Client, gw_world: GwWorld
) -> None:
    r = await sign_in(gw_client, gw_world.keys["data_owner"][:-2] + "xx")
    assert r.status_code == 401
    assert "was not accepted" in r.text and 'aria-invalid="true"' in r.text
    assert not [c for c in r.headers.get_list("set-cookie") if c.startswith("flexgate_console=")]
    r = await sign_in(gw_client, gw_world.keys["data_owner"])
    assert r.status_code == 303 and r.headers["location"] == "/console"
    cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith("flexgate_console="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain http here; over TLS the __Host- name and Secure
    assert gw_world.keys["data_owner"] not in cookie
    page = await gw_client.get("/console/experts")
    assert page.status_code == 200 and "owner-code" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]


async def test_sign_in_needs_its_own_csrf_token_and_never_redirects_off_site(
    gw_client: Client, gw_world: GwWorld
) -> None:
    gw_client.cookies.clear()
    r = await gw_client.post(
        "/console/signin", data={"_csrf": "x", "credential": gw_world.keys["admin"]}
    )
    assert r.status_code == 403 and "Form expired" in r.text
    page = await gw_client.get("/console/signin")
    r = await gw_client.post(
        "/console/signin",
        data={
            "_csrf": csrf_of(page.text),
            "credential": gw_world.keys["admin"],
            "next": "https://evil.example/console",
        },
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/console"


async def test_owner_grant_through_the_console_is_the_services_grant(
    gw_client: Client, gw_world: GwWorld
) -> None:
    await sign_in(gw_client, gw_world.keys["data_owner"])
    page = await gw_client.get("/console/experts/code")
    token = csrf_of(page.text)
    # Without the token, or from another origin: refused, nothing written.
    r = await gw_client.post("/console/experts/code/licenses", data={"grantee": "app-1"})
    assert r.status_code == 403
    r = await gw_client.post(
        "/console/experts/code/licenses",
        data={"_csrf": token, "grantee": "app-1"},
        headers={"Origin": "http://evil.example"},
    )
    assert r.status_code == 403
    async with gw_world.sm() as s:
        assert not [lic for lic in await list_licenses(s, "code") if lic.grantee == "app-1"]
    r = await gw_client.post(
        "/console/experts/code/licenses",
        data={"_csrf": token, "grantee": "app-1", "purposes": "research", "note": "pilot"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    async with gw_world.sm() as s:
        (lic,) = [lic for lic in await list_licenses(s, "code") if lic.grantee == "app-1"]
        assert lic.purposes == ["research"] and lic.note == "pilot"
        rec = (
            (
                await s.execute(
                    select(LedgerRecord)
                    .where(LedgerRecord.kind == "license.granted")
                    .order_by(LedgerRecord.seq.desc())
                )
            )
            .scalars()
            .first()
        )
    assert rec is not None and rec.principal == "owner-code"
    assert rec.payload["license_id"] == lic.id and rec.payload["actor_via"] == "key"
    # The same grant again: the services' duplicate error, beside the form, as a 409.
    r = await gw_client.post(
        "/console/experts/code/licenses",
        data={"_csrf": token, "grantee": "app-1", "purposes": "research"},
    )
    assert r.status_code == 409 and "identical license already exists" in r.text
    # A window that is over: the error names the window, not a stack trace.
    r = await gw_client.post(
        "/console/experts/code/licenses",
        data={"_csrf": token, "grantee": "app-2", "expires_at": "2001-01-01T00:00"},
    )
    assert r.status_code == 400 and 'id="grant-window-error"' in r.text
    assert "Traceback" not in r.text


async def test_owner_cannot_reach_another_owners_expert_by_url_or_form(
    gw_client: Client, gw_world: GwWorld
) -> None:
    await sign_in(gw_client, gw_world.keys["data_owner"])
    token = csrf_of((await gw_client.get("/console/experts/code")).text)
    assert (await gw_client.get("/console/experts/news")).status_code == 403
    assert (await gw_client.get("/console/experts/news/withdraw")).status_code == 403
    for path, data in (
        ("/console/experts/news/licenses", {"grantee": "app-1"}),
        ("/console/experts/news/denials", {"grantee": "app-1"}),
        ("/console/experts/news/withdraw", {}),
    ):
        r = await gw_client.post(path, data={"_csrf": token, **data})
        assert r.status_code == 403, path
        assert "only the expert's owner" in r.text.replace("&#39;", "'")
    async with gw_world.sm() as s:
        assert [lic.grantee for lic in await list_licenses(s, "news")] == []
    listing = (await gw_client.get("/console/experts")).text
    assert 'href="/console/experts/news"' not in listing


async def test_deny_and_lift_with_the_denial_of_another_expert_refused(
    gw_client: Client, gw_world: GwWorld
) -> None:
    await sign_in(gw_client, gw_world.keys["data_owner"])
    token = csrf_of((await gw_client.get("/console/experts/code")).text)
    r = await gw_client.post(
        "/console/experts/code/denials",
        data={"_csrf": token, "grantee": "app-2"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    page = (await gw_client.get("/console/experts/code")).text
    assert "Denied code to app-2" in page
    (denial_id,) = re.findall(r"/console/experts/code/denials/(den_[^/]+)/lift", page)
    r = await gw_client.post(
        f"/console/experts/math/denials/{denial_id}/lift", data={"_csrf": token}
    )
    assert r.status_code in (403, 404)
    r = await gw_client.post(
        f"/console/experts/code/denials/{denial_id}/lift",
        data={"_csrf": token},
        follow_redirects=False,
    )
    assert r.status_code == 303
    assert "/lift" not in (await gw_client.get("/console/experts/code")).text


async def test_revoked_key_ends_the_session_on_the_next_page(
    gw_client: Client, gw_world: GwWorld
) -> None:
    await sign_in(gw_client, gw_world.keys["compliance_officer"])
    assert (await gw_client.get("/console/ledger")).status_code == 200
    key_id = gw_world.keys["compliance_officer"].split("_")[1]
    async with gw_world.sm() as s:
        await revoke_key(s, actor=OPERATOR, key_id=key_id)
    r = await gw_client.get("/console/ledger", follow_redirects=False)
    assert r.status_code == 303 and "ended=revoked" in r.headers["location"]
    r = await gw_client.get(r.headers["location"])
    assert "API key was revoked" in r.text
    # The session is gone for good, not only for that page.
    assert (await gw_client.get("/console/ledger", follow_redirects=False)).status_code == 303


async def test_roles_see_only_their_pages_as_html(gw_client: Client, gw_world: GwWorld) -> None:
    await sign_in(gw_client, gw_world.keys["application"])
    home = await gw_client.get("/console")
    assert "no console pages" in home.text
    for path in ("/console/ledger", "/console/experts", "/console/admin/keys", "/console/usage"):
        r = await gw_client.get(path)
        assert r.status_code == 403, path
        assert r.headers["content-type"].startswith("text/html")
        assert "Not available to your role" in r.text
    await sign_in(gw_client, gw_world.keys["data_owner"])
    assert (await gw_client.get("/console/verify")).status_code == 403
    assert (await gw_client.get("/console/export/download")).status_code == 403
    gw_client.cookies.clear()
    r = await gw_client.get("/console/ledger", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/console/signin?next=")


async def test_admin_key_is_shown_once(gw_client: Client, gw_world: GwWorld) -> None:
    await sign_in(gw_client, gw_world.keys["admin"])
    token = csrf_of((await gw_client.get("/console/admin/keys")).text)
    r = await gw_client.post(
        "/console/admin/keys", data={"_csrf": token, "principal": "app-2", "expires_in_days": "7"}
    )
    assert r.status_code == 200
    key = re.search(r'value="(fg_[^"]+)"', r.text)
    assert key is not None
    assert key.group(1) not in (await gw_client.get("/console/admin/keys")).text
    r = await gw_client.post(
        "/console/admin/keys", data={"_csrf": token, "principal": "nobody", "expires_in_days": ""}
    )
    assert r.status_code == 404 and 'id="principal-error"' in r.text
    r = await gw_client.post(
        "/console/admin/keys", data={"_csrf": token, "principal": "app-2", "expires_in_days": "0"}
    )
    assert r.status_code == 400 and 'id="expires_in_days-error"' in r.text


async def test_session_store_idle_and_absolute_timeouts(tmp_path: Any) -> None:
    store = SessionStore(tmp_path / "s", idle_s=60, absolute_s=3600)
    now = time.time()
    sess = await store.create(
        principal="p", roles=["admin"], groups=[], via="key", key_id="0" * 16, now=now
    )
    assert (tmp_path / "s").stat().st_mode & 0o777 == 0o700
    assert (await store.load(sess.id, now=now + 30))[0] is not None
    assert (await store.load(sess.id, now=now + 30 + 61)) == (None, "idle")
    sess = await store.create(
        principal="p", roles=[], groups=[], via="jwt", key_id=None, expires_at=now + 10, now=now
    )
    assert (await store.load(sess.id, now=now + 11)) == (None, "expired")
    assert (await store.load("not-a-session")) == (None, None)


async def test_admin_sets_key_limits_with_errors_beside_the_fields(
    gw_client: Client, gw_world: GwWorld
) -> None:
    from governance.key_limits import get_limits

    await sign_in(gw_client, gw_world.keys["admin"])
    key_id = gw_world.keys["app-2"].split("_")[1]
    page = await gw_client.get(f"/console/admin/keys/{key_id}/limits")
    token = csrf_of(page.text)
    r = await gw_client.post(
        f"/console/admin/keys/{key_id}/limits",
        data={"_csrf": token, "rpm": "ten", "tpm": "", "max_parallel": "0"},
    )
    assert r.status_code == 400
    assert 'id="rpm-error"' in r.text and 'id="max_parallel-error"' not in r.text
    r = await gw_client.post(
        f"/console/admin/keys/{key_id}/limits",
        data={"_csrf": token, "rpm": "10", "tpm": "", "max_parallel": "0"},
    )
    assert r.status_code == 400 and 'id="max_parallel-error"' in r.text
    r = await gw_client.post(
        f"/console/admin/keys/{key_id}/limits",
        data={"_csrf": token, "rpm": "10", "tpm": "", "max_parallel": "2"},
        follow_redirects=False,
    )
    assert r.status_code == 303
    async with gw_world.sm() as s:
        limits = await get_limits(s, key_id)
    assert (limits.rpm, limits.tpm, limits.max_parallel) == (10, None, 2)
    assert "10 / default / 2" in (await gw_client.get("/console/admin/keys")).text


async def test_a_session_opened_in_one_worker_is_valid_and_ended_in_another(
    gw_client: Client, gw_world: GwWorld, gw_engine: Any
) -> None:
    """Two app instances on one FLEXGATE_HOME and database, as `--workers 2` runs them."""
    from gateway.app import create_app

    r = await sign_in(gw_client, gw_world.keys["data_owner"])
    cookie = r.cookies["flexgate_console"]
    async with AsyncTestClient(app=create_app(gw_world.settings, engine=gw_engine)) as other:
        other.cookies.set("flexgate_console", cookie, path="/console")
        page = await other.get("/console/experts")
        assert page.status_code == 200 and "Signed in as <strong>owner-code" in page.text
        r = await other.post(
            "/console/signout", data={"_csrf": csrf_of(page.text)}, follow_redirects=False
        )
        assert r.status_code == 303
    r = await gw_client.get("/console/experts", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/console/signin")


async def test_oidc_token_sign_in_ends_when_the_token_expires(
    gw_app: Litestar, gw_client: Client, gw_world: GwWorld, tmp_path: Any
) -> None:
    import asyncio
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import rsa

    from governance.oidc import JwtVerifier, OidcSettings

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    gw_app.state.jwt = JwtVerifier(
        OidcSettings(
            issuer="https://idp.test", audience="flexgate", jwks=str(tmp_path / "jwks.json")
        )
    )
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": "https://idp.test",
            "aud": "flexgate",
            "sub": "owner-code",
            "roles": ["data_owner"],
            "iat": now,
            "exp": now + 2,
        },
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    signin = await gw_client.get("/console/signin")
    assert "OIDC bearer token" in signin.text
    r = await sign_in(gw_client, token)
    assert r.status_code == 303
    page = await gw_client.get("/console/experts")
    assert page.status_code == 200 and "owner-code" in page.text
    stored = [f.read_bytes() for f in (gw_world.settings.home / "console-sessions").iterdir()]
    assert stored and not any(token.encode() in b for b in stored)  # the token is not kept
    await asyncio.sleep(max(0.0, now + 2.2 - time.time()))
    r = await gw_client.get("/console/experts", follow_redirects=False)
    assert r.status_code == 303 and "ended=expired" in r.headers["location"]


async def test_ledger_filters_and_cursor_pages(gw_client: Client, gw_world: GwWorld) -> None:
    from audit import ledger

    async with gw_world.sm() as s, s.begin():
        for n in range(60):
            await ledger.append(s, kind="test.filler", principal="root", payload={"n": n})
    await sign_in(gw_client, gw_world.keys["compliance_officer"])
    first = (await gw_client.get("/console/ledger?kind=test.filler")).text
    seqs = [int(x) for x in re.findall(r'<a href="/console/ledger/(\d+)">', first)]
    assert len(seqs) == 50 and seqs == sorted(seqs)
    nxt = re.search(r'<a href="(/console/ledger\?[^"]+)" rel="next">', first)
    assert nxt is not None and f"after={seqs[-1]}" in nxt.group(1)
    second = (await gw_client.get(nxt.group(1).replace("&amp;", "&"))).text
    more = [int(x) for x in re.findall(r'<a href="/console/ledger/(\d+)">', second)]
    assert len(more) == 10 and more[0] > seqs[-1]
    assert 'rel="next"' not in second and "First page" in second
    bad = await gw_client.get("/console/ledger?since=yesterday")
    assert bad.status_code == 400 and "invalid since" in bad.text
