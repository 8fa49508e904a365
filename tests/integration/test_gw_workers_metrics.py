"""/metrics answers for the whole server: `flexgate serve --workers 2`, requests served by
both workers, and every scrape (whichever worker takes it) counts all of them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from gw_servers import completion, seed, start_server
from prometheus_client.parser import text_string_to_metric_families

from audit.db import make_engine, make_sessionmaker
from audit.query import RecordQuery, query_records
from engine.checkpoints import build_tiny_checkpoint

pytestmark = pytest.mark.timeout(600)
IDS = ("public", "code", "news", "math")


def _total(text: str, family: str, sample: str) -> float:
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == family
        for s in f.samples
        if s.name == sample
    )


async def _worker_pids(db_url: str) -> set[int]:
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            page = await query_records(s, RecordQuery(kind="inference.started", limit=1000))
    finally:
        await engine.dispose()
    return {int(e.payload["worker"]["pid"]) for e in page.records}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_every_scrape_counts_the_requests_of_all_workers(db_url: str, tmp_path: Path) -> None:
    model_dir = build_tiny_checkpoint(tmp_path / "tiny-flexolmo", expert_ids=IDS)
    home = tmp_path / "home"
    home.mkdir()
    keys = await seed(db_url, home)
    server = await start_server(db_url, home, model_dir, keys, workers=2)
    try:
        sent = 0
        # a fresh connection per request, until both workers have served (streams record
        # their worker in `inference.started`)
        while sent < 60 and (sent < 4 or len(await _worker_pids(db_url)) < 2):
            async with server.client("app-1") as c:
                r = await c.post("/v1/completions", json=completion(max_tokens=2, stream=True))
                assert r.status_code == 200, r.text
            sent += 1
        assert len(await _worker_pids(db_url)) == 2, "one worker took every connection"
        for _ in range(4):
            async with server.client("root") as admin:
                r = await admin.get("/metrics")
            assert r.status_code == 200, r.text
            assert _total(r.text, "flexgate_requests", "flexgate_requests_total") == sent
            count = "gen_ai_server_request_duration_seconds_count"
            assert _total(r.text, "gen_ai_server_request_duration_seconds", count) == sent
        async with httpx.AsyncClient(base_url=server.url) as anonymous:
            assert (await anonymous.get("/metrics")).status_code == 401
        folders = list((home / "metrics").iterdir())
        assert [f.name for f in folders] == [str(server.proc.pid)]
        assert list(folders[0].glob("*.db")), "the workers write nothing to the folder"
    finally:
        assert await asyncio.to_thread(server.stop) == 0, server.log_tail()
    assert not (home / "metrics" / str(server.proc.pid)).exists()  # removed at exit
