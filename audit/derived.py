"""Checks of derived state: tables whose contents follow from the ledger's records.

`flexgate audit verify` recomputes what it can from the records itself (the usage summary,
`audit.summary`), and asks plugins for the rest: every entry point of the group
`flexgate.derived_checks` is an `async def check(engine: AsyncEngine) -> list[DerivedFinding]`
(governance registers one that replays its records against the Casbin rules in force). audit
imports none of them by name, so it keeps importing nothing of governance.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "flexgate.derived_checks"
# A weight sum is a float: summed in another order it may differ in its last bits.
WEIGHT_RTOL = 1e-9


@dataclass(frozen=True)
class DerivedFinding:
    """What one derived table was found to be: `ok` when it matches the records replayed."""

    table: str
    ok: bool
    detail: str


DerivedCheck = Callable[[AsyncEngine], Awaitable[list[DerivedFinding]]]


async def check_usage_summary(engine: AsyncEngine) -> list[DerivedFinding]:
    """Recompute `ledger_usage` from the inference records up to its watermark and compare
    cell by cell (requests and tokens exactly, weight to a relative 1e-9); the watermark must
    not pass the chain head. The records themselves are what `audit verify` just checked."""
    from audit.summary import cells_sql

    async with engine.connect() as conn:
        mark = (await conn.execute(text("SELECT seq FROM ledger_usage_mark WHERE id = 1"))).first()
        head = (await conn.execute(text("SELECT seq FROM ledger_head WHERE id = 1"))).scalar()
        if mark is None:
            return [DerivedFinding("ledger_usage_mark", False, "the watermark row is missing")]
        upto = int(mark[0])
        if head is not None and upto > int(head):
            return [
                DerivedFinding(
                    "ledger_usage_mark",
                    False,
                    f"the watermark ({upto}) is beyond the chain head ({int(head)})",
                )
            ]
        expected: dict[tuple[str, str, str, str], tuple[int, int, float]] = {}
        sql = cells_sql(conn.dialect.name, ":lo", ":hi")
        for row in await conn.execute(text(sql), {"lo": 0, "hi": upto}):
            expected[(row[0], row[1], row[2], row[3])] = (int(row[4]), int(row[5]), float(row[6]))
        stored: dict[tuple[str, str, str, str], tuple[int, int, float]] = {}
        rows = await conn.execute(
            text(
                "SELECT hour, principal, purpose, expert, requests, tokens, weight "
                "FROM ledger_usage"
            )
        )
        for row in rows:
            stored[(row[0], row[1], row[2], row[3])] = (int(row[4]), int(row[5]), float(row[6]))
    bad: list[str] = []
    for key in sorted(set(expected) | set(stored)):
        want, have = expected.get(key), stored.get(key)
        if want == have:
            continue
        if (
            want is not None
            and have is not None
            and want[:2] == have[:2]
            and math.isclose(want[2], have[2], rel_tol=WEIGHT_RTOL, abs_tol=1e-9)
        ):
            continue
        hour, principal, purpose, expert = key
        cell = f"hour {hour}, principal {principal!r}, purpose {purpose!r}, expert {expert!r}"
        bad.append(f"{cell}: records say {want}, the table holds {have}")
    if bad:
        more = f" (and {len(bad) - 3} more cells)" if len(bad) > 3 else ""
        detail = "; ".join(bad[:3]) + more
        return [DerivedFinding("ledger_usage", False, detail)]
    return [
        DerivedFinding(
            "ledger_usage",
            True,
            f"{len(stored)} cells match the records up to seq {upto}",
        )
    ]


def plugin_checks() -> list[tuple[str, DerivedCheck]]:
    """The entry points of group `flexgate.derived_checks`, by name."""
    out: list[tuple[str, DerivedCheck]] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        out.append((ep.name, ep.load()))
    return out


async def check_derived(engine: AsyncEngine) -> list[DerivedFinding]:
    """The usage summary, then every plugin; a plugin that cannot be loaded or raises is a
    finding that fails (a check that did not run never passes)."""
    findings = await check_usage_summary(engine)
    try:
        plugins = plugin_checks()
    except Exception as exc:  # a broken plugin: reported, never a traceback
        return [*findings, DerivedFinding(ENTRY_POINT_GROUP, False, f"cannot load: {exc}")]
    for name, check in plugins:
        try:
            result: Any = await check(engine)
            findings.extend(
                f if isinstance(f, DerivedFinding) else DerivedFinding(name, False, repr(f))
                for f in result
            )
        except Exception as exc:
            log.exception("derived check %s failed", name)
            findings.append(DerivedFinding(name, False, f"the check failed: {exc}"))
    return findings


__all__ = [
    "ENTRY_POINT_GROUP",
    "DerivedCheck",
    "DerivedFinding",
    "check_derived",
    "check_usage_summary",
    "plugin_checks",
]
