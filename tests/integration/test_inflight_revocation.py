"""A revocation committed by another process reaches a running generation within 1 s.

Real parts end to end: a tiny FlexOlmo checkpoint in the engine's scheduler thread, the
governance tables on SQLite and PostgreSQL, the PolicyWatcher polling the policy version, and
`flexgate licenses revoke` run as a separate process. The gateway's InflightRegistry narrows
the stream; the engine stops using the expert from its next decoding step.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from audit.db import make_engine, make_sessionmaker
from engine import Engine, TextDelta, load_engine
from engine.checkpoints import build_tiny_checkpoint
from gateway.inflight import REVOKED_PREFIX, InflightRegistry
from governance.experts import sync_experts
from governance.identity import Identity
from governance.licenses import grant_license
from governance.principals import add_principal
from governance.store import PolicyStore
from governance.watcher import PolicyWatcher

OPERATOR = Identity.operator()
OWNER = Identity("owner-code", frozenset({"data_owner"}))
IDS = ("public", "code", "news", "math")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A long context window, so the generation outlives the revocation by far.
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("inflight") / "model", expert_ids=IDS, max_position_embeddings=8192
    )


@pytest.fixture(scope="module")
def tiny_engine(model_dir: Path) -> Iterator[Engine]:
    eng = load_engine(model_dir)
    yield eng
    eng.close()


async def _revoke_in_another_process(db_url: str, model_dir: Path, license_id: str) -> float:
    env = {**os.environ, "FLEXGATE_DATABASE_URL": db_url, "FLEXGATE_MODEL": str(model_dir)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "licenses",
        "revoke",
        license_id,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (out, err)
    return time.monotonic()  # the revocation has committed and returned to its caller


async def test_revocation_narrows_a_running_generation_within_one_second(
    db_url: str, model_dir: Path, tiny_engine: Engine
) -> None:
    db = make_engine(db_url)
    sm = make_sessionmaker(db)
    try:
        async with sm() as s:
            await add_principal(s, actor=OPERATOR, principal_id="owner-code", roles=["data_owner"])
            await add_principal(s, actor=OPERATOR, principal_id="app-1", roles=["application"])
            await sync_experts(s, actor=OPERATOR, model_dir=model_dir)
            lic = await grant_license(s, actor=OWNER, expert_id="code", grantee="app-1")
        store = PolicyStore()
        async with sm() as s:
            snap = await store.snapshot(s)
        decision = snap.allowed_experts("app-1", purpose="general")
        assert decision.allowed == ("public", "code")

        registry = InflightRegistry()
        watcher = PolicyWatcher(sm, store, interval=0.1)
        watcher.subscribe(registry.on_policy_change)
        narrowed = asyncio.Event()  # set once the registry has narrowed the stream
        watcher.subscribe(lambda _: narrowed.set() if registry_narrowed() else None)
        prompt = [int(i) for i in tiny_engine.tokenizer("Shall I compare thee")["input_ids"]]
        stream = tiny_engine.stream(
            prompt, allowed=decision.allowed, max_tokens=6000, temperature=0, ignore_eos=True
        )
        entry = registry.register(
            "req-1",
            stream,
            principal="app-1",
            purpose="general",
            narrowing=None,
            policy_version=snap.version,
        )

        def registry_narrowed() -> bool:
            return entry.narrowed_monotonic is not None

        async with watcher:
            first = await anext(stream)  # generation is under way
            assert isinstance(first, TextDelta)
            committed = await _revoke_in_another_process(db_url, model_dir, lic.id)
            await asyncio.wait_for(narrowed.wait(), timeout=5)
            assert entry.narrowed_monotonic is not None
            latency = max(0.0, entry.narrowed_monotonic - committed)
            assert latency <= 1.0, f"revocation took {latency:.2f} s to reach the generation"
            assert stream.allowed == ("public",)
            for _ in range(3):  # a few decoding steps under the narrowed set
                await anext(stream)
            stream.cancel()
            result = await stream.collect()
        registry.finish("req-1")

        assert entry.revoked == {"code": REVOKED_PREFIX + "no-license"}
        assert entry.revoked_at_version is not None and entry.revoked_at_version > snap.version
        assert result.narrowed == ("code",) and result.allowed == ("public",)
        assert result.usage is not None
        assert result.usage["code"][0] > 0, "code was used before the revocation"
        assert result.usage["news"] == (0, 0.0) and result.usage["math"] == (0, 0.0)
        assert result.finish_reason == "cancelled"
        assert result.completion_tokens < 6000
    finally:
        await db.dispose()
