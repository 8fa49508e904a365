"""Rate limits, telemetry and trace ids through HTTP (in-process app, SQLite and PostgreSQL)."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, ClassVar

import pytest
from gw_helpers import completion
from litestar import Litestar
from litestar.testing import AsyncTestClient
from mgmt_helpers import is_openai_error, ledger_head, session_on

from audit.query import RecordQuery, query_records
from gateway.limits import Limiter
from governance.identity import Identity

Client = AsyncTestClient[Litestar]


def key_id(token: str) -> str:
    return token.split("_")[1]


async def set_limits(client: Client, world: Any, who: str, **limits: int) -> None:
    r = await client.put(
        f"/v1/admin/keys/{key_id(world.keys[who])}/limits",
        json=limits,
        headers=world.headers("admin"),
    )
    assert r.status_code == 200, r.text


async def test_rpm_limit_429_with_retry_after_and_nothing_appended(
    gw_client: Client, gw_world: Any
) -> None:
    await set_limits(gw_client, gw_world, "app-1", rpm=2)
    app = gw_world.headers("app-1")
    remaining = []
    for _ in range(2):
        r = await gw_client.post("/v1/completions", json=completion(max_tokens=2), headers=app)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit-requests"] == "2"
        assert r.headers["x-ratelimit-limit-tokens"] == str(gw_world.settings.rate_tpm)
        assert "x-ratelimit-reset-requests" in r.headers
        assert "x-ratelimit-reset-tokens" in r.headers
        remaining.append(r.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["1", "0"]
    before = await ledger_head(gw_world.settings.database_url)
    r = await gw_client.post("/v1/completions", json=completion(max_tokens=2), headers=app)
    assert r.status_code == 429, r.text
    assert is_openai_error(r.json())
    assert r.json()["error"]["type"] == "rate_limit_error"
    # one request per 30 s at 2 rpm, less what refilled while the two ran
    assert 20 <= int(r.headers["retry-after"]) <= 30
    assert r.headers["x-ratelimit-remaining-requests"] == "0"
    assert await ledger_head(gw_world.settings.database_url) == before
    # another key of the same service is not affected
    r = await gw_client.post(
        "/v1/completions", json=completion(max_tokens=2), headers=gw_world.headers("app-2")
    )
    assert r.status_code == 200, r.text


async def test_tpm_counts_prompt_and_completion(gw_client: Client, gw_world: Any) -> None:
    await set_limits(gw_client, gw_world, "app-1", tpm=40)
    app = gw_world.headers("app-1")
    r = await gw_client.post("/v1/completions", json=completion(max_tokens=50), headers=app)
    assert r.status_code == 429 and r.json()["error"]["code"] == "request_too_large", r.text
    assert "retry-after" not in r.headers
    r = await gw_client.post("/v1/completions", json=completion(max_tokens=8), headers=app)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    estimate = usage["prompt_tokens"] + 8
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 40 - estimate
    # the bucket is settled with what was used: the next request sees the refund
    r = await gw_client.post("/v1/completions", json=completion(max_tokens=1), headers=app)
    assert r.status_code == 200, r.text
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    remaining = int(r.headers["x-ratelimit-remaining-tokens"])
    assert 40 - used - r.json()["usage"]["prompt_tokens"] - 1 <= remaining <= 40


async def test_stream_carries_rate_headers(gw_client: Client, gw_world: Any) -> None:
    r = await gw_client.post(
        "/v1/completions",
        json=completion(max_tokens=3, stream=True),
        headers=gw_world.headers("app-1"),
    )
    assert r.status_code == 200, r.text
    assert r.text.rstrip().endswith("data: [DONE]")
    assert r.headers["x-ratelimit-limit-requests"] == str(gw_world.settings.rate_rpm)


async def test_parallel_limit_shared_with_another_worker(gw_client: Client, gw_world: Any) -> None:
    """A request of the key running in another worker (a Limiter of its own on the same
    database) holds the key's one parallel slot: this worker refuses, then admits once the
    other ends."""
    await set_limits(gw_client, gw_world, "app-1", max_parallel=1)
    other = Limiter(gw_world.settings, owner="otherhost:1")
    app = gw_world.headers("app-1")
    try:
        held = await other.admit(Identity("app-1"), key_id(gw_world.keys["app-1"]), 10)
        r = await gw_client.post("/v1/completions", json=completion(max_tokens=2), headers=app)
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        assert "at a time" in r.json()["error"]["message"]
        await held.release(0)
        r = await gw_client.post("/v1/completions", json=completion(max_tokens=2), headers=app)
        assert r.status_code == 200, r.text
        r = await gw_client.post("/v1/completions", json=completion(max_tokens=2), headers=app)
        assert r.status_code == 200, r.text  # the previous request's lease was released
    finally:
        await other.close()


async def test_trace_id_in_record_and_metrics(gw_client: Client, gw_world: Any) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    r = await gw_client.post(
        "/v1/completions",
        json=completion(max_tokens=3),
        headers={
            **gw_world.headers("app-1"),
            "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
        },
    )
    assert r.status_code == 200, r.text
    seq = int(r.headers["x-flexgate-audit-seq"])
    async with session_on(gw_world.settings.database_url) as s:
        page = await query_records(s, RecordQuery(kind="inference", limit=1000))
    (record,) = [e for e in page.records if e.seq == seq]
    assert record.payload["trace_id"] == trace_id
    # a request without traceparent gets a trace of its own
    r = await gw_client.post(
        "/v1/completions", json=completion(max_tokens=2), headers=gw_world.headers("app-1")
    )
    assert r.status_code == 200
    r = await gw_client.get("/metrics", headers=gw_world.headers("admin"))
    assert r.status_code == 200
    text = r.text
    kid = key_id(gw_world.keys["app-1"])
    for name in (
        "gen_ai_server_request_duration_seconds_count",
        "gen_ai_server_time_to_first_token_seconds_count",
        "gen_ai_server_time_per_output_token_seconds_count",
        "gen_ai_client_token_usage",
        "flexgate_expert_tokens",
        "flexgate_expert_weight",
    ):
        assert name in text, name
    assert 'gen_ai_operation_name="text_completion"' in text
    assert 'gen_ai_request_model="tiny-flexolmo"' in text
    lines = [ln for ln in text.splitlines() if ln.startswith("flexgate_expert_tokens")]
    assert any(f'key_id="{kid}"' in ln and 'expert="public"' in ln for ln in lines), lines
    r = await gw_client.get("/metrics", headers=gw_world.headers("app-1"))
    assert r.status_code == 403 and is_openai_error(r.json())


class _Collector(http.server.BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).paths.append(self.path)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[str]]]:
    _Collector.paths = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Collector.paths
    finally:
        server.shutdown()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_otlp_export_only_when_endpoint_set(
    gw_world: Any, gw_engine: Any, collector: tuple[str, list[str]]
) -> None:
    from gateway.app import create_app

    endpoint, received = collector
    # without the endpoint: nothing is sent anywhere
    app = create_app(gw_world.settings, engine=gw_engine)
    async with AsyncTestClient(app=app) as client:
        r = await client.post(
            "/v1/completions", json=completion(max_tokens=2), headers=gw_world.headers("app-1")
        )
        assert r.status_code == 200
        assert app.state.telemetry.exporting is False
    assert received == []
    app = create_app(replace(gw_world.settings, otel_endpoint=endpoint), engine=gw_engine)
    async with AsyncTestClient(app=app) as client:
        r = await client.post(
            "/v1/completions", json=completion(max_tokens=2), headers=gw_world.headers("app-1")
        )
        assert r.status_code == 200
    # leaving the lifespan flushed both exporters
    assert "/v1/traces" in received and "/v1/metrics" in received, received
