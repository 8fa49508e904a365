"""The app factory, probes, the error shape and the route policy's coverage of every route."""

from __future__ import annotations

from pathlib import Path

from litestar import Litestar
from litestar.testing import AsyncTestClient

from contracts.settings import Settings
from gateway.app import create_app
from gateway.guards import casbin_path
from governance import policy

IGNORED_METHODS = {"OPTIONS", "HEAD"}


def _app() -> Litestar:
    return create_app(
        Settings(
            home=Path("/nonexistent"), database_url="sqlite+aiosqlite://", model_dir=Path("/x")
        )
    )


def app_routes(app: Litestar) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for route in app.routes:
        for method in getattr(route, "methods", ()):
            if method not in IGNORED_METHODS:
                out.add((casbin_path(route.path), method))
    return out


def rule_routes() -> set[tuple[str, str]]:
    return {(path, method) for _sub, path, method in policy.route_rules()}


def test_casbin_path() -> None:
    assert casbin_path("/v1/experts/{id:str}/licenses/{license_id:str}") == (
        "/v1/experts/:id/licenses/:license_id"
    )
    assert casbin_path("/v1/models") == "/v1/models"


def test_every_route_has_a_rule() -> None:
    missing = sorted(app_routes(_app()) - rule_routes())
    assert not missing, f"routes without a line in governance/route_policy.csv: {missing}"


def test_every_rule_has_a_route() -> None:
    missing = sorted(rule_routes() - app_routes(_app()))
    assert not missing, f"route_policy.csv lines without a route: {missing}"


async def test_probes_and_error_shape(gw_client: AsyncTestClient[Litestar]) -> None:
    r = await gw_client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert r.headers["x-request-id"].startswith("req_")
    r = await gw_client.get("/readyz", headers={"X-Request-Id": "abc-123"})
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"model": "ok", "database": "ok", "ledger": "ok"}
    assert r.headers["x-request-id"] == "abc-123"
    r = await gw_client.get("/no/such/route")
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "code", "param"}
    r = await gw_client.get("/schema/openapi.json")
    assert r.status_code == 200 and r.json()["info"]["title"] == "FlexGate"


async def test_readyz_503_when_database_gone(
    gw_client: AsyncTestClient[Litestar], gw_app: Litestar
) -> None:
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    good = gw_app.state.sessionmaker
    gw_app.state.sessionmaker = async_sessionmaker(
        create_async_engine("sqlite+aiosqlite:////nonexistent/dir/x.db")
    )
    try:
        r = await gw_client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["database"].startswith("unreachable")
    finally:
        gw_app.state.sessionmaker = good


async def test_readyz_503_when_ledger_refused_to_sign(
    gw_client: AsyncTestClient[Litestar], gw_app: Litestar
) -> None:
    ledger = gw_app.state.ledger
    before = getattr(ledger, "signing_refused", None)
    ledger.signing_refused = "key file mode 0644"
    try:
        r = await gw_client.get("/readyz")
        assert r.status_code == 503
        assert "signing refused" in r.json()["checks"]["ledger"]
    finally:
        ledger.signing_refused = before
