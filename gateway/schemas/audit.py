"""Response bodies of the /v1/audit routes (msgspec); records keep the ledger contract's shape."""

from __future__ import annotations

from typing import Any

import msgspec


class RecordOut(msgspec.Struct, kw_only=True):
    seq: int
    id: str
    kind: str
    at: str
    principal: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class RecordPage(msgspec.Struct, kw_only=True):
    records: list[RecordOut]
    next_after: int | None
    """Pass as `after` for the next page; null when this page was the last."""


class CheckpointOut(msgspec.Struct, kw_only=True):
    size: int
    root: str
    at: str
    signature: str
    key_id: str


class ProofOut(msgspec.Struct, kw_only=True):
    seq: int
    leaf_index: int
    tree_size: int
    record_hash: str
    leaf_hash: str
    path: list[str]
    checkpoint: CheckpointOut


class LatestCheckpointOut(msgspec.Struct, kw_only=True):
    checkpoint: CheckpointOut
    public_key: str | None
    """PEM of the Ed25519 key that signed it (null if this server does not hold it)."""


class DerivedOut(msgspec.Struct, kw_only=True):
    table: str
    ok: bool
    detail: str | None = None


class VerifyOut(msgspec.Struct, kw_only=True):
    ok: bool
    records: int
    first_bad_seq: int | None
    reason: str | None
    checkpoints: int
    head_seq: int
    anchored_size: int | None = None
    """The latest checkpoint anchored outside the database, when one is."""
    derived: list[DerivedOut] = []
    """Derived tables recomputed from the records and compared."""


class UsageRowOut(msgspec.Struct, kw_only=True):
    key: str | None
    requests: int
    tokens: int
    weight: float


class UsageOut(msgspec.Struct, kw_only=True):
    by: str
    rows: list[UsageRowOut]
