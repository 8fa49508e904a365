"""The ledger over HTTP: records, proofs, checkpoints, verification, usage, export.

Compliance officers see everything. A data owner (without the compliance role) sees only
records about their own experts: allowed, excluded or named in a governance record — the same
`scope_experts` filter audit.query applies for any query, so a filter the owner adds can only
narrow that scope, never widen it. The export and verification routes are compliance-only
(route policy).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from litestar import Controller, Request, get
from litestar.params import Parameter
from litestar.response import Stream
from sqlalchemy.ext.asyncio import AsyncSession

from audit import checkpoints as cps
from audit.errors import InvalidQuery
from audit.export import export_lines
from audit.format import Checkpoint
from audit.query import QUERY_PARAMS, RecordQuery, get_record, query_records, usage
from audit.signing import public_key_pem, trusted_public_keys
from audit.verify import verify
from contracts.settings import Settings
from gateway.schemas.audit import (
    CheckpointOut,
    DerivedOut,
    LatestCheckpointOut,
    ProofOut,
    RecordOut,
    RecordPage,
    UsageOut,
    UsageRowOut,
    VerifyOut,
)
from gateway.schemas.governance import error_responses
from governance.errors import NotFound
from governance.experts import list_experts
from governance.identity import Identity

COMPLIANCE = "compliance_officer"
EXPORT_CHUNK = 64 * 1024
EXPORT_TYPES = {"jsonl": "application/x-ndjson", "csv": "text/csv; charset=utf-8"}


async def owner_scope(session: AsyncSession, identity: Identity) -> list[str] | None:
    """None for a compliance officer (everything); else the ids of the caller's experts."""
    if COMPLIANCE in identity.roles:
        return None
    return [e.id for e in await list_experts(session) if e.owner_id == identity.id]


def _one_value_params(request: Request[Any, Any, Any], allowed: Sequence[str]) -> dict[str, Any]:
    """The query string as {name: value}; unknown names and repeated ones are 400s."""
    out: dict[str, Any] = {}
    for name, values in request.query_params.dict().items():
        if name not in allowed:
            raise InvalidQuery(f"unknown parameter {name}: use {', '.join(allowed)}")
        if len(values) != 1:
            raise InvalidQuery(f"parameter {name} takes one value")
        out[name] = values[0]
    return out


def record_out(entry: Any) -> RecordOut:
    return RecordOut(**entry.as_dict())


def checkpoint_out(cp: Checkpoint) -> CheckpointOut:
    return CheckpointOut(**cp.as_dict())


def _public_key(settings: Settings, key_id: str) -> str | None:
    key = trusted_public_keys(settings.home).get(key_id)
    return None if key is None else public_key_pem(key)


ERRORS = error_responses(400, 401, 403, 404, 503)


