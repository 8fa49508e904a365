"""JWT bearer tokens: issuer, audience, expiry, signature against a JWKS file or URL.

The URL case fetches the JWKS from a real HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from sqlalchemy.ext.asyncio import AsyncSession

from governance.auth import authenticate
from governance.errors import AuthenticationFailed
from governance.oidc import JwtVerifier, OidcSettings

ISSUER = "https://idp.example.test/realms/flexgate"
AUDIENCE = "flexgate"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _jwks() -> dict[str, Any]:
    rsa_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    ec_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(EC_KEY.public_key()))
    rsa_jwk.update(kid="rsa-1", alg="RS256", use="sig")
    ec_jwk.update(kid="ec-1", alg="ES256", use="sig")
    return {"keys": [rsa_jwk, ec_jwk]}


def _token(
    claims: dict[str, Any] | None = None,
    *,
    key: Any = RSA_KEY,
    kid: str = "rsa-1",
    alg: str = "RS256",
    drop: tuple[str, ...] = (),
) -> str:
    now = int(time.time())
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "app-9",
        "roles": ["application", "superuser"],
        "iat": now,
        "exp": now + 300,
        **(claims or {}),
    }
    for name in drop:
        body.pop(name, None)
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


@pytest.fixture
def jwks_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(_jwks()))
    return path


@pytest.fixture
def jwks_url() -> Iterator[str]:
    body = json.dumps(_jwks()).encode()
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/realms/flexgate/certs"
    finally:
        server.shutdown()
        server.server_close()
    assert hits, "the JWKS was never fetched"


def _verifier(jwks: str, **kw: Any) -> JwtVerifier:
    return JwtVerifier(OidcSettings(issuer=ISSUER, audience=AUDIENCE, jwks=jwks, **kw))


@pytest.mark.parametrize("source", ["file", "url"])
async def test_valid_tokens_map_claims_to_identity(
    source: str, request: pytest.FixtureRequest
) -> None:
    jwks = str(request.getfixturevalue("jwks_file" if source == "file" else "jwks_url"))
    verifier = _verifier(jwks)
    who = await verifier.verify(_token())
    assert (who.id, who.roles, who.via) == ("app-9", frozenset({"application"}), "jwt")
    ec_who = await verifier.verify(_token(key=EC_KEY, kid="ec-1", alg="ES256"))
    assert ec_who.id == "app-9"
    # through the one authenticate() the gateway calls (the key path is not taken)
    no_db = cast(AsyncSession, None)
    assert (await authenticate(no_db, f"Bearer {_token()}", jwt=verifier)).id == "app-9"


async def test_claim_names_are_configurable(jwks_file: Path) -> None:
    verifier = _verifier(str(jwks_file), principal_claim="azp", roles_claim="realm_access.roles")
    token = _token({"azp": "svc-1", "realm_access": {"roles": ["data_owner"]}, "roles": []})
    who = await verifier.verify(token)
    assert (who.id, who.roles) == ("svc-1", frozenset({"data_owner"}))
    spaced = await _verifier(str(jwks_file)).verify(_token({"roles": "admin application"}))
    assert spaced.roles == {"admin", "application"}


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (lambda: _token({"iss": "https://evil.example"}), "issuer"),
        (lambda: _token({"aud": "someone-else"}), "audience"),
        (lambda: _token({"exp": int(time.time()) - 120}), "expired"),
        (lambda: _token(drop=("exp",)), "exp"),
        (lambda: _token(drop=("aud",)), "aud"),
        (lambda: _token(key=OTHER_KEY), "Signature"),
        (lambda: _token(kid="unknown"), "no matching key"),
        (lambda: _token({"sub": "group:admins"}), "not a valid id"),
        (lambda: _token({"sub": 42}), "subject must be a string"),
        # a symmetric (HMAC) token: never accepted, a JWKS holds public keys
        (
            lambda: jwt.encode(
                {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": int(time.time()) + 60},
                "x" * 32,
                algorithm="HS256",
                headers={"kid": "rsa-1"},
            ),
            "invalid JWT",
        ),
        (lambda: "not.a.jwt", "invalid JWT"),
    ],
)
async def test_bad_tokens_fail(jwks_file: Path, token: Any, reason: str) -> None:
    with pytest.raises(AuthenticationFailed, match="(?i)" + reason):
        await _verifier(str(jwks_file)).verify(token())


def test_settings_from_environment() -> None:
    assert OidcSettings.from_env({}) is None
    s = OidcSettings.from_env(
        {
            "FLEXGATE_OIDC_ISSUER": ISSUER,
            "FLEXGATE_OIDC_AUDIENCE": AUDIENCE,
            "FLEXGATE_OIDC_JWKS": "https://idp/certs",
            "FLEXGATE_OIDC_ROLES_CLAIM": "groups",
        }
    )
    assert s is not None and (s.roles_claim, s.principal_claim) == ("groups", "sub")


def test_settings_are_the_process_settings_read_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Governance reads FLEXGATE_MODEL and the OIDC variables through contracts.settings:
    once per process, so a later change of the environment does not move it."""
    from contracts.settings import settings
    from governance.experts import served_model_dir

    monkeypatch.setenv("FLEXGATE_MODEL", str(tmp_path / "one"))
    monkeypatch.setenv("FLEXGATE_OIDC_ISSUER", ISSUER)
    monkeypatch.setenv("FLEXGATE_OIDC_AUDIENCE", AUDIENCE)
    monkeypatch.setenv("FLEXGATE_OIDC_JWKS", str(tmp_path / "jwks.json"))
    settings.cache_clear()
    assert served_model_dir() == (tmp_path / "one").resolve()
    oidc = OidcSettings.from_settings()
    assert oidc is not None and (oidc.issuer, oidc.audience) == (ISSUER, AUDIENCE)
    monkeypatch.setenv("FLEXGATE_MODEL", str(tmp_path / "two"))
    monkeypatch.delenv("FLEXGATE_OIDC_ISSUER")
    assert served_model_dir() == (tmp_path / "one").resolve()  # read once
    assert OidcSettings.from_settings() is not None
    settings.cache_clear()
    assert served_model_dir() == (tmp_path / "two").resolve()
    assert OidcSettings.from_settings() is None
