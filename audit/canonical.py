"""Canonical encoding and hashing of ledger records (DESIGN.md, "Ledger record contract")."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no insignificant whitespace, UTF-8; NaN and infinities are refused."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def format_time(at: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a Z, the one form that is hashed."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_hash(
    *,
    prev_hash: str,
    seq: int,
    id: str,
    kind: str,
    at: datetime | str,
    principal: str | None,
    payload: dict[str, Any],
) -> str:
    """hash = SHA-256(prev_hash as ASCII hex || canonical JSON of the record body)."""
    body = {
        "seq": seq,
        "id": id,
        "kind": kind,
        "at": at if isinstance(at, str) else format_time(at),
        "principal": principal,
        "payload": payload,
    }
    return hashlib.sha256(prev_hash.encode("ascii") + canonical_json(body)).hexdigest()
