"""Compliance pages: the ledger, a record with its proof, verification, usage, export.

The same audit library calls as /v1/audit/* (`RecordQuery.from_params`, `get_record`,
`inclusion_proof`, `verify`, `usage`, `export_lines`), with the same scoping: a data owner
sees only records about their own experts. A record's inclusion proof and the checkpoint's
signature are checked again in the browser (static/ledger-proof.js), so the officer does not
have to trust this server's word that a record is in the signed log.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

from cryptography.hazmat.primitives import serialization
from litestar import get, post
from litestar.response import Response, Stream, Template
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from audit import canonical as audit_canonical
from audit.checkpoints import inclusion_proof, latest_checkpoint
from audit.db import translate_errors
from audit.errors import InvalidQuery
from audit.export import export_lines
from audit.models import RECORD_COLUMNS, LedgerRecord
from audit.query import (
    EXPERT_MODES,
    MAX_LIMIT,
    QUERY_PARAMS,
    STATUSES,
    RecordQuery,
    UsageRow,
    get_record,
    query_records,
    usage,
)
from audit.signing import public_key_pem, trusted_public_keys
from audit.verify import verify
from contracts.settings import Settings
from gateway.console.charts import Bar, bar_chart
from gateway.console.common import AnyRequest, csrf_form, render
from gateway.console.owner import owned_expert_ids
from governance.errors import UnknownExpert
from governance.identity import Identity

PAGE_SIZE = 50
# The first line of every record hash in the ledger format this server writes (v1:
# "flexgate-record/v1\n"; the format before v1 had none). Sent to the browser's checker.
RECORD_DOMAIN: str = getattr(audit_canonical, "RECORD_DOMAIN", "")
BROWSER_PAGE = 500


async def scope_of(db: AsyncSession, identity: Identity) -> list[str] | None:
    """None (every record) for a compliance officer; a data owner's own experts otherwise."""
    if "compliance_officer" in identity.roles:
        return None
    return await owned_expert_ids(db, identity)


def _filters(request: AnyRequest) -> dict[str, str]:
    return {
        name: value
        for name in QUERY_PARAMS
        if (value := request.query_params.get(name, "").strip()) and name != "limit"
    }


@get("/console/ledger", name="console:ledger")
async def ledger_page(
    request: AnyRequest, db_session: AsyncSession, identity: Identity
) -> Template:
    filters = _filters(request)
    params = {**filters, "limit": str(PAGE_SIZE)}
    error = None
    page = None
    try:
        query = RecordQuery.from_params(params, scope_experts=await scope_of(db_session, identity))
        page = await query_records(db_session, query)
    except InvalidQuery as exc:
        error = str(exc)
    next_link = None
    if page is not None and page.next_after is not None:
        next_link = "/console/ledger?" + urlencode({**filters, "after": page.next_after})
    first_link = None
    if filters.get("after"):
        first_link = "/console/ledger?" + urlencode(
            {k: v for k, v in filters.items() if k != "after"}
        )
    return render(
        request,
        "ledger.html",
        status_code=400 if error else 200,
        title="Ledger",
        filters=filters,
        records=page.records if page else [],
        next_link=next_link,
        first_link=first_link,
        error=error,
        statuses=STATUSES,
        expert_modes=EXPERT_MODES,
    )


async def stored_records(db: AsyncSession, *, after: int, limit: int) -> list[dict[str, Any]]:
    """Records with their payload exactly as stored (`payload_text`: the hashed bytes).

    The browser hashes these bytes rather than re-encoding a parsed payload, so its check
    does not depend on matching the server's number formatting.
    """
    stmt = (
        select(*RECORD_COLUMNS)
        .where(LedgerRecord.seq > after)
        .order_by(LedgerRecord.seq)
        .limit(limit)
    )
    async with translate_errors():
        rows = (await db.execute(stmt)).all()
    return [
        {
            "seq": int(seq),
            "id": rid,
            "kind": kind,
            "at": at,
            "principal": principal,
            "payload_text": payload,
            "prev_hash": prev_hash,
            "hash": digest,
        }
        for seq, rid, kind, at, principal, payload, prev_hash, digest in rows
    ]


