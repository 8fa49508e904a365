"""Request and response bodies of the experts, licenses and admin routes (msgspec).

Requests refuse unknown fields: a misspelt `expires_at` must be an error, not a license
without an end. Times must carry a time zone (`2026-12-01T00:00:00Z`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, TypeVar

import msgspec

S = TypeVar("S", bound=msgspec.Struct)


def from_row(kind: type[S], row: Any, **given: Any) -> S:
    """A response struct from an ORM row: each field is the row's attribute of that name,
    unless given (renamed or converted ones)."""
    return kind(**{n: given[n] if n in given else getattr(row, n) for n in kind.__struct_fields__})


def error_responses(*codes: int) -> dict[int, Any]:
    """OpenAPI entries for the error statuses a route answers (the OpenAI error shape)."""
    from litestar.openapi import ResponseSpec

    from gateway.schemas.openai import ErrorResponse

    return {c: ResponseSpec(ErrorResponse, description="error (OpenAI shape)") for c in codes}


AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1_000_000_000)]


class Access(msgspec.Struct, kw_only=True):
    """May the caller use this expert for the purpose asked (default `general`) now?"""

    allowed: bool
    reason: str | None = None


class ExpertOut(msgspec.Struct, kw_only=True):
    id: str
    owner: str | None
    status: str
    description: str
    position: int | None
    access: Access


class ExpertList(msgspec.Struct, kw_only=True):
    object: str = "list"
    purpose: str
    policy_version: int
    data: list[ExpertOut]


class ExpertStatusOut(msgspec.Struct, kw_only=True):
    id: str
    owner: str | None
    status: str
    withdrawn_at: datetime | None


class GrantIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    grantee: str
    purposes: list[str] | None = None
    valid_from: AwareTime | None = None
    expires_at: AwareTime | None = None
    note: Annotated[str, msgspec.Meta(max_length=2000)] | None = None


class LicenseOut(msgspec.Struct, kw_only=True):
    id: str
    expert: str
    grantee: str
    purposes: list[str]
    valid_from: datetime | None
    expires_at: datetime | None
    note: str | None
    granted_by: str
    granted_at: datetime
    revoked_at: datetime | None
    revoked_by: str | None


class DenyIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    grantee: str


class DenialOut(msgspec.Struct, kw_only=True):
    id: str
    expert: str
    grantee: str
    created_by: str
    created_at: datetime
    lifted_at: datetime | None
    lifted_by: str | None


class LicensesOut(msgspec.Struct, kw_only=True):
    expert: str
    licenses: list[LicenseOut]
    denials: list[DenialOut]


# -- admin ----------------------------------------------------------------------------------


class PrincipalIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    id: str
    roles: list[str]
    groups: list[str] = []
    display_name: Annotated[str, msgspec.Meta(max_length=255)] | None = None


class PrincipalOut(msgspec.Struct, kw_only=True):
    id: str
    roles: list[str]
    groups: list[str]
    display_name: str | None
    created_at: datetime
    created_by: str


class LimitsIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A key's limits; a field left out (or null) takes the server-wide default."""

    rpm: Limit | None = None
    tpm: Limit | None = None
    max_parallel: Limit | None = None


class LimitsOut(msgspec.Struct, kw_only=True):
    key_id: str
    rpm: int | None
    tpm: int | None
    max_parallel: int | None
    effective: dict[str, int]
    """What applies now (own value, else the server default; 0 = off)."""


class KeyIn(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    expires_in_days: Annotated[int, msgspec.Meta(ge=1, le=36_500)] | None = None
    rpm: Limit | None = None
    tpm: Limit | None = None
    max_parallel: Limit | None = None


class KeyCreatedOut(msgspec.Struct, kw_only=True):
    key_id: str
    key: str
    """The API key itself: shown in this response only, never again."""
    principal: str
    created_at: datetime
    expires_at: datetime | None
    limits: LimitsOut


class KeyRevokedOut(msgspec.Struct, kw_only=True):
    key_id: str
    principal: str
    revoked_at: datetime | None
    revoked_by: str | None
