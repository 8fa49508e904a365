"""Console errors as HTML pages in plain words (the API answers JSON; pages never do).

A missing or ended session goes to the sign-in page (saying why it ended); a role the route
policy refuses, another owner's expert and a rejected CSRF token get a 403 page; unknown ids
a 404 page. Nothing internal reaches the page: unexpected errors are logged with the request
path and answered with a generic 500 page.
"""

from __future__ import annotations

import logging
from urllib.parse import quote

from litestar import Response
from litestar.exceptions import HTTPException
from litestar.response import Redirect
from litestar.types import ExceptionHandlersMap

from audit.errors import AuditError, DatabaseUnavailable, InvalidQuery
from gateway.console.common import AnyRequest, CsrfRejected, render
from gateway.errors import ApiError
from governance.errors import GovernanceError, NotFound, NotPermitted

log = logging.getLogger(__name__)

ENDED = {
    "idle": "Your session ended after a period of inactivity. Please sign in again.",
    "expired": "Your session reached its maximum length. Please sign in again.",
    "revoked": "Your session ended because its API key was revoked.",
    "key-expired": "Your session ended because its API key expired.",
    "unavailable": "The database cannot be reached right now, so your session cannot be "
    "checked. Try again shortly.",
}


def _error_page(request: AnyRequest, status: int, title: str, message: str) -> Response[object]:
    tpl = render(request, "error.html", status_code=status, title=title, message=message)
    return tpl  # type: ignore[return-value]


def _signin_redirect(request: AnyRequest) -> Response[object]:
    target = "/console/signin?next=" + quote(request.url.path, safe="/")
    ended = request.scope.get("console_ended")
    if ended in ENDED:
        target += "&ended=" + ended
    return Redirect(path=target, status_code=303)


def on_api_error(request: AnyRequest, exc: ApiError) -> Response[object]:
    if exc.status == 401:
        return _signin_redirect(request)
    if exc.status == 403:
        return _error_page(
            request,
            403,
            "Not available to your role",
            "Your role may not open this page. Sign in with a key of a principal that has "
            "the role this page is for.",
        )
    if exc.status == 503:
        return _error_page(request, 503, "Temporarily unavailable", exc.message)
    return _error_page(request, exc.status, "Request not accepted", exc.message)


def on_csrf(request: AnyRequest, _exc: CsrfRejected) -> Response[object]:
    return _error_page(
        request,
        403,
        "Form expired or sent from elsewhere",
        "This form was not accepted: it was sent from another site or from a page that is "
        "no longer valid. Go back, reload the page and try again.",
    )


def on_governance(request: AnyRequest, exc: GovernanceError) -> Response[object]:
    from gateway.console.common import user_message

    if isinstance(exc, NotPermitted):
        return _error_page(request, 403, "Not yours", user_message(exc))
    if isinstance(exc, NotFound):
        return _error_page(request, 404, "Not found", user_message(exc))
    return _error_page(request, 400, "Request not accepted", user_message(exc))


def on_audit(request: AnyRequest, exc: AuditError) -> Response[object]:
    if isinstance(exc, InvalidQuery):
        return _error_page(request, 400, "Request not accepted", str(exc))
    if isinstance(exc, DatabaseUnavailable):
        return _error_page(
            request, 503, "Temporarily unavailable", "The database cannot be reached right now."
        )
    log.error("console %s: audit error: %s", request.url.path, exc)
    return _error_page(request, 500, "Ledger problem", str(exc))


def on_http(request: AnyRequest, exc: HTTPException) -> Response[object]:
    if exc.status_code == 404:
        return _error_page(request, 404, "Not found", "There is no such page.")
    if exc.status_code == 405:
        return _error_page(request, 405, "Not allowed", "This page cannot be used that way.")
    if exc.status_code == 413:
        return _error_page(request, 413, "Too large", "What you sent is too large.")
    if exc.status_code < 500:
        return _error_page(
            request,
            exc.status_code,
            "Request not accepted",
            "Check what you entered and try again.",
        )
    return on_unexpected(request, exc)


def on_unexpected(request: AnyRequest, exc: Exception) -> Response[object]:
    log.exception("console %s failed", request.url.path, exc_info=exc)
    return _error_page(
        request,
        500,
        "Something went wrong",
        "The server could not complete this request. Nothing was changed by it unless the "
        "page you return to says so.",
    )


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    ApiError: on_api_error,
    CsrfRejected: on_csrf,
    GovernanceError: on_governance,
    AuditError: on_audit,
    HTTPException: on_http,
    Exception: on_unexpected,
}
