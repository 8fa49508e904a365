"""Sign-in, sign-out and the landing page.

Sign-in takes an API key (or, when OIDC is configured, a bearer token pasted once) and asks
governance's own `authenticate` — the same call, the same checks as every API request. The key
itself is never stored: the session keeps its id and re-checks it on every page. The sign-in
form has its own CSRF token (a pre-session cookie of the same value), so another site cannot
sign a browser in under its own key.
"""

from __future__ import annotations

import secrets
from typing import Any, cast

from litestar import get, post
from litestar.response import Redirect, Template

from audit.db import translate_errors
from gateway.console.common import (
    AnyRequest,
    check_csrf,
    identity_of,
    render,
    safe_next,
    see_other,
    session_of,
)
from gateway.console.errors import ENDED
from gateway.console.middleware import cookie_name, session_cookie, store_of
from governance.auth import authenticate
from governance.errors import AuthenticationFailed

HOME_OF_ROLE = (
    ("data_owner", "/console/experts"),
    ("compliance_officer", "/console/ledger"),
    ("admin", "/console/admin/principals"),
)


def _token_expiry(token: str) -> float | None:
    """A verified JWT's `exp`, so the session ends when the token does."""
    import jwt as pyjwt

    try:
        claims: dict[str, Any] = pyjwt.decode(token, options={"verify_signature": False})
    except pyjwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) else None


@get("/console", name="console:home")
async def home(request: AnyRequest) -> Template | Redirect:
    me = identity_of(request)
    if me is None:
        return see_other("/console/signin")
    for role, path in HOME_OF_ROLE:
        if role in me.roles:
            return see_other(path)
    return render(request, "home.html", title="FlexGate console")


@get("/console/signin", name="console:signin")
async def signin_page(
    request: AnyRequest, next: str | None = None, ended: str | None = None
) -> Template | Redirect:
    if identity_of(request) is not None:
        return see_other(safe_next(next))
    return _signin_form(request, next=next, ended=ended)


def _signin_form(
    request: AnyRequest,
    *,
    next: str | None,
    ended: str | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> Template:
    token = secrets.token_urlsafe(32)
    why = ENDED.get(ended or "") or ENDED.get(
        str(cast(dict[str, Any], request.scope).get("console_ended") or "")
    )
    tpl = render(
        request,
        "signin.html",
        status_code=status_code,
        title="Sign in",
        pre_csrf=token,
        next=safe_next(next),
        ended=why,
        oidc=request.app.state.get("jwt") is not None,
        errors={"credential": error} if error else {},
    )
    tpl.cookies.append(session_cookie(request.scope, token, pre=True, max_age=3600))
    return tpl


@post("/console/signin", name="console:signin-submit")
async def signin(request: AnyRequest) -> Template | Redirect:
    pre = request.cookies.get(cookie_name(request.scope, pre=True), "")
    form = await check_csrf(request, pre)
    next_path = form.get("next") if isinstance(form.get("next"), str) else None
    credential = form.get("credential")
    credential = credential.strip() if isinstance(credential, str) else ""
    if not credential:
        return _signin_form(
            request, next=next_path, error="Enter your API key or token.", status_code=400
        )
    state = request.app.state
    try:
        async with translate_errors(), state.sessionmaker() as db:
            identity = await authenticate(db, "Bearer " + credential, jwt=state.get("jwt"))
    except AuthenticationFailed:
        return _signin_form(
            request,
            next=next_path,
            error="That key or token was not accepted: it is unknown, revoked or expired. "
            "Check that you pasted all of it.",
            status_code=401,
        )
    old = session_of(request)
    store = store_of(request.scope)
    if old is not None:
        await store.delete(old.id)
    await store.delete_expired()  # sessions nobody came back to
    sess = await store.create(
        principal=identity.id,
        roles=sorted(identity.roles),
        groups=sorted(identity.groups),
        via=identity.via,
        key_id=identity.key_id,
        expires_at=_token_expiry(credential) if identity.via == "jwt" else None,
    )
    response = see_other(safe_next(next_path))
    response.cookies.append(session_cookie(request.scope, sess.id))
    response.cookies.append(session_cookie(request.scope, "", pre=True, max_age=0))
    return response


@post("/console/signout", name="console:signout")
async def signout(request: AnyRequest) -> Redirect:
    sess = session_of(request)
    if sess is not None:
        await check_csrf(request, sess.csrf)
        await store_of(request.scope).delete(sess.id)
    response = see_other("/console/signin?signed_out=1")
    response.cookies.append(session_cookie(request.scope, "", max_age=0))
    return response


HANDLERS = [home, signin_page, signin, signout]
