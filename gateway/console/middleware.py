"""The console's own authentication: session cookie -> the same `scope["user"]` as the API.

Runs for every /console request (the bearer middleware skips /console). A valid session is
re-checked against governance on each page: a key session through
`governance.keys.identity_of_key` (revocation, expiry and the principal's current roles read
fresh), a token session against the token's own expiry. The guard then decides the route as
for any API call. Also stamps every console response with the headers that keep pages out of
frames, caches and other origins' scripts.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from litestar.datastructures import Cookie
from litestar.middleware import AbstractMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from audit.db import translate_errors
from audit.errors import AuditError
from gateway.console.sessions import ConsoleSession, SessionStore
from governance.errors import AuthenticationFailed
from governance.identity import Identity
from governance.keys import identity_of_key

log = logging.getLogger(__name__)

COOKIE = "flexgate_console"
SECURE_COOKIE = "__Host-flexgate_console"
PRE_COOKIE = "flexgate_console_signin"
SECURE_PRE_COOKIE = "__Host-flexgate_console_signin"
STATIC_PREFIX = "/console/static/"

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    # same-origin, not no-referrer: with no-referrer a form POST carries `Origin: null`.
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


def is_tls(scope: Scope) -> bool:
    return scope.get("scheme") in ("https", "wss")


def cookie_name(scope: Scope, *, pre: bool = False) -> str:
    """`__Host-` names (Secure, host-only, path /) over TLS; plain names on http://."""
    if pre:
        return SECURE_PRE_COOKIE if is_tls(scope) else PRE_COOKIE
    return SECURE_COOKIE if is_tls(scope) else COOKIE


def session_cookie(
    scope: Scope, value: str, *, pre: bool = False, max_age: int | None = None
) -> Cookie:
    return Cookie(
        key=cookie_name(scope, pre=pre),
        value=value,
        path="/" if is_tls(scope) else "/console",
        httponly=True,
        samesite="strict",
        secure=is_tls(scope),
        max_age=max_age,
    )


def _cookies(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            for part in value.decode("latin-1").split(";"):
                key, sep, val = part.strip().partition("=")
                if sep and key not in out:
                    out[key] = val
    return out


def store_of(scope: Scope) -> SessionStore:
    state = scope["app"].state
    store: SessionStore | None = state.get("console_sessions")
    if store is None:
        settings = state.settings
        store = SessionStore(
            settings.home / "console-sessions",
            idle_s=settings.console_idle_s,
            absolute_s=settings.console_absolute_s,
        )
        state.console_sessions = store
    return store


async def _identity(scope: Scope, sess: ConsoleSession) -> Identity:
    if sess.via == "key" and sess.key_id:
        async with translate_errors(), scope["app"].state.sessionmaker() as db:
            return await identity_of_key(db, sess.key_id)
    if sess.via == "jwt":
        return Identity(
            id=sess.principal,
            roles=frozenset(sess.roles),
            groups=frozenset(sess.groups),
            via="jwt",
        )
    raise AuthenticationFailed("session of unknown kind")


class ConsoleSessionMiddleware(AbstractMiddleware):
    """Resolve the console session into `scope["user"]` (see module docstring)."""

    def __init__(self, app: ASGIApp, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if str(scope["type"]) != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {h[0].lower() for h in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in names)
                if b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        if not scope["path"].startswith(STATIC_PREFIX):
            await self._resolve(scope)
        await self.app(scope, receive, send_with_headers)

    async def _resolve(self, asgi_scope: Scope) -> None:
        scope = cast(dict[str, Any], asgi_scope)
        scope.pop("user", None)
        scope["console_session"] = None
        scope["console_ended"] = None
        scope["console_flash"] = []
        sid = _cookies(asgi_scope).get(cookie_name(asgi_scope))
        if not sid:
            return
        store = store_of(asgi_scope)
        sess, why = await store.load(sid)
        if sess is None:
            scope["console_ended"] = why
            return
        try:
            identity = await _identity(asgi_scope, sess)
        except AuthenticationFailed as exc:
            await store.delete(sess.id)
            scope["console_ended"] = "revoked" if "revoked" in exc.reason else "key-expired"
            return
        except AuditError:
            log.exception("console: the session's key could not be checked")
            scope["console_ended"] = "unavailable"
            return
        if sess.flash:  # shown once: taken out of the session as this page renders them
            scope["console_flash"], sess.flash = sess.flash, []
            await store.save(sess)
        scope["user"] = identity
        scope["auth"] = identity.key_id
        scope["console_session"] = sess
