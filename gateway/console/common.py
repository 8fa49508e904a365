"""What every console page shares: rendering, CSRF, redirects, errors in the user's words."""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import urlsplit

from litestar import Request
from litestar.response import Redirect, Template

from gateway.console.sessions import ConsoleSession
from governance.errors import (
    AlreadyExists,
    AuthenticationFailed,
    DuplicateDenial,
    DuplicateGrant,
    GovernanceError,
    InvalidGrantee,
    InvalidId,
    InvalidPurpose,
    InvalidRole,
    InvalidState,
    InvalidWindow,
    NotFound,
    NotPermitted,
)
from governance.identity import Identity

AnyRequest = Request[Any, Any, Any]

ROLE_LABELS = {
    "data_owner": "Data owner",
    "compliance_officer": "Compliance officer",
    "admin": "Admin",
    "application": "Application",
}

# (path, label, roles that see it): the navigation shows only what the route policy allows.
NAV = (
    ("/console/experts", "My experts", {"data_owner"}),
    ("/console/usage", "Usage", {"data_owner", "compliance_officer"}),
    ("/console/ledger", "Ledger", {"compliance_officer", "data_owner"}),
    ("/console/verify", "Verify", {"compliance_officer"}),
    ("/console/export", "Export", {"compliance_officer"}),
    ("/console/admin/principals", "Principals", {"admin"}),
    ("/console/admin/keys", "Keys", {"admin"}),
    ("/console/admin/experts", "Experts", {"admin"}),
)


class CsrfRejected(Exception):
    """A state-changing request without this session's token, or from another site."""


def session_of(request: AnyRequest) -> ConsoleSession | None:
    sess = cast(dict[str, Any], request.scope).get("console_session")
    return sess if isinstance(sess, ConsoleSession) else None


def identity_of(request: AnyRequest) -> Identity | None:
    user = request.scope.get("user")
    return user if isinstance(user, Identity) else None


def nav_for(identity: Identity | None) -> list[tuple[str, str]]:
    if identity is None:
        return []
    return [(path, label) for path, label, roles in NAV if roles & identity.roles]


def render(
    request: AnyRequest,
    template: str,
    *,
    status_code: int = 200,
    **context: Any,
) -> Template:
    identity = identity_of(request)
    sess = session_of(request)
    flash = list(cast(dict[str, Any], request.scope).get("console_flash") or [])
    ctx = {
        "me": identity,
        "role_labels": ROLE_LABELS,
        "nav": nav_for(identity),
        "path": request.url.path,
        "csrf": sess.csrf if sess is not None else context.pop("pre_csrf", ""),
        "flash": flash,
        "errors": {},
        "form": {},
        **context,
    }
    return Template(template_name=template, context=ctx, status_code=status_code)


def see_other(path: str) -> Redirect:
    return Redirect(path=path, status_code=303)


def safe_next(value: str | None) -> str:
    """Only a console path of this site is followed after sign-in (no open redirect)."""
    if not value:
        return "/console"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or not parts.path.startswith("/console") or "\\" in value:
        return "/console"
    return value


async def flash(request: AnyRequest, message: str) -> None:
    sess = session_of(request)
    if sess is not None:
        sess.flash.append(message)
        await request.app.state.console_sessions.save(sess)


def _same_origin(request: AnyRequest) -> bool:
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        return origin == own
    return origin != "null"


async def check_csrf(request: AnyRequest, expected: str) -> Mapping[str, Any]:
    """The submitted form, once its CSRF token and origin are checked (CsrfRejected if not)."""
    form = await request.form()
    token = form.get("_csrf")
    if (
        not expected
        or not isinstance(token, str)
        or not hmac.compare_digest(token.encode(), expected.encode())
        or not _same_origin(request)
    ):
        raise CsrfRejected
    return form


async def csrf_form(request: AnyRequest) -> Mapping[str, Any]:
    sess = session_of(request)
    return await check_csrf(request, sess.csrf if sess is not None else "")


# -- errors in the user's words ------------------------------------------------------------

FIELD_OF: dict[type[GovernanceError], str] = {
    InvalidGrantee: "grantee",
    InvalidPurpose: "purposes",
    InvalidWindow: "window",
    InvalidRole: "roles",
    InvalidId: "id",
}


def field_of(exc: GovernanceError) -> str:
    for cls, name in FIELD_OF.items():
        if isinstance(exc, cls):
            return name
    return "form"


def user_message(exc: GovernanceError) -> str:
    """Governance messages are written for people already; a few get friendlier words."""
    if isinstance(exc, AuthenticationFailed):
        return "That credential was not accepted: it is unknown, revoked or expired."
    if isinstance(exc, NotPermitted):
        return "You may not do this: only the expert's owner (or an admin) may."
    if isinstance(exc, DuplicateGrant):
        return "An identical license already exists: " + str(exc)
    if isinstance(exc, DuplicateDenial):
        return "This grantee is already denied: " + str(exc)
    if isinstance(exc, InvalidState | AlreadyExists | NotFound):
        return str(exc)[:1].upper() + str(exc)[1:] + "."
    return str(exc)[:1].upper() + str(exc)[1:]