def public_key_der_b64(pem: str) -> str:
    key = serialization.load_pem_public_key(pem.encode())
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def _public_key_for(settings: Settings, key_id: str) -> str | None:
    key = trusted_public_keys(settings.home).get(key_id)
    return None if key is None else public_key_pem(key)


@get("/console/ledger/{seq:int}", name="console:record")
async def record_page(
    request: AnyRequest, db_session: AsyncSession, identity: Identity, settings: Settings, seq: int
) -> Template:
    entry = await get_record(db_session, seq, scope_experts=await scope_of(db_session, identity))
    if entry is None:
        return render(
            request,
            "error.html",
            status_code=404,
            title="Not found",
            message=f"There is no record {seq} you may see.",
        )
    proof: dict[str, Any] | None = None
    proof_error = None
    try:
        proof = (await inclusion_proof(db_session, seq)).as_dict()
    except InvalidQuery as exc:
        proof_error = str(exc)
    pem = _public_key_for(settings, proof["checkpoint"]["key_id"]) if proof else None
    scope = await scope_of(db_session, identity)
    record: dict[str, Any] = entry.as_dict()
    if scope is None:  # an officer sees the record as stored: the browser hashes its bytes
        stored = await stored_records(db_session, after=seq - 1, limit=1)
        if stored and stored[0]["seq"] == seq:
            record = {**record, "payload_text": stored[0]["payload_text"]}
    check = {
        "record": record,
        "scoped": scope is not None,
        "record_domain": RECORD_DOMAIN,
        "proof": proof,
        "public_key_spki_b64": public_key_der_b64(pem) if pem else None,
    }
    return render(
        request,
        "record.html",
        title=f"Record {seq}",
        entry=entry.as_dict(),
        payload_text=json.dumps(entry.payload, indent=2, sort_keys=True, ensure_ascii=False),
        proof=proof,
        proof_error=proof_error,
        public_key_pem=pem,
        check_json=json.dumps(check, ensure_ascii=True).replace("<", "\\u003c"),
    )


async def _verify_config(db: AsyncSession, settings: Settings) -> str:
    """What verify.js needs: where to read records, how many, the checkpoint and its key."""
    cp = await latest_checkpoint(db)
    pem = _public_key_for(settings, cp.key_id) if cp else None
    async with translate_errors():
        head = await db.scalar(select(func.max(LedgerRecord.seq)))
    config = {
        "records_url": "/console/verify/records",
        "page": BROWSER_PAGE,
        "head_seq": int(head or 0),
        "record_domain": RECORD_DOMAIN,
        "checkpoint": cp.as_dict() if cp else None,
        "public_key_spki_b64": public_key_der_b64(pem) if pem else None,
    }
    return json.dumps(config).replace("<", "\\u003c")


@get("/console/verify", name="console:verify")
async def verify_page(
    request: AnyRequest, db_session: AsyncSession, settings: Settings
) -> Template:
    return render(
        request,
        "verify.html",
        title="Verify the ledger",
        report=None,
        config_json=await _verify_config(db_session, settings),
    )


@post("/console/verify", name="console:verify-run")
async def verify_run(request: AnyRequest, db_session: AsyncSession, settings: Settings) -> Template:
    """The server's own full verification (the same as `flexgate audit verify`)."""
    await csrf_form(request)
    report = await verify(db_session, public_keys=trusted_public_keys(settings.home), workers=1)
    return render(
        request,
        "verify.html",
        title="Verify the ledger",
        report=report.as_dict(),
        config_json=await _verify_config(db_session, settings),
    )


