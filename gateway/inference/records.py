"""Ledger records of inference: `inference.started`, `inference`, `inference.aborted`.

A non-streaming request appends one `inference` record before its response leaves. A stream
appends `inference.started` (request id, principal, worker, allowed and excluded experts,
policy version) before its first token, and at its end an `inference` record whose payload
names the started record in `started_seq`. A worker that died mid-stream leaves a started
record without an end; `close_dead_streams` (run at start-up, see gateway.workers) appends
`inference.aborted` with `started_seq` for each of this host's dead workers' records.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from audit.canonical import format_time
from audit.inference import inference_payload
from audit.ledger import Entry
from audit.query import RecordQuery, query_records
from gateway.errors import UNAVAILABLE, ApiError
from gateway.telemetry import current_trace_id
from gateway.workers import WorkerId, is_dead_local

if TYPE_CHECKING:
    from gateway.inference.admission import Admission
    from gateway.inference.params import Plan
    from gateway.inference.run import Narrowed
    from governance.identity import Identity

log = logging.getLogger(__name__)

STARTED = "inference.started"
INFERENCE = "inference"
ABORTED = "inference.aborted"
_PAGE = 1000


async def append(state: Any, *, kind: str, principal: str, payload: dict[str, Any]) -> Entry:
    """Append and wait until durable; any failure is a 503 (fail closed: no record, no text)."""
    try:
        with state.telemetry.span("ledger", **{"flexgate.record.kind": kind}):
            entry: Entry = await state.ledger.append(
                kind=kind, principal=principal, payload=payload
            )
    except ValueError:
        raise
    except Exception as exc:
        log.error("ledger append of %s failed: %s", kind, exc)
        raise ApiError(
            503,
            "the audit ledger is unavailable, so nothing was served; try again",
            type=UNAVAILABLE,
            code="ledger_unavailable",
        ) from exc
    return entry


def started_payload(
    state: Any, plan: Plan, request_id: str, admission: Admission, identity: Identity
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "endpoint": plan.endpoint,
        "model": state.model_name,
        "purpose": plan.purpose,
        "policy_version": admission.policy_version,
        "experts_allowed": list(admission.allowed),
        "experts_excluded": dict(admission.excluded),
        "key_id": identity.key_id,
        "user": plan.user,
        "worker": state.worker.as_payload(),
        "trace_id": current_trace_id(),
    }


def _usage_total(expert_ids: Sequence[str], results: Sequence[Any]) -> dict[str, tuple[int, float]]:
    total = {e: [0, 0.0] for e in expert_ids}
    for r in results:
        for e, (tokens, weight) in (r.usage or {}).items():
            slot = total.setdefault(e, [0, 0.0])
            slot[0] += int(tokens)
            slot[1] += float(weight)
    return {e: (int(v[0]), float(v[1])) for e, v in total.items()}


def finish_reason_of(results: Sequence[Any]) -> str | None:
    reasons = sorted({str(r.finish_reason) for r in results})
    return ",".join(reasons) if reasons else None


def final_payload(
    state: Any,
    plan: Plan,
    *,
    request_id: str,
    admission: Admission,
    identity: Identity,
    results: Sequence[Any],
    revoked: Mapping[str, str],
    status: str,
    narrowed: Narrowed | None = None,
    duration_ms: float,
    completion_text: str | None,
    started_seq: int | None = None,
    completion_tokens: int | None = None,
) -> dict[str, Any]:
    """The `inference` record's payload (audit.inference builds the contract's fields)."""
    allowed = [e for e in admission.allowed if e not in revoked]
    excluded = {**admission.excluded, **revoked}
    usage = _usage_total(state.engine.expert_ids, results)
    payload = inference_payload(
        request_id=request_id,
        endpoint=plan.endpoint,
        model=state.model_name,
        purpose=plan.purpose,
        policy_version=admission.policy_version,
        experts_allowed=allowed,
        experts_excluded=excluded,
        usage=usage,
        prompt_tokens=sum(len(p.ids) for p in plan.prompts),
        completion_tokens=(
            sum(int(r.completion_tokens) for r in results)
            if completion_tokens is None
            else completion_tokens
        ),
        finish_reason=finish_reason_of(results),
        status=status,
        prompt=plan.audit_prompt,
        completion=completion_text,
        duration_ms=duration_ms,
        trace_id=current_trace_id(),
        store_raw_text=state.settings.audit_store_text,
    )
    payload["user"] = plan.user
    payload["key_id"] = identity.key_id
    payload["choices"] = plan.rows
    if revoked:
        payload["revoked"] = dict(revoked)
        if narrowed is not None:
            payload["revoked_at"] = format_time(datetime.fromtimestamp(narrowed.at, UTC))
            if narrowed.after_tokens is not None:
                payload["revoked_after_tokens"] = narrowed.after_tokens
    if started_seq is not None:
        payload["started_seq"] = started_seq
    return payload


async def _scan(state: Any, kind: str, after: int | None) -> list[Any]:
    out: list[Any] = []
    cursor = after
    while True:
        async with state.sessionmaker() as session:
            page = await query_records(session, RecordQuery(kind=kind, after=cursor, limit=_PAGE))
        out.extend(page.records)
        if page.next_after is None:
            return out
        cursor = page.next_after


async def open_streams(state: Any) -> list[Any]:
    """`inference.started` records that have no `inference` / `inference.aborted` end."""
    started = await _scan(state, STARTED, None)
    if not started:
        return []
    first = started[0].seq
    ended: set[int] = set()
    for kind in (INFERENCE, ABORTED):
        for entry in await _scan(state, kind, first):
            seq = entry.payload.get("started_seq")
            if isinstance(seq, int):
                ended.add(seq)
    return [e for e in started if e.seq not in ended]


@contextlib.asynccontextmanager
async def _host_lock(home: Path) -> AsyncIterator[None]:
    """One worker of this host at a time scans and closes (the workers of a restarted
    server start together; the second then finds the first one's aborted records)."""
    fd = os.open(home / ".inference-abort.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def close_dead_streams(state: Any) -> int:
    """Append `inference.aborted` for open streams of this host's dead workers."""
    async with _host_lock(state.settings.home):
        return await _close_dead_streams(state)


async def _close_dead_streams(state: Any) -> int:
    me: WorkerId = state.worker
    count = 0
    for entry in await open_streams(state):
        payload = entry.payload
        if not is_dead_local(payload.get("worker"), me, frozenset({me.instance})):
            continue
        await state.ledger.append(
            kind=ABORTED,
            principal=entry.principal,
            payload={
                "request_id": payload.get("request_id"),
                "started_seq": entry.seq,
                "worker": payload.get("worker"),
                "closed_by": me.as_payload(),
                "reason": "worker ended before the stream did",
            },
        )
        count += 1
    return count