class AuditController(Controller):
    path = "/v1/audit"
    tags = ("audit",)

    @get("/records", summary="A page of ledger records matching the filters", responses=ERRORS)
    async def records(
        self,
        request: Request[Any, Any, Any],
        db_session: AsyncSession,
        identity: Identity,
        kind: str | None = None,
        principal: str | None = None,
        expert: str | None = None,
        expert_mode: str | None = Parameter(
            default=None, description="used (default) | allowed | excluded | any"
        ),
        purpose: str | None = None,
        status: str | None = Parameter(default=None, description="ok | error | cancelled"),
        since: str | None = Parameter(default=None, description="ISO 8601, inclusive"),
        until: str | None = Parameter(default=None, description="ISO 8601, exclusive"),
        after: str | None = Parameter(default=None, description="seq cursor: next_after"),
        limit: str | None = Parameter(default=None, description="1..1000, default 100"),
    ) -> RecordPage:
        params = _one_value_params(request, QUERY_PARAMS)
        query = RecordQuery.from_params(
            params, scope_experts=await owner_scope(db_session, identity)
        )
        page = await query_records(db_session, query)
        return RecordPage(records=[record_out(r) for r in page.records], next_after=page.next_after)

    async def _visible(self, session: AsyncSession, identity: Identity, seq: int) -> Any:
        entry = await get_record(session, seq, scope_experts=await owner_scope(session, identity))
        if entry is None:
            raise NotFound(f"no record {seq}")
        return entry

    @get("/records/{seq:int}", summary="One ledger record", responses=ERRORS)
    async def record(self, db_session: AsyncSession, identity: Identity, seq: int) -> RecordOut:
        return record_out(await self._visible(db_session, identity, seq))

    @get(
        "/records/{seq:int}/proof",
        summary="Inclusion proof against the latest checkpoint",
        responses=ERRORS,
    )
    async def proof(self, db_session: AsyncSession, identity: Identity, seq: int) -> ProofOut:
        await self._visible(db_session, identity, seq)
        proof = (await cps.inclusion_proof(db_session, seq)).as_dict()
        return ProofOut(**{**proof, "checkpoint": CheckpointOut(**proof["checkpoint"])})

    @get(
        "/checkpoints/latest",
        summary="The latest signed checkpoint and its public key",
        responses=ERRORS,
    )
    async def latest_checkpoint(
        self, db_session: AsyncSession, settings: Settings
    ) -> LatestCheckpointOut:
        cp = await cps.latest_checkpoint(db_session)
        if cp is None:
            raise NotFound("no checkpoint yet")
        return LatestCheckpointOut(
            checkpoint=checkpoint_out(cp), public_key=_public_key(settings, cp.key_id)
        )

    @get("/verify", summary="Verify the whole chain and every checkpoint", responses=ERRORS)
    async def verify_chain(self, db_session: AsyncSession, settings: Settings) -> VerifyOut:
        report = await verify(db_session, public_keys=trusted_public_keys(settings.home))
        body = report.as_dict()
        body["derived"] = [DerivedOut(**d) for d in body.get("derived", [])]
        return VerifyOut(**body)

    @get("/usage", summary="Expert usage by expert, principal or day", responses=ERRORS)
    async def usage(
        self,
        request: Request[Any, Any, Any],
        db_session: AsyncSession,
        identity: Identity,
        by: str = Parameter(default="expert", description="expert | principal | day"),
        since: str | None = None,
        until: str | None = None,
        expert: str | None = None,
        principal: str | None = None,
        purpose: str | None = None,
    ) -> UsageOut:
        _one_value_params(request, ("by", "since", "until", "expert", "principal", "purpose"))
        scope = await owner_scope(db_session, identity)
        experts: list[str] | None = None if expert is None else [expert]
        if scope is not None:
            experts = [e for e in (experts or scope) if e in scope]
            if not experts:
                if by not in ("expert", "principal", "day"):
                    raise InvalidQuery(f"invalid by {by!r}: one of expert, principal, day")
                return UsageOut(by=by, rows=[])
        rows = await usage(
            db_session,
            by=by,
            since=since,
            until=until,
            experts=experts,
            principal=principal,
            purpose=purpose,
        )
        return UsageOut(by=by, rows=[UsageRowOut(**r.as_dict()) for r in rows])

    @get(
        "/export",
        summary="Streamed export (JSONL or CSV) with seq and hash per line",
        response_description="header line, one line per record, trailer line",
        responses=ERRORS,
    )
    async def export(
        self,
        request: Request[Any, Any, Any],
        settings: Settings,
        format: str = Parameter(default="jsonl", description="jsonl | csv"),
        since: str | None = None,
        until: str | None = None,
    ) -> Stream:
        _one_value_params(request, ("format", "since", "until"))
        # Its own session: the export outlives the handler (the request's session closes
        # when the handler returns, the stream is still being sent then).
        session: AsyncSession = request.app.state.sessionmaker()
        try:
            cp = await cps.latest_checkpoint(session)
            pem = None if cp is None else _public_key(settings, cp.key_id)
            lines = await export_lines(
                session, fmt=format, since=since, until=until, public_key_pem=pem
            )
        except BaseException:
            await session.close()
            raise

        async def body() -> AsyncIterator[bytes]:
            buf: list[str] = []
            size = 0
            try:
                async for line in lines:
                    buf.append(line)
                    size += len(line)
                    if size >= EXPORT_CHUNK:
                        yield "".join(buf).encode("utf-8")
                        buf, size = [], 0
                if buf:
                    yield "".join(buf).encode("utf-8")
            finally:
                await session.close()

        return Stream(
            body(),
            media_type=EXPORT_TYPES[format],
            headers={"Content-Disposition": f'attachment; filename="flexgate-ledger.{format}"'},
        )
