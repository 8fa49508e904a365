"""Two `flexgate serve` processes on one database behave as one service; SIGTERM is graceful.

Real subprocesses on loopback ports, a tiny checkpoint, a fresh database per backend (SQLite
file and, when FLEXGATE_TEST_DATABASE_URL is set, PostgreSQL; skipped with that reason
otherwise). The two servers of a service start once per backend and serve every test of this
module (starting a pair is most of each test's time); each test uses principals and experts
the others leave as they need them, and the SIGTERM test runs a server of its own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from audit.db import make_engine, make_sessionmaker
from audit.query import RecordQuery, query_records
from audit.verify import verify
from engine.checkpoints import build_tiny_checkpoint
from tests.conftest import fresh_database
from tests.integration.gw_servers import Server, completion, seed, spawn, start_server, wait_ready

pytestmark = pytest.mark.timeout(600)
IDS = ("public", "code", "news", "math")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(
        tmp_path_factory.mktemp("twoservers") / "tiny-flexolmo",
        expert_ids=IDS,
        max_position_embeddings=4096,
    )


@dataclass
class Service:
    db_url: str
    servers: list[Server]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def service(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, model_dir: Path
) -> Iterator[Service]:
    """Two servers (A, B) of one service: one database, one FLEXGATE_HOME (signing key); both
    must exit 0 on SIGTERM at the end."""
    root = tmp_path_factory.mktemp(f"service-{request.param}")
    with fresh_database(request, request.param, root) as db_url:
        home = root / "home"
        home.mkdir()
        keys = asyncio.run(seed(db_url, home))
        a = spawn(db_url, home, model_dir, keys)
        b = spawn(db_url, home, model_dir, keys)
        try:
            wait_ready(a, b)
            yield Service(db_url, [a, b])
        finally:
            a.terminate()
            b.terminate()
            codes = [a.stop(), b.stop()]
        assert codes == [0, 0], [s.log_tail(2000) for s in (a, b)]


async def sse_events(response: httpx.Response) -> AsyncIterator[Any]:
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


async def ledger(db_url: str, kind: str) -> list[Any]:
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            return (await query_records(s, RecordQuery(kind=kind, limit=1000))).records
    finally:
        await engine.dispose()


async def test_revocations_through_one_bite_on_the_next_request_to_the_other(
    service: Service,
) -> None:
    a, b = service.servers
    async with (
        a.client("root") as admin_a,
        a.client("owner-code") as owner_a,
        b.client("app-1") as app1_b,
        b.client("app-2") as app2_b,
    ):
        # license revoked through A -> excluded, zero usage, on the very next request to B
        r = await owner_a.post("/v1/experts/code/licenses", json={"grantee": "app-2"})
        assert r.status_code == 201, r.text
        license_id = r.json()["id"]
        r = await app2_b.post("/v1/completions", json=completion(max_tokens=6))
        assert r.status_code == 200, r.text
        assert "code" in r.json()["flexgate"]["experts"]["allowed"]
        r = await owner_a.delete(f"/v1/experts/code/licenses/{license_id}")
        assert r.status_code == 200, r.text
        r = await app2_b.post("/v1/completions", json=completion(max_tokens=6))
        assert r.status_code == 200, r.text
        fg = r.json()["flexgate"]
        assert fg["experts"]["excluded"]["code"] == "no-license"
        assert fg["usage"]["code"]["tokens"] == 0
        # key revoked through A -> 401 on the very next request to B
        r = await app1_b.post("/v1/completions", json=completion())
        assert r.status_code == 200, r.text
        key_id = a.keys["app-1"].split("_")[1]
        r = await admin_a.delete(f"/v1/admin/keys/{key_id}")
        assert r.status_code == 200, r.text
        r = await app1_b.post("/v1/completions", json=completion())
        assert r.status_code == 401, r.text
        assert set(r.json()["error"]) == {"message", "type", "code", "param"}


async def test_stream_on_one_is_narrowed_by_a_revocation_through_the_other(
    service: Service,
) -> None:
    a, b = service.servers
    async with a.client("owner-code") as owner_a, b.client("app-2", timeout=300) as app2_b:
        r = await owner_a.post("/v1/experts/code/licenses", json={"grantee": "app-2"})
        license_id = r.json()["id"]
        body = completion(max_tokens=1500, stream=True, prompt="Once upon a time")
        revoked_at: float | None = None
        last: Any = None
        chunks_after = 0
        async with app2_b.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200
            async for event in sse_events(resp):
                if event == "[DONE]":
                    break
                last = event
                if revoked_at is None and event.get("choices"):
                    r = await owner_a.delete(f"/v1/experts/code/licenses/{license_id}")
                    assert r.status_code == 200, r.text
                    revoked_at = time.monotonic()
                elif revoked_at is not None:
                    chunks_after += 1
        assert revoked_at is not None and chunks_after > 0
        fg = last["flexgate"]
        assert fg["experts"]["excluded"]["code"].startswith("revoked-"), fg
        records = await ledger(service.db_url, "inference")
        (record,) = [e for e in records if e.seq == fg["audit_seq"]]
        assert record.payload["experts_excluded"]["code"].startswith("revoked-")


async def test_both_append_to_one_gap_free_chain(service: Service) -> None:
    a, b = service.servers
    async with a.client("app-2") as ca, b.client("app-2") as cb:
        replies = await asyncio.gather(
            *(c.post("/v1/completions", json=completion(max_tokens=3)) for c in [ca, cb] * 6)
        )
    assert [r.status_code for r in replies] == [200] * 12
    seqs = sorted(int(r.headers["x-flexgate-audit-seq"]) for r in replies)
    assert len(set(seqs)) == 12
    async with a.client("officer") as officer:
        r = await officer.get("/v1/audit/verify")
        assert r.status_code == 200 and r.json()["ok"] is True, r.text
        head = r.json()["head_seq"]
        got: list[int] = []
        after = 0
        while True:
            page = (await officer.get(f"/v1/audit/records?limit=1000&after={after}")).json()
            got += [rec["seq"] for rec in page["records"]]
            if page["next_after"] is None:
                break
            after = page["next_after"]
    assert got == list(range(1, head + 1))  # gap-free, and every reply's record is in it
    assert set(seqs) <= set(got)


@pytest.mark.parametrize("db_url", ["sqlite", "postgresql"], indirect=True)
async def test_sigterm_lets_running_requests_finish_and_exits_0(
    db_url: str, tmp_path: Path, model_dir: Path
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    keys = await seed(db_url, home)
    server = await start_server(db_url, home, model_dir, keys)
    request_id = "req-sigterm-graceful"
    events: list[Any] = []
    async with server.client("app-2", timeout=300) as client:
        body = completion(max_tokens=400, stream=True, prompt="Once upon a time")
        async with client.stream(
            "POST", "/v1/completions", json=body, headers={"X-Request-Id": request_id}
        ) as resp:
            assert resp.status_code == 200
            async for event in sse_events(resp):
                events.append(event)
                if len(events) == 2:
                    server.terminate()  # SIGTERM while the stream runs
                    await asyncio.sleep(0.5)
                    with pytest.raises(httpx.HTTPError):  # no new connections
                        async with httpx.AsyncClient(timeout=2) as fresh:
                            await fresh.get(f"{server.url}/healthz")
    code = await asyncio.wait_for(server.wait(), 60)
    assert code == 0, server.log_tail()
    assert events[-1] == "[DONE]", events[-3:]
    final = events[-2]
    assert final["flexgate"]["audit_seq"] > 0
    records = [
        e for e in await ledger(db_url, "inference") if e.payload["request_id"] == request_id
    ]
    assert len(records) == 1 and records[0].payload["status"] == "ok"
    assert records[0].seq == final["flexgate"]["audit_seq"]
    engine = make_engine(db_url)
    try:
        async with make_sessionmaker(engine)() as s:
            from audit.signing import trusted_public_keys

            report = await verify(s, public_keys=trusted_public_keys(home), workers=1)
        assert report.ok, report
    finally:
        await engine.dispose()
