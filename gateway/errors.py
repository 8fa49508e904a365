"""Every exception becomes the OpenAI error shape, with the right status; never a traceback.

`{"error": {"message", "type", "code", "param"}}`. Governance errors map by their stable
`code`, audit errors by class, Litestar's own (validation, 404, 405, 413) by status; anything
else is logged server-side with the request id and answered with a 500 that says only that.
Add a mapping for a new error class to the tables here, not a handler of its own.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from audit.errors import AuditError, DatabaseUnavailable, InvalidQuery, SchemaOutOfDate
from governance.errors import (
    AuthenticationFailed,
    Conflict,
    GovernanceError,
    InvalidInput,
    NotFound,
    NotPermitted,
)

log = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
CONFLICT = "conflict_error"
RATE_LIMIT = "rate_limit_error"
UNAVAILABLE = "service_unavailable_error"
SERVER = "server_error"

_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_AT_PATH = re.compile(r"at `\$\.([^`]+)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")

GENERIC_AUTH_MESSAGE = "invalid or missing credential: send `Authorization: Bearer <key or JWT>`"


class ApiError(Exception):
    """An error the gateway answers as it is: status, OpenAI type, code and offending param."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def unsupported(param: str, detail: str = "") -> ApiError:
    """A parameter the server does not implement: a 400 naming it, never silently ignored."""
    more = f" ({detail})" if detail else ""
    return ApiError(
        400,
        f"`{param}` is not supported by this server{more}",
        code="unsupported_parameter",
        param=param,
    )


# GovernanceError base class -> (status, type). The most specific class listed wins.
GOVERNANCE_STATUS: tuple[tuple[type[GovernanceError], int, str], ...] = (
    (AuthenticationFailed, 401, AUTHENTICATION),
    (InvalidInput, 400, INVALID_REQUEST),
    (NotPermitted, 403, PERMISSION),
    (NotFound, 404, NOT_FOUND),
    (Conflict, 409, CONFLICT),
)

# governance code -> the request field it concerns (for `param`)
GOVERNANCE_PARAM: dict[str, str] = {
    "invalid_narrowing": "experts",
    "invalid_purpose": "purpose",
    "invalid_grantee": "grantee",
    "invalid_window": "expires_at",
    "invalid_role": "roles",
}

AUDIT_STATUS: tuple[tuple[type[AuditError], int, str, str], ...] = (
    (DatabaseUnavailable, 503, UNAVAILABLE, "database_unavailable"),
    (SchemaOutOfDate, 503, UNAVAILABLE, "schema_out_of_date"),
    (InvalidQuery, 400, INVALID_REQUEST, "invalid_query"),
)

# Litestar HTTP status -> (type, code) for its own exceptions
HTTP_STATUS: dict[int, tuple[str, str]] = {
    400: (INVALID_REQUEST, "invalid_request"),
    401: (AUTHENTICATION, "invalid_api_key"),
    403: (PERMISSION, "permission_denied"),
    404: (NOT_FOUND, "not_found"),
    405: (INVALID_REQUEST, "method_not_allowed"),
    413: (INVALID_REQUEST, "request_too_large"),
    415: (INVALID_REQUEST, "unsupported_media_type"),
    429: (RATE_LIMIT, "rate_limit_exceeded"),
    503: (UNAVAILABLE, "service_unavailable"),
}


def error_body(
    message: str, type: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "code": code, "param": param}}


def request_id_of(request: Request[Any, Any, Any]) -> str | None:
    value = request.scope.get("state", {}).get("request_id")
    return value if isinstance(value, str) else None


def _response(
    status: int,
    message: str,
    type: str,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response[Any]:
    return Response(
        error_body(message, type, code, param), status_code=status, headers=dict(headers or {})
    )


def decode_error(exc: Exception) -> ApiError:
    """A msgspec decode/validation error as a 400 naming the field (`at `$.stop``)."""
    message = str(exc)
    unknown = _UNKNOWN_FIELD.search(message)
    if unknown:
        return bad_request(
            f"unknown parameter `{unknown.group(1)}`", unknown.group(1), "invalid_request"
        )
    path = _AT_PATH.search(message)
    param = path.group(1) if path else None
    missing = _MISSING.search(message)
    if missing:
        param = (param + "." if param else "") + missing.group(1)
    return bad_request(message, param, "invalid_request")


def _validation_param(exc: ValidationException) -> tuple[str, str | None]:
    """Message and offending field of a Litestar/msgspec validation error."""
    extra = exc.extra
    if isinstance(extra, list) and extra and isinstance(extra[0], Mapping):
        first = extra[0]
        key = first.get("key")
        message = str(first.get("message") or exc.detail)
        unknown = _UNKNOWN_FIELD.search(message)
        if unknown:
            return f"unknown parameter `{unknown.group(1)}`", unknown.group(1)
        if isinstance(key, str) and key and key != "data":
            # msgspec says "at `$.messages[0].role`"; the key is already the field path
            return f"invalid value for `{key}`: {message}", key
        return message, None
    return str(exc.detail or "invalid request"), None


def to_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The one exception handler (registered for Exception)."""
    if isinstance(exc, ApiError):
        return _response(exc.status, exc.message, exc.type, exc.code, exc.param, exc.headers)
    if isinstance(exc, GovernanceError):
        for cls, status, type_ in GOVERNANCE_STATUS:
            if isinstance(exc, cls):
                if status == 401:
                    log.info(
                        "401 (%s) request %s", getattr(exc, "reason", exc), request_id_of(request)
                    )
                    return _response(
                        401,
                        GENERIC_AUTH_MESSAGE,
                        type_,
                        exc.code,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                return _response(status, str(exc), type_, exc.code, GOVERNANCE_PARAM.get(exc.code))
    if isinstance(exc, AuditError):
        for acls, status, type_, code in AUDIT_STATUS:
            if isinstance(exc, acls):
                if status >= 500:
                    log.error("request %s: %s", request_id_of(request), exc)
                    return _response(status, "the database is unavailable; try again", type_, code)
                return _response(status, str(exc), type_, code)
    if isinstance(exc, ValidationException):
        message, param = _validation_param(exc)
        return _response(400, message, INVALID_REQUEST, "invalid_request", param)
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        type_, code = HTTP_STATUS.get(exc.status_code, (INVALID_REQUEST, "invalid_request"))
        detail = str(exc.detail) if exc.detail else "request refused"
        return _response(exc.status_code, detail, type_, code, headers=exc.headers)
    rid = request_id_of(request)
    log.error("request %s failed", rid, exc_info=exc)
    return _response(500, f"internal server error (request id {rid})", SERVER, "internal_error")


EXCEPTION_HANDLERS: ExceptionHandlersMap = {Exception: to_response}
