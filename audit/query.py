"""Queries over the ledger: filtered record pages, single records, usage aggregation.

Library functions the gateway's `/v1/audit/*` routes and the CLI call with a session. Filters
arrive as strings (query parameters, CLI options) and are parsed by `RecordQuery.from_params`;
anything malformed raises `InvalidQuery` with a message fit to show the caller. Payload fields
are read with the database's JSON functions (PostgreSQL: the payload text cast to JSONB;
SQLite: JSON1), so what a query matches is exactly the hashed text.

Expert filters (`expert_mode`): `used` — the expert computed tokens for the request
(`usage[e].tokens > 0`); `allowed` — it was in the allowed set; `excluded` — it was left out
(any reason); `any` — allowed, excluded, or a governance record naming it (`payload.expert`),
which is what a data owner may see about their experts.

Owner scope (`scope_experts`, the experts a data owner owns, computed by the gateway): an
inference record (`inference`, `inference.started`, `inference.aborted`) is in scope only
when one of those experts was allowed to run in it, and it is returned redacted
(`owner_view`): purpose, status and, for those experts only, allowed/excluded status and
usage; never the text, the prompt hash, the other experts or their usage. A governance record
is in scope when it names one of them (`payload.expert`), and is returned whole.

Usage aggregation reads the `ledger_usage` summary and the short tail of records not yet folded
into it (`audit.summary`), so it costs about the same at a thousand records or a billion;
bounds inside an hour add a scan of just those part-hours.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Text,
    and_,
    cast,
    exists,
    func,
    literal,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncSession

from audit.canonical import format_time, parse_time
from audit.db import db_errors
from audit.errors import InvalidQuery
from audit.ledger import INFERENCE, Entry, inference_usage
from audit.models import PAYLOAD_TEXT, RECORD_COLUMNS, LedgerRecord
from audit.summary import usage_cells
from contracts.experts import ID_PATTERN

MAX_LIMIT = 1000
MAX_SEQ = 2**63 - 1  # seqs are bigints: a larger cursor is bad input, not a database error
INFERENCE_KINDS = (INFERENCE, "inference.started", "inference.aborted")
EXPERT_MODES = ("used", "allowed", "excluded", "any")
STATUSES = ("ok", "error", "cancelled")
# Expert ids: the one grammar (contracts.experts), shared with the engine and governance.
_ID_RE = re.compile(ID_PATTERN)
# Principals also include system actors such as `operator:cli`.
_PRINCIPAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,254}")
_PURPOSE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
QUERY_PARAMS = (
    "kind",
    "principal",
    "expert",
    "expert_mode",
    "purpose",
    "status",
    "since",
    "until",
    "after",
    "limit",
)


def _check(value: str | None, pattern: re.Pattern[str], what: str) -> None:
    if value is not None and (not isinstance(value, str) or not pattern.fullmatch(value)):
        raise InvalidQuery(f"invalid {what} {value!r}")


def parse_when(value: str | date | datetime | None, what: str) -> datetime | None:
    """An ISO 8601 time (or date: midnight UTC); naive means UTC. InvalidQuery if malformed."""
    if value is None or isinstance(value, datetime):
        return None if value is None else parse_time(value.isoformat())
    if isinstance(value, date):
        return datetime.combine(value, time(), tzinfo=UTC)
    try:
        return parse_time(value)
    except ValueError:
        raise InvalidQuery(
            f"invalid {what} {value!r}: use ISO 8601, e.g. 2026-11-28 or 2026-11-28T12:00:00Z"
        ) from None


def _parse_int(value: str | int | None, what: str, low: int, high: int | None) -> int | None:
    if value is None or isinstance(value, int):
        number = value
    else:
        try:
            number = int(value, 10)
        except ValueError:
            number = None
        if number is None or not value.strip().isdigit():
            raise InvalidQuery(f"invalid {what} {value!r}: expected a whole number")
    if number is not None and (number < low or (high is not None and number > high)):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidQuery(f"invalid {what} {number}: must be {bound}")
    return number


@dataclass(frozen=True)
class RecordQuery:
    """Filters and cursor of a page of records; invalid values raise InvalidQuery.

    `after` is the cursor: the seq of the last record already seen (a page's `next_after`).
    `scope_experts`, set by the gateway for a data owner, restricts results to records about
    any of those experts (`expert_mode=any` semantics) on top of the other filters.
    """

    kind: str | None = None
    principal: str | None = None
    expert: str | None = None
    expert_mode: str = "used"
    purpose: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after: int | None = None
    limit: int = 100
    scope_experts: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.scope_experts is not None and isinstance(self.scope_experts, str):
            raise InvalidQuery("scope_experts is a collection of expert ids, not one string")
        _check(self.kind, _KIND_RE, "kind")
        _check(self.principal, _PRINCIPAL_RE, "principal")
        _check(self.expert, _ID_RE, "expert")
        _check(self.purpose, _PURPOSE_RE, "purpose")
        for expert in self.scope_experts or ():
            _check(expert, _ID_RE, "expert")
        if self.expert_mode not in EXPERT_MODES:
            raise InvalidQuery(
                f"invalid expert_mode {self.expert_mode!r}: one of {', '.join(EXPERT_MODES)}"
            )
        if self.status is not None and self.status not in STATUSES:
            raise InvalidQuery(f"invalid status {self.status!r}: one of {', '.join(STATUSES)}")
        _parse_int(self.after, "after", 0, MAX_SEQ)
        _parse_int(self.limit, "limit", 1, MAX_LIMIT)
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, datetime):
                raise InvalidQuery(f"invalid {name}: expected a datetime")
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise InvalidQuery("since must be earlier than until")

    @classmethod
    def from_params(
        cls, params: Mapping[str, Any], *, scope_experts: Sequence[str] | None = None
    ) -> RecordQuery:
        """Parse string parameters (HTTP query, CLI); unknown names are refused."""
        unknown = sorted(set(params) - set(QUERY_PARAMS))
        if unknown:
            raise InvalidQuery(
                f"unknown filter {', '.join(unknown)}: use {', '.join(QUERY_PARAMS)}"
            )
        values: dict[str, Any] = {}
        for name, value in params.items():
            if value is None or value == "":
                continue
            if not isinstance(value, str | int):
                raise InvalidQuery(f"filter {name} takes one value")
            values[name] = value
        after = _parse_int(values.pop("after", None), "after", 0, MAX_SEQ)
        limit = _parse_int(values.pop("limit", None), "limit", 1, MAX_LIMIT)
        since = parse_when(values.pop("since", None), "since")
        until = parse_when(values.pop("until", None), "until")
        return cls(
            **values,
            since=since,
            until=until,
            after=after,
            limit=100 if limit is None else limit,
            scope_experts=None if scope_experts is None else tuple(scope_experts),
        )


@dataclass(frozen=True)
class Page:
    records: list[Entry]
    next_after: int | None  # pass as `after` for the next page; None when this was the last

    def as_dict(self) -> dict[str, Any]:
        return {
            "records": [r.as_dict() for r in self.records],
            "next_after": self.next_after,
        }


def entry_of(row: Any) -> Entry:
    """An Entry from (seq, id, kind, at, principal, payload, prev_hash, hash) as stored."""
    seq, rid, kind, at, principal, payload, prev_hash, digest = row
    return Entry(
        int(seq), rid, kind, parse_time(at), principal, json.loads(payload), prev_hash, digest
    )


class _Json:
    """Payload JSON expressions for one dialect (ids are validated before they reach here)."""

    def __init__(self, dialect: str) -> None:
        self.pg = dialect == "postgresql"
        text = type_coerce(LedgerRecord.payload, Text)
        self.doc: Any = cast(text, JSONB) if self.pg else text

    def text(self, key: str) -> ColumnElement[Any]:
        if self.pg:
            return self.doc[key].astext  # type: ignore[no-any-return]
        return func.json_extract(self.doc, f"$.{key}")

    def used(self, expert: str) -> ColumnElement[bool]:
        if self.pg:
            tokens = self.doc["usage"][expert]["tokens"].astext
            return cast(tokens, BigInteger) > 0
        return func.json_extract(self.doc, f'$.usage."{expert}".tokens') > 0

    def excluded(self, expert: str) -> ColumnElement[bool]:
        if self.pg:
            return self.doc["experts_excluded"].has_key(expert)  # type: ignore[no-any-return]
        return func.json_type(self.doc, f'$.experts_excluded."{expert}"').is_not(None)

    def allowed(self, expert: str) -> ColumnElement[bool]:
        if self.pg:
            return self.doc["experts_allowed"].has_key(expert)  # type: ignore[no-any-return]
        each = func.json_each(self.doc, "$.experts_allowed").table_valued("value")
        return exists(select(literal(1)).select_from(each).where(each.c.value == expert))

    def about(self, expert: str) -> ColumnElement[bool]:
        return or_(self.allowed(expert), self.excluded(expert), self.text("expert") == expert)

    def expert(self, expert: str, mode: str) -> ColumnElement[bool]:
        return {
            "used": self.used,
            "allowed": self.allowed,
            "excluded": self.excluded,
            "any": self.about,
        }[mode](expert)


def _conditions(query: RecordQuery, dialect: str) -> list[ColumnElement[bool]]:
    j = _Json(dialect)
    where: list[ColumnElement[bool]] = []
    if query.after is not None:
        where.append(LedgerRecord.seq > query.after)
    if query.kind is not None:
        where.append(LedgerRecord.kind == query.kind)
    if query.principal is not None:
        where.append(LedgerRecord.principal == query.principal)
    if query.since is not None:
        where.append(LedgerRecord.at >= format_time(query.since))
    if query.until is not None:
        where.append(LedgerRecord.at < format_time(query.until))
    if query.purpose is not None:
        where.append(j.text("purpose") == query.purpose)
    if query.status is not None:
        where.append(j.text("status") == query.status)
    if query.expert is not None:
        where.append(j.expert(query.expert, query.expert_mode))
    if query.scope_experts is not None:
        experts = query.scope_experts
        if not experts:
            where.append(literal(False))
        else:
            inference = LedgerRecord.kind.in_(INFERENCE_KINDS)
            where.append(
                or_(
                    and_(inference, or_(*[j.allowed(e) for e in experts])),
                    and_(~inference, or_(*[j.text("expert") == e for e in experts])),
                )
            )
    return where


def owner_view(entry: Entry, experts: Sequence[str]) -> Entry:
    """An inference record as a data owner owning `experts` may see it (module docstring):
    the payload is replaced by `{"redacted": true, "purpose", "status", "experts": {id:
    {"allowed", "excluded", "tokens", "weight"}}}` for those experts only. The record's hash
    is kept (it identifies the record in proofs); the redacted payload does not hash to it."""
    p = entry.payload
    allowed = p.get("experts_allowed")
    allowed = set(allowed) if isinstance(allowed, list) else set()
    excluded = p.get("experts_excluded")
    excluded = excluded if isinstance(excluded, dict) else {}
    used = p.get("usage")
    used = used if isinstance(used, dict) else {}
    view: dict[str, Any] = {}
    for expert in sorted(set(experts)):
        if expert not in allowed and expert not in excluded:
            continue
        item = used.get(expert)
        item = item if isinstance(item, dict) else {}
        view[expert] = {
            "allowed": expert in allowed,
            "excluded": excluded.get(expert),
            "tokens": item.get("tokens", 0),
            "weight": item.get("weight", 0.0),
        }
    payload = {
        "redacted": True,
        "purpose": p.get("purpose"),
        "status": p.get("status"),
        "experts": view,
    }
    return replace(entry, payload=payload)


def _scoped(entry: Entry, scope: Sequence[str] | None) -> Entry:
    if scope is None or entry.kind not in INFERENCE_KINDS:
        return entry
    return owner_view(entry, scope)


@db_errors
async def query_records(session: AsyncSession, query: RecordQuery) -> Page:
    """One page of records matching `query`, in seq order after `query.after`."""
    conn = await session.connection()
    stmt = (
        select(*RECORD_COLUMNS)
        .where(*_conditions(query, conn.dialect.name))
        .order_by(LedgerRecord.seq)
        .limit(query.limit)
    )
    rows = (await conn.execute(stmt)).all()
    records = [_scoped(entry_of(r), query.scope_experts) for r in rows]
    more = len(records) == query.limit
    return Page(records, records[-1].seq if more and records else None)


@db_errors
async def get_record(
    session: AsyncSession, seq: int, *, scope_experts: Sequence[str] | None = None
) -> Entry | None:
    """Record `seq`, or None (also None when `scope_experts` is given and it is not in that
    owner's scope; an inference record in scope comes redacted, see `owner_view`)."""
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_SEQ:
        raise InvalidQuery(f"invalid seq {seq!r}: expected a whole number >= 1")
    query = RecordQuery(
        scope_experts=None if scope_experts is None else tuple(scope_experts), limit=1
    )
    conn = await session.connection()
    where = [LedgerRecord.seq == seq, *_conditions(query, conn.dialect.name)]
    row = (await conn.execute(select(*RECORD_COLUMNS).where(*where))).first()
    return None if row is None else _scoped(entry_of(row), query.scope_experts)


# --- usage ---

UsageBy = Literal["expert", "principal", "day"]


@dataclass(frozen=True)
class UsageRow:
    key: str | None  # the expert id, principal (None: no principal) or day (YYYY-MM-DD)
    requests: int
    tokens: int
    weight: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "requests": self.requests,
            "tokens": self.tokens,
            "weight": self.weight,
        }


def _hour_start(value: datetime) -> datetime:
    return value.replace(minute=0, second=0, microsecond=0)


@db_errors
async def usage(
    session: AsyncSession,
    *,
    by: str = "expert",
    since: str | date | datetime | None = None,
    until: str | date | datetime | None = None,
    experts: Sequence[str] | None = None,
    principal: str | None = None,
    purpose: str | None = None,
) -> list[UsageRow]:
    """Usage of experts from `inference` records, grouped `by` expert, principal or day.

    tokens and weight are the engine's per-expert usage summed; `requests` counts requests:
    per expert, those in which it computed tokens; per principal or day, every request once
    (with `experts` given: once per (request, listed expert used)). `experts` restricts to
    those experts (a data owner's); since/until bound the records' time ([since, until)).
    """
    if by not in ("expert", "principal", "day"):
        raise InvalidQuery(f"invalid by {by!r}: one of expert, principal, day")
    for e in experts or ():
        _check(e, _ID_RE, "expert")
    _check(principal, _PRINCIPAL_RE, "principal")
    _check(purpose, _PURPOSE_RE, "purpose")
    start, end = parse_when(since, "since"), parse_when(until, "until")
    if start is not None and end is not None and start >= end:
        raise InvalidQuery("since must be earlier than until")

    # Whole hours come from the summary; a bound inside an hour adds a scan of that part-hour.
    acc: dict[str | None, list[float]] = {}
    filters = (by, experts, principal, purpose)
    lo, hi = start, end
    if lo is not None and lo != _hour_start(lo):
        head_end = _hour_start(lo) + timedelta(hours=1)
        head_end = head_end if hi is None else min(head_end, hi)
        await _scan_usage(session, acc, lo, head_end, *filters)
        lo = head_end
    if hi is not None and hi != _hour_start(hi) and (lo is None or lo < hi):
        tail_start = _hour_start(hi) if lo is None else max(_hour_start(hi), lo)
        await _scan_usage(session, acc, tail_start, hi, *filters)
        hi = tail_start
    if lo is None or hi is None or lo < hi:
        await _summary_usage(session, acc, lo, hi, *filters)
    rows = [UsageRow(k, int(v[0]), int(v[1]), float(v[2])) for k, v in acc.items()]
    return sorted(rows, key=lambda r: (r.key is None, r.key or ""))


async def _summary_usage(
    session: AsyncSession,
    acc: dict[str | None, list[float]],
    start: datetime | None,
    end: datetime | None,
    by: str,
    experts: Sequence[str] | None,
    principal: str | None,
    purpose: str | None,
) -> None:
    """Whole hours: the summary plus the unfolded tail, in one statement (one snapshot)."""
    cells = usage_cells((await session.connection()).dialect.name)
    key: Any = {
        "expert": cells.c.expert,
        "principal": cells.c.principal,
        "day": func.substr(cells.c.hour, 1, 10),
    }[by]
    where: list[ColumnElement[bool]] = []
    if experts is not None:
        where.append(cells.c.expert.in_(list(experts)))
    elif by == "expert":
        where.append(cells.c.expert != "")
    else:
        where.append(cells.c.expert == "")
    if start is not None:
        where.append(cells.c.hour >= format_time(start)[:13])
    if end is not None:
        where.append(cells.c.hour < format_time(end)[:13])
    if principal is not None:
        where.append(cells.c.principal == principal)
    if purpose is not None:
        where.append(cells.c.purpose == purpose)
    stmt = (
        select(
            key,
            func.sum(cells.c.requests),
            func.sum(cells.c.tokens),
            func.sum(cells.c.weight),
        )
        .where(*where)
        .group_by(key)
    )
    for k, requests, tokens, weight in (await session.execute(stmt)).all():
        name = None if by == "principal" and k == "" else k
        cell = acc.setdefault(name, [0, 0, 0.0])
        cell[0] += int(requests or 0)
        cell[1] += int(tokens or 0)
        cell[2] += float(weight or 0.0)


async def _scan_usage(
    session: AsyncSession,
    acc: dict[str | None, list[float]],
    start: datetime,
    end: datetime,
    by: str,
    experts: Sequence[str] | None,
    principal: str | None,
    purpose: str | None,
) -> None:
    """Sum part-days from the records themselves, through the same reading as the summary."""
    cells: dict[tuple[str, str, str, str], list[float]] = {}
    async for rec_at, rec_principal, payload in _inference_between(session, start, end):
        rec_purpose, per_expert = inference_usage(payload)
        if principal is not None and rec_principal != principal:
            continue
        if purpose is not None and rec_purpose != purpose:
            continue
        _add_usage(cells, rec_at[:13], rec_principal or "", rec_purpose, per_expert)
    for (hour, prin, _purpose, expert), (requests, tokens, weight) in cells.items():
        if experts is not None:
            if expert not in experts:
                continue
        elif (by == "expert") != (expert != ""):
            continue
        k = {"expert": expert, "principal": prin or None, "day": hour[:10]}[by]
        cell = acc.setdefault(k, [0, 0, 0.0])
        cell[0] += requests
        cell[1] += tokens
        cell[2] += weight


def _add_usage(
    acc: dict[tuple[str, str, str, str], list[float]],
    hour: str,
    principal: str,
    purpose: str,
    per_expert: tuple[tuple[str, int, float], ...],
) -> None:
    """Add one request's usage to (hour, principal, purpose, expert) cells, as the summary
    counts it: per expert when its tokens or weight are non-zero, and the totals (`""`)."""
    total_tokens, total_weight = 0, 0.0
    for expert, tokens, weight in per_expert:
        total_tokens += tokens
        total_weight += weight
        if tokens or weight:
            cell = acc.setdefault((hour, principal, purpose, expert), [0, 0, 0.0])
            cell[0] += 1
            cell[1] += tokens
            cell[2] += weight
    cell = acc.setdefault((hour, principal, purpose, ""), [0, 0, 0.0])
    cell[0] += 1
    cell[1] += total_tokens
    cell[2] += total_weight


async def _inference_between(
    session: AsyncSession, start: datetime, end: datetime, page: int = 1000
) -> AsyncIterator[tuple[str, str | None, dict[str, Any]]]:
    after = 0
    while True:
        rows = (
            await session.execute(
                select(LedgerRecord.seq, LedgerRecord.at, LedgerRecord.principal, PAYLOAD_TEXT)
                .where(
                    LedgerRecord.kind == INFERENCE,
                    LedgerRecord.at >= format_time(start),
                    LedgerRecord.at < format_time(end),
                    LedgerRecord.seq > after,
                )
                .order_by(LedgerRecord.seq)
                .limit(page)
            )
        ).all()
        for _seq, at, prin, payload in rows:
            yield at, prin, json.loads(payload)
        if len(rows) < page:
            return
        after = rows[-1][0]
