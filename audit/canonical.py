"""Canonical encoding and hashing of ledger records, format v1 (docs/audit.md).

Canonical JSON is RFC 8785 (`audit.jcs`). A record's hash is
`SHA-256("flexgate-record/v1\n" || prev_hash as 64 lower-case hex ASCII || JCS(body))` with
body `{seq, id, kind, at, principal, payload}`: the leading line names the format, so a record
of another version can never be read as one of this.

Two ways to the same bytes: `record_hash` follows the contract literally (build the body dict,
canonical JSON, SHA-256) and is what an offline verifier uses; `stored_record_hash` builds the
same body by concatenating the stored columns, because the ledger keeps `at` and `payload` as
the exact canonical text that was hashed. Re-encoding a payload costs ~20 µs in Python, which
alone would cap verification near 50,000 records/s; concatenation keeps it at a few µs. A
property test holds the two equal.

The concatenation is unambiguous: every field but the payload is a JSON string escaped
exactly as `json.dumps` does, and the payload sits between fixed keys, so no change of column
values can yield the same bytes (a string literal can never contain the unescaped `,"principal":`
that follows the payload).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from typing import Any

from audit.jcs import canonicalize

TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
FORMAT_VERSION = 1
RECORD_DOMAIN = "flexgate-record/v1\n"
_RECORD_DOMAIN_BYTES = RECORD_DOMAIN.encode("ascii")
# Years the fixed-width time text can hold (strftime's %Y is not zero-padded below 1000).
MIN_YEAR, MAX_YEAR = 1970, 9999
# An escaped U+0000 in JSON text: `\u0000` preceded by an even number of backslashes.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def canonical_json(obj: Any) -> bytes:
    """RFC 8785 (JCS) bytes of `obj`; ValueError (`audit.jcs.JCSError`) if it has none."""
    return canonicalize(obj)


def has_nul(json_text: str) -> bool:
    """Whether JSON text holds an escaped U+0000 (which PostgreSQL's jsonb refuses)."""
    return "u0000" in json_text and _NUL_ESCAPE.search(json_text) is not None


def format_time(at: datetime) -> str:
    """RFC 3339 in UTC with microseconds and a Z, the one form that is hashed and stored.

    Fixed width, so the text sorts in time order and range filters can compare strings.
    """
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime(TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """ISO 8601 / RFC 3339 text to an aware UTC datetime; naive input and bare dates mean UTC.

    ValueError for text that is not a time, or a time outside the years MIN_YEAR..MAX_YEAR
    (which the fixed-width stored form cannot hold).
    """
    try:
        value = datetime.fromisoformat(text.strip())
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is out of range") from None
    if not MIN_YEAR <= value.year <= MAX_YEAR:
        raise ValueError(f"{text!r} is outside the years {MIN_YEAR}..{MAX_YEAR}")
    return value


def json_string(value: str) -> str:
    """`json.dumps(value, ensure_ascii=False)`, with a fast path for strings needing no escape."""
    if '"' not in value and "\\" not in value and value.isprintable():
        return f'"{value}"'
    return json.dumps(value, ensure_ascii=False)


def body_text(
    *, seq: int, id: str, kind: str, at: str, principal: str | None, payload_text: str
) -> str:
    """Canonical JSON of {seq, id, kind, at, principal, payload}, from stored column text.

    `payload_text` must be the canonical JSON of the payload (as the ledger stores it).
    """
    p = "null" if principal is None else json_string(principal)
    return (
        f'{{"at":{json_string(at)},"id":{json_string(id)},"kind":{json_string(kind)},'
        f'"payload":{payload_text},"principal":{p},"seq":{seq}}}'
    )


def stored_record_hash(
    prev_hash: str, seq: int, id: str, kind: str, at: str, principal: str | None, payload_text: str
) -> str:
    """The record hash computed from stored columns (see the module docstring)."""
    body = body_text(
        seq=seq, id=id, kind=kind, at=at, principal=principal, payload_text=payload_text
    )
    return hashlib.sha256((RECORD_DOMAIN + prev_hash + body).encode("utf-8")).hexdigest()


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
    """hash = SHA-256("flexgate-record/v1\\n" || prev_hash as ASCII hex || JCS(record body)).

    The definition (an offline verifier's path): the body is encoded from the values."""
    body = {
        "seq": seq,
        "id": id,
        "kind": kind,
        "at": at if isinstance(at, str) else format_time(at),
        "principal": principal,
        "payload": payload,
    }
    return hashlib.sha256(
        _RECORD_DOMAIN_BYTES + prev_hash.encode("ascii") + canonical_json(body)
    ).hexdigest()
