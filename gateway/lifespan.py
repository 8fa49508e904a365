"""Start-up and shut-down of a worker, in order, and back in reverse.

Up: database engine -> schema at the migrations' head (else refuse to start) -> the model's
experts registered (governance, idempotent) -> engine loaded off the event loop (or the one a
test injected) -> ledger writer (with the checkpoint signing key) -> streams of this host's
dead workers closed with `inference.aborted` -> policy store, in-flight registry and policy
watcher (subscribed to the registry, so a revocation narrows running streams). Down: watcher,
running streams cancelled, ledger writer drained and closed, engine closed (if we loaded
it), database disposed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from litestar import Litestar

from audit.db import ensure_schema_current, make_engine, make_sessionmaker
from audit.signing import Signer
from audit.writer import LedgerWriter
from contracts.settings import Settings
from gateway.guards import route_snapshot
from gateway.inference.prompts import Tokenizer
from gateway.inflight import InflightRegistry
from gateway.versions import VersionReads
from gateway.workers import WorkerId
from governance.experts import ensure_registered
from governance.identity import SYSTEM_REGISTRY, Identity
from governance.keys import KeyCache
from governance.oidc import JwtVerifier, OidcSettings
from governance.store import PolicyStore
from governance.watcher import PolicyWatcher

log = logging.getLogger(__name__)


def _load_engine(settings: Settings) -> Any:
    # On a short-lived thread: torch's import and the weight reads stay off the event loop,
    # and the thread ends (see DESIGN.md, "Threads").
    from engine import load_engine

    return load_engine(settings.model_dir, device_map=settings.device)


def _gateway_tokenizer(engine: Any) -> Tokenizer:
    """A tokenizer of the gateway's own (the engine's belongs to its scheduler thread)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(engine.model_dir))
    config = engine.config
    return Tokenizer(tok, int(config.vocab_size), int(config.max_position_embeddings))


def _created(engine: Any) -> int:
    try:
        return int((engine.model_dir / "config.json").stat().st_mtime)
    except OSError:
        return 0


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    state = app.state
    settings: Settings = state.settings
    async with AsyncExitStack() as stack:
        db = make_engine(settings.database_url)
        stack.push_async_callback(db.dispose)
        await ensure_schema_current(db)
        sessionmaker = make_sessionmaker(db)
        state.db, state.sessionmaker = db, sessionmaker
        async with sessionmaker() as session:
            report = await ensure_registered(
                session, actor=Identity.operator(SYSTEM_REGISTRY), model_dir=settings.model_dir
            )
        if report is not None:
            log.info("experts registered: %s", report.registered or report.updated)

        engine = state.get("injected_engine")
        if engine is None:
            loaded = await asyncio.to_thread(_load_engine, settings)
            stack.callback(loaded.close)
            engine = loaded
        state.engine = engine
        state.model_name = settings.served_model_name
        state.tokenizer = await asyncio.to_thread(_gateway_tokenizer, engine)
        state.model_created = _created(engine)
        state.stream_tasks = set()

        signer = await asyncio.to_thread(Signer.load_or_create, settings.home)
        ledger = LedgerWriter(
            db,
            signer=signer,
            checkpoint_every=settings.audit_checkpoint_every,
            checkpoint_interval_s=settings.audit_checkpoint_seconds,
        )
        await ledger.start()
        stack.push_async_callback(ledger.close)
        state.ledger = ledger

        state.worker = WorkerId.current()
        from gateway.inference.records import close_dead_streams

        closed = await close_dead_streams(state)
        if closed:
            log.warning("appended inference.aborted for %d stream(s) of dead workers", closed)

        oidc = OidcSettings.from_env()
        state.jwt = JwtVerifier(oidc) if oidc is not None else None
        state.key_cache = KeyCache()
        state.versions = VersionReads(sessionmaker, db)
        stack.push_async_callback(state.versions.close)
        state.routes = route_snapshot()
        state.policy = PolicyStore()
        inflight = InflightRegistry()
        state.inflight = inflight
        stack.push_async_callback(drain_streams, state)
        watcher = PolicyWatcher(sessionmaker, state.policy, interval=settings.policy_poll_s)
        watcher.subscribe(inflight.on_policy_change)
        async with sessionmaker() as session:
            await state.policy.snapshot(session)
        watcher.start()
        stack.push_async_callback(watcher.stop)
        state.watcher = watcher
        state.ready = True
        try:
            yield
        finally:
            state.ready = False


async def drain_streams(state: Any) -> None:
    """Records of streams abandoned at shut-down are appended before the writer closes."""
    tasks = list(state.get("stream_tasks") or ())
    if tasks:
        await asyncio.wait(tasks, timeout=30)
