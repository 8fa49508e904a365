"""Ledger records of inference: `inference.started`, `inference`, `inference.aborted`.

A non-streaming request appends one `inference` record before its response leaves. A stream
appends `inference.started` (request id, principal, worker, allowed and excluded experts,
policy version) before its first token, and at its end an `inference` record whose payload
names the started record in `started_seq`. A worker that died mid-stream leaves a started
record without an end; `close_dead_streams` (run at start-up, see gateway.workers) appends
`inference.aborted` with `started_seq` for each of this host's dead workers' records.
"""

from __future__ import annotations

import logging
from typing import Any

from audit.query import RecordQuery, query_records
from gateway.workers import WorkerId, is_dead_local

log = logging.getLogger(__name__)

STARTED = "inference.started"
INFERENCE = "inference"
ABORTED = "inference.aborted"
_PAGE = 1000


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


async def close_dead_streams(state: Any) -> int:
    """Append `inference.aborted` for open streams of this host's dead workers."""
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
