"""Readiness: what a load balancer needs to know before it sends a request here."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import text

DB_TIMEOUT_S = 2.0


def ledger_signing_refused() -> str | None:
    """Why this process's ledger refused to sign a checkpoint, if it did: the ledger does not
    extend the checkpoint anchored outside the database (audit.anchor), so serving on would
    append to a history that can no longer be proven. None while anchoring is healthy."""
    from audit.anchor import health

    state = health()
    return None if state.ok else (state.detail or "the ledger does not extend its anchor")


async def readiness(state: Any) -> dict[str, str]:
    """check name -> "ok" or why not; the probe is ready when every value is "ok"."""
    checks: dict[str, str] = {}
    checks["model"] = (
        "ok" if state.get("engine") is not None and state.get("ready") else ("not loaded")
    )
    sessionmaker = state.get("sessionmaker")
    if sessionmaker is None:
        checks["database"] = "not connected"
    else:
        try:
            async with asyncio.timeout(DB_TIMEOUT_S), sessionmaker() as session:
                await session.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:  # any failure means not ready; the reason is for operators
            checks["database"] = f"unreachable ({type(exc).__name__})"
    refused = ledger_signing_refused()
    checks["ledger"] = (
        "ok"
        if state.get("ledger") is not None and not refused
        else (f"checkpoint signing refused: {refused}" if refused else "not running")
    )
    return checks
