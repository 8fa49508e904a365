"""Checks of derived state: tables whose contents follow from the ledger's records.

`flexgate audit verify` recomputes what it can from the records itself (the usage summary,
`audit.summary`), and asks plugins for the rest: every entry point of the group
`flexgate.derived_checks` is an `async def check(engine: AsyncEngine) -> list[DerivedFinding]`
(governance registers one that replays its records against the Casbin rules in force). audit
imports none of them by name, so it keeps importing nothing of governance.
"""

from __future__ import annotations

from dataclasses import dataclass

ENTRY_POINT_GROUP = "flexgate.derived_checks"


@dataclass(frozen=True)
class DerivedFinding:
    """What one derived table was found to be: `ok` when it matches the records replayed."""

    table: str
    ok: bool
    detail: str


__all__ = ["ENTRY_POINT_GROUP", "DerivedFinding"]
