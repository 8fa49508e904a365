"""Typed errors of the governance package.

Each class carries a stable `code` so the gateway can map it to an HTTP status and an OpenAI
error body without parsing messages, and the CLI can print the message and exit non-zero.
Every service raises before it commits, so an error means nothing was written.
"""

from __future__ import annotations

from typing import ClassVar


class GovernanceError(Exception):
    """Base class of every error raised by the governance package."""

    code: ClassVar[str] = "governance_error"


# -- 400: the input itself is wrong ---------------------------------------------------------


class InvalidInput(GovernanceError, ValueError):
    """Malformed input: ids, roles, grantees, purposes, times (HTTP 400)."""

    code = "invalid_input"


class InvalidId(InvalidInput):
    code = "invalid_id"


class InvalidRole(InvalidInput):
    code = "invalid_role"


class InvalidGrantee(InvalidInput):
    code = "invalid_grantee"


class InvalidPurpose(InvalidInput):
    code = "invalid_purpose"


class InvalidWindow(InvalidInput):
    """A validity window that is empty or already over (expires_at <= valid_from or <= now)."""

    code = "invalid_window"


class InvalidNarrowing(InvalidInput):
    """A caller's `experts` narrowing that is malformed or names an unknown expert."""

    code = "invalid_narrowing"


class ModelError(InvalidInput):
    """The served model folder has no usable experts.json / config.json."""

    code = "model_error"


# -- 401: authentication --------------------------------------------------------------------


class AuthenticationFailed(GovernanceError):
    """Missing, unknown, malformed, expired or revoked credential (HTTP 401).

    The message is deliberately generic towards clients; `reason` says which for logs.
    """

    code = "invalid_api_key"

    def __init__(self, reason: str) -> None:
        super().__init__(f"authentication failed: {reason}")
        self.reason = reason


# -- 403: acting principal may not do this --------------------------------------------------


class NotPermitted(GovernanceError, PermissionError):
    """The acting principal does not own the expert and is not an admin (HTTP 403)."""

    code = "permission_denied"


# -- 404: unknown ids ----------------------------------------------------------------------


class NotFound(GovernanceError, LookupError):
    code = "not_found"


class UnknownPrincipal(NotFound):
    code = "unknown_principal"


class UnknownExpert(NotFound):
    code = "unknown_expert"


class UnknownLicense(NotFound):
    code = "unknown_license"


class UnknownDenial(NotFound):
    code = "unknown_denial"


class UnknownKey(NotFound):
    code = "unknown_key"


# -- 409: conflicts with the current state -------------------------------------------------


class Conflict(GovernanceError):
    code = "conflict"


class AlreadyExists(Conflict):
    code = "already_exists"


class DuplicateGrant(Conflict):
    """An active license with the same expert, grantee, purposes and window exists."""

    code = "duplicate_grant"


class DuplicateDenial(Conflict):
    code = "duplicate_denial"


class InvalidState(Conflict):
    """Revoking what is revoked, withdrawing what is withdrawn, and the like."""

    code = "invalid_state"
