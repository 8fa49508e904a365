"""A server SIGKILLed mid-stream leaves `inference.started`; the next server on this host
closes it with `inference.aborted`, and the chain verifies (real `flexgate serve` processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from audit.db import make_engine, make_sessionmaker
from audit.query import RecordQuery, query_records
from engine.checkpoints import build_tiny_checkpoint
from gateway.inference.records import open_streams
from tests.integration.gw_servers import REPO, completion, seed, start_server


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("killmodel") / "tiny-flexolmo", max_position_embeddings=4096
    )


async def _records(db_url: str, kind: str) -> list[object]:
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            return list((await query_records(s, RecordQuery(kind=kind, limit=1000))).records)
    finally:
        await engine.dispose()


@pytest.mark.slow
async def test_sigkill_mid_stream_then_restart_appends_aborted(
    db_url: str, tmp_path: Path, long_model: Path
) -> None:
    home = tmp_path / "home"
    keys = await seed(db_url, home)
    server = await start_server(db_url, home, long_model, keys)
    try:
        async with (
            server.client("app-1") as client,
            client.stream(
                "POST",
                "/v1/completions",
                json=completion(prompt="The", max_tokens=4000, stream=True),
            ) as r,
        ):
            assert r.status_code == 200
            started_seq = int(r.headers["x-flexgate-audit-started-seq"])
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 3:  # tokens have left the server: now it dies
                    os.kill(server.proc.pid, signal.SIGKILL)
                    break
        await server.wait()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            await server.wait()
    started = [e for e in await _records(db_url, "inference.started") if e.seq == started_seq]
    assert len(started) == 1 and started[0].payload["worker"]["pid"] == server.proc.pid
    ended = [
        e
        for e in await _records(db_url, "inference")
        if e.payload.get("started_seq") == started_seq
    ]
    assert ended == []

    again = await start_server(db_url, home, long_model, keys)
    try:
        aborted = [
            e
            for e in await _records(db_url, "inference.aborted")
            if e.payload["started_seq"] == started_seq
        ]
        assert len(aborted) == 1
        assert aborted[0].payload["request_id"] == started[0].payload["request_id"]
        assert aborted[0].payload["closed_by"]["pid"] == again.proc.pid
        # and it is no longer open, so no later start aborts it again
        engine = make_engine(db_url)
        try:
            state = SimpleNamespace(sessionmaker=make_sessionmaker(engine))
            assert started_seq not in {e.seq for e in await open_streams(state)}
        finally:
            await engine.dispose()
    finally:
        await asyncio.to_thread(again.stop)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "FLEXGATE_DATABASE_URL": db_url,
        "FLEXGATE_HOME": str(home),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "audit",
        "verify",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (out, err)