@get("/console/verify/records", name="console:verify-records")
async def verify_records(
    db_session: AsyncSession, after: int = 0, limit: int = BROWSER_PAGE
) -> Response[dict[str, Any]]:
    """Records as stored, a page at a time, for the browser's own chain check."""
    limit = max(1, min(limit, MAX_LIMIT))
    rows = await stored_records(db_session, after=max(0, after), limit=limit)
    more = len(rows) == limit
    return Response(
        {"records": rows, "next_after": rows[-1]["seq"] if more and rows else None},
        headers={"cache-control": "no-store"},
    )


def _label(row: UsageRow) -> str:
    return row.key if row.key is not None else "(none)"


@get("/console/usage", name="console:usage")
async def usage_page(request: AnyRequest, db_session: AsyncSession, identity: Identity) -> Template:
    since = request.query_params.get("since", "").strip() or None
    until = request.query_params.get("until", "").strip() or None
    expert = request.query_params.get("expert", "").strip() or None
    scope = await scope_of(db_session, identity)
    experts: list[str] | None = scope
    error = None
    charts: list[tuple[str, str, str]] = []
    if expert is not None:
        if scope is not None and expert not in scope:
            raise UnknownExpert(f"you own no expert {expert!r}")
        experts = [expert]
    try:
        if experts == []:
            rows_by: dict[str, list[Any]] = {"expert": [], "principal": [], "day": []}
        else:
            rows_by = {
                by: await usage(db_session, by=by, since=since, until=until, experts=experts)
                for by in ("expert", "principal", "day")
            }
        for by, heading in (
            ("expert", "By expert"),
            ("principal", "By principal"),
            ("day", "By day"),
        ):
            rows = rows_by[by]
            charts.append(
                (
                    heading,
                    bar_chart(
                        f"Tokens {heading.lower()}",
                        [Bar(_label(r), r.tokens) for r in rows],
                        unit="tokens",
                    ),
                    bar_chart(
                        f"Router weight {heading.lower()}",
                        [Bar(_label(r), r.weight) for r in rows],
                        decimals=1,
                    ),
                )
            )
        tables = rows_by
    except InvalidQuery as exc:
        error, tables = str(exc), {"expert": [], "principal": [], "day": []}
    return render(
        request,
        "usage.html",
        status_code=400 if error else 200,
        title="Usage",
        charts=charts,
        tables=tables,
        error=error,
        form={"since": since or "", "until": until or "", "expert": expert or ""},
        my_experts=scope,
    )


@get("/console/export", name="console:export")
async def export_page(request: AnyRequest) -> Template:
    return render(request, "export.html", title="Export")


@get("/console/export/download", name="console:export-download")
async def export_download(
    request: AnyRequest,
    settings: Settings,
    format: str = "jsonl",
    since: str | None = None,
    until: str | None = None,
) -> Stream | Template:
    sm = request.app.state.sessionmaker
    session = sm()
    pem = None
    cp = None
    try:
        async with translate_errors():
            cp = await latest_checkpoint(session)
        if cp is not None:
            pem = _public_key_for(settings, cp.key_id)
        lines = await export_lines(
            session, fmt=format, since=since or None, until=until or None, public_key_pem=pem
        )
    except InvalidQuery as exc:
        await session.close()
        return render(
            request,
            "export.html",
            status_code=400,
            title="Export",
            errors={"export": str(exc)},
            form={"format": format, "since": since or "", "until": until or ""},
        )
    except BaseException:
        await session.close()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            async for line in lines:
                yield line.encode("utf-8")
        finally:
            await session.close()

    ext = "csv" if format == "csv" else "jsonl"
    return Stream(
        body(),
        media_type="text/csv" if ext == "csv" else "application/x-ndjson",
        headers={"content-disposition": f'attachment; filename="flexgate-ledger.{ext}"'},
    )


HANDLERS = [
    ledger_page,
    record_page,
    verify_page,
    verify_run,
    verify_records,
    usage_page,
    export_page,
    export_download,
]
