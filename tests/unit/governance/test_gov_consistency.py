"""Changes are atomic with their ledger record, versioned, and seen by every process.

- every change bumps the policy version once and appends one ledger record naming it;
- a failing ledger append rolls the whole change back;
- a revocation committed by another process (the real CLI) is honoured by this process's
  next decision, and the watcher reports it within a second;
- concurrent writers are serialised: a racing duplicate grant is refused, not doubled.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from gov_helpers import EXPERTS, OLGA, OPERATOR, World, state, write_model
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

import audit.ledger
from audit.models import LedgerRecord
from governance import errors, experts
from governance.auth import authenticate
from governance.changes import read_version
from governance.experts import (
    assign_owner,
    reinstate_expert,
    sync_experts,
    withdraw_expert,
)
from governance.keys import create_key, revoke_key
from governance.licenses import deny, grant_license, lift_denial, revoke_license
from governance.principals import add_principal
from governance.store import PolicyStore
from governance.watcher import DEFAULT_INTERVAL_S, PolicyChange, PolicyWatcher

ROOT = Path(__file__).resolve().parents[3]


async def _ledger(world: World) -> list[LedgerRecord]:
    async with world.sm() as s:
        return list((await s.execute(select(LedgerRecord).order_by(LedgerRecord.seq))).scalars())


async def test_every_change_bumps_the_version_and_is_ledgered(world: World) -> None:
    async with world.sm() as s:
        version = await read_version(s)
    seq = len(await _ledger(world))
    steps: list[tuple[str, str, str]] = []  # (kind, id the payload names, actor)
    op = OPERATOR.id
    async with world.sm() as s:
        p = await add_principal(s, actor=OPERATOR, principal_id="olive", roles=["data_owner"])
        steps.append(("principal.created", p.id, op))
        key, _ = await create_key(s, actor=OPERATOR, principal_id="olive")
        steps.append(("key.created", key.id, op))
        await revoke_key(s, actor=OPERATOR, key_id=key.id)
        steps.append(("key.revoked", key.id, op))
        await assign_owner(s, actor=OPERATOR, expert_id="math", owner_id="olive")
        steps.append(("expert.owner_assigned", "math", op))
        lic = await grant_license(s, actor=OLGA, expert_id="code", grantee="group:research")
        steps.append(("license.granted", lic.id, "olga"))
        await revoke_license(s, actor=OLGA, license_id=lic.id)
        steps.append(("license.revoked", lic.id, "olga"))
        den = await deny(s, actor=OLGA, expert_id="code", grantee="app-1")
        steps.append(("license.denied", den.id, "olga"))
        await lift_denial(s, actor=OLGA, denial_id=den.id)
        steps.append(("license.deny_lifted", den.id, "olga"))
        await withdraw_expert(s, actor=OLGA, expert_id="code")
        steps.append(("expert.withdrawn", "code", "olga"))
        await reinstate_expert(s, actor=OLGA, expert_id="code")
        steps.append(("expert.reinstated", "code", "olga"))
        assert await read_version(s) == version + len(steps)
    records = (await _ledger(world))[seq:]
    assert [r.kind for r in records] == [kind for kind, _, _ in steps]
    for n, (record, (_, subject, actor)) in enumerate(zip(records, steps, strict=True)):
        assert record.payload["policy_version"] == version + n + 1
        assert subject in record.payload.values()
        assert record.principal == actor


async def test_failed_ledger_append_rolls_the_change_back(
    world: World, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    async with world.sm() as s:
        lic = await grant_license(s, actor=OLGA, expert_id="code", grantee="app-1")
        key, _ = await create_key(s, actor=OPERATOR, principal_id="app-1")
        await withdraw_expert(s, actor=OPERATOR, expert_id="news")
    grown = write_model(tmp_path / "grown", [*EXPERTS, {"id": "law", "owner": "olga"}])
    heard: list[tuple[str, str]] = []
    unsubscribe = experts.on_withdrawal(lambda e, status: heard.append((e, status)))
    real_append = audit.ledger.append

    async def failing_append(session: Any, **kw: Any) -> Any:
        await real_append(session, **kw)  # the record is written, then the disk "fills up"
        raise OSError("ledger disk full")

    monkeypatch.setattr(audit.ledger, "append", failing_append)
    before = await state(world.sm)
    ops: list[Callable[[AsyncSession], Awaitable[Any]]] = [
        lambda s: add_principal(s, actor=OPERATOR, principal_id="new", roles=["application"]),
        lambda s: create_key(s, actor=OPERATOR, principal_id="app-1"),
        lambda s: revoke_key(s, actor=OPERATOR, key_id=key.id),
        lambda s: grant_license(s, actor=OLGA, expert_id="code", grantee="app-2"),
        lambda s: revoke_license(s, actor=OLGA, license_id=lic.id),
        lambda s: deny(s, actor=OLGA, expert_id="code", grantee="app-3"),
        lambda s: withdraw_expert(s, actor=OLGA, expert_id="code"),
        lambda s: reinstate_expert(s, actor=OPERATOR, expert_id="news"),
        lambda s: assign_owner(s, actor=OPERATOR, expert_id="math", owner_id="olga"),
        lambda s: sync_experts(s, actor=OPERATOR, model_dir=grown),
    ]
    try:
        for n, op in enumerate(ops):
            async with world.sm() as s:
                with pytest.raises(OSError, match="disk full"):
                    await op(s)
            assert await state(world.sm) == before, n
    finally:
        unsubscribe()
    assert heard == []  # no listener hears of a change that did not happen


async def _cli(world: World, *args: str) -> str:
    env = {
        **os.environ,
        "FLEXGATE_DATABASE_URL": world.url,
        "FLEXGATE_MODEL": str(world.model_dir),
        "PYTHONPATH": str(ROOT),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        *args,
        env=env,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_revocation_in_another_process_is_honoured_at_once(world: World) -> None:
    """The next decision sees a revocation another process committed, and the running
    watcher reports it from the first poll that starts after the commit (or one already in
    flight): counted in polls, not timed; the poll interval bounds the delay (within 1 s:
    bench/governance.py --watcher measures it)."""
    async with world.sm() as s:
        lic = await grant_license(s, actor=OLGA, expert_id="code", grantee="app-3")
        key, token = await create_key(s, actor=OPERATOR, principal_id="app-3")
    store = PolicyStore()
    watcher = PolicyWatcher(world.sm, store, interval=0.05)
    assert DEFAULT_INTERVAL_S < 0.5  # two intervals, whatever a poll takes, stay under 1 s
    polls = 0
    real_poll = watcher.poll_once

    async def counted_poll() -> PolicyChange | None:
        nonlocal polls
        polls += 1
        return await real_poll()

    watcher.poll_once = counted_poll  # type: ignore[method-assign]
    changes: list[tuple[int, PolicyChange]] = []
    reported = asyncio.Event()

    def on_change(change: PolicyChange) -> None:
        changes.append((polls, change))  # the ordinal of the poll that saw it
        reported.set()

    watcher.subscribe(on_change)
    async with watcher:
        async with world.sm() as s:
            assert "code" in (await store.snapshot(s)).allowed_experts("app-3").allowed
            assert (await authenticate(s, f"Bearer {token}")).id == "app-3"
        await asyncio.wait_for(reported.wait(), timeout=30)  # the watcher's first poll
        assert changes[0][1].previous is None
        changes.clear()
        reported.clear()

        await _cli(world, "licenses", "revoke", lic.id)  # process A
        started_before_return = polls
        async with world.sm() as s:  # process B's very next decision
            snap = await store.snapshot(s)
            assert snap.allowed_experts("app-3").excluded["code"] == "no-license"
        await asyncio.wait_for(reported.wait(), timeout=30)
        seen_by, change = changes[0]
        assert seen_by <= started_before_return + 1, (seen_by, started_before_return)
        assert change.current.version >= snap.version
        assert change.current.allowed_experts("app-3").excluded["code"] == "no-license"

        await _cli(world, "keys", "revoke", key.id)
        async with world.sm() as s:
            with pytest.raises(errors.AuthenticationFailed, match="revoked"):
                await authenticate(s, f"Bearer {token}")


async def test_watcher_and_listeners_report_withdrawal(world: World) -> None:
    heard: list[tuple[str, str]] = []
    unsubscribe = experts.on_withdrawal(lambda e, status: heard.append((e, status)))
    seen: list[PolicyChange] = []
    watcher = PolicyWatcher(world.sm, world.store, interval=0.05)
    watcher.subscribe(seen.append)
    try:
        assert await watcher.poll_once() is not None  # first snapshot
        assert await watcher.poll_once() is None  # nothing moved
        async with world.sm() as s:
            await withdraw_expert(s, actor=OLGA, expert_id="code")
        assert heard == [("code", "withdrawn")]
        change = await watcher.poll_once()
        assert change is not None and change.withdrawn == {"code"}
        assert change.current.allowed_experts("app-1").excluded["code"] == "withdrawn"
        async with world.sm() as s:
            await reinstate_expert(s, actor=OLGA, expert_id="code")
        change = await watcher.poll_once()
        assert change is not None and change.reinstated == {"code"} and not change.withdrawn
        assert heard[-1] == ("code", "reinstated")
        assert len(seen) == 3
    finally:
        unsubscribe()


async def test_concurrent_writers_are_serialised(world: World) -> None:
    async def grant(grantee: str) -> Any:
        async with world.sm() as s:
            return await grant_license(s, actor=OLGA, expert_id="code", grantee=grantee)

    async with world.sm() as s:
        version = await read_version(s)
    grantees = ["app-1", "app-2", "app-3", "group:research", "role:application"]
    results = await asyncio.gather(*(grant(g) for g in grantees))
    assert len({r.id for r in results}) == len(grantees)
    racing = await asyncio.gather(grant("olga"), grant("olga"), return_exceptions=True)
    assert sorted(type(r).__name__ for r in racing) == ["DuplicateGrant", "License"]
    async with world.sm() as s:
        assert await read_version(s) == version + len(grantees) + 1


async def test_records_about_an_expert_are_found_by_its_owner(world: World) -> None:
    """Every governance record about an expert names it as `payload.expert`, which is what the
    ledger's expert filter and a data owner's scope match on."""
    from audit.query import RecordQuery, query_records

    async with world.sm() as s:
        lic = await grant_license(s, actor=OLGA, expert_id="code", grantee="group:research")
        den = await deny(s, actor=OLGA, expert_id="code", grantee="app-1")
        await revoke_license(s, actor=OLGA, license_id=lic.id)
        await withdraw_expert(s, actor=OLGA, expert_id="code")
        await reinstate_expert(s, actor=OLGA, expert_id="code")
    async with world.sm() as s:
        page = await query_records(s, RecordQuery.from_params({}, scope_experts=["code"]))
        by_expert = await query_records(
            s, RecordQuery.from_params({"expert": "code", "expert_mode": "any"})
        )
    kinds = [r.kind for r in page.records]
    for kind in ("expert.registered", "license.granted", "license.denied", "license.revoked"):
        assert kind in kinds
    assert kinds[-2:] == ["expert.withdrawn", "expert.reinstated"]
    assert all(r.payload.get("expert") == "code" for r in page.records)
    assert [r.seq for r in by_expert.records] == [r.seq for r in page.records]
    assert den.id in {r.payload.get("denial_id") for r in page.records}
