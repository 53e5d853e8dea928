"""ID token validation rules (OpenID Connect Core 3.1.3.7), with keys served over loopback."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.common.configfile import parse_yaml
from services.extauth.oidc.config import OidcConfig, parse_oidc
from services.extauth.oidc.provider import IdTokenInvalid, OidcProviderClient

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
NONCE = "n-0S6_WzA2Mj"
ACCESS_TOKEN = "SlAV32hkKG"


def _jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = pyjwt.algorithms.RSAAlgorithm if alg.startswith("RS") else pyjwt.algorithms.ECAlgorithm
    data = json.loads(algo.to_jwk(key.public_key()))
    return {**data, "kid": kid, "use": "sig", "alg": alg}


def _at_hash(token: str) -> str:
    digest = hashlib.sha256(token.encode()).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@pytest.fixture
async def jwks_url() -> AsyncIterator[str]:
    async def jwks(_request: web.Request) -> web.Response:
        return web.json_response(
            {"keys": [_jwk(RSA_KEY, "rsa-1", "RS256"), _jwk(EC_KEY, "ec-1", "ES256")]}
        )

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/jwks"
    await runner.cleanup()


def _config(tmp_path: Path, jwks_url: str) -> OidcConfig:
    (tmp_path / "client").write_text("secret")
    (tmp_path / "cookies").write_text("c" * 40)
    text = f"""
provider:
  issuer: https://idp.example.com
  authorizationEndpoint: https://idp.example.com/auth
  tokenEndpoint: https://idp.example.com/token
  jwksURI: {jwks_url}
clientID: app
clientSecretFile: {tmp_path / "client"}
redirectURL: https://app.example.com/cb
cookieSecretFile: {tmp_path / "cookies"}
"""
    return parse_oidc(parse_yaml(text, "t.yaml")[0])


def _claims(**change: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "https://idp.example.com",
        "sub": "alice",
        "aud": "app",
        "exp": now + 300,
        "iat": now,
        "nonce": NONCE,
        "at_hash": _at_hash(ACCESS_TOKEN),
    }
    claims.update(change)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(
    claims: dict[str, Any], *, key: Any = RSA_KEY, alg: str = "RS256", kid: str = "rsa-1"
) -> str:
    return pyjwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


async def _validate(cfg: OidcConfig, token: str, nonce: str | None = NONCE) -> dict[str, Any]:
    client = OidcProviderClient(cfg)
    try:
        return await client.validate_id_token(
            token, nonce=nonce, access_token=ACCESS_TOKEN, now=time.time()
        )
    finally:
        await client.close()


async def test_valid_tokens(tmp_path: Path, jwks_url: str) -> None:
    cfg = _config(tmp_path, jwks_url)
    assert (await _validate(cfg, _sign(_claims())))["sub"] == "alice"
    ec_token = _sign(_claims(), key=EC_KEY, alg="ES256", kid="ec-1")
    assert (await _validate(cfg, ec_token))["sub"] == "alice"
    multi = _sign(_claims(aud=["app", "other"], azp="app"))
    assert (await _validate(cfg, multi))["sub"] == "alice"


def _hs256_with_public_key() -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","kid":"rsa-1"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(_claims()).encode()).rstrip(b"=")
    return f"{header.decode()}.{body.decode()}.c2ln"


def _unsigned() -> str:
    header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(_claims()).encode()).rstrip(b"=")
    return f"{header.decode()}.{body.decode()}."


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("wrong nonce", lambda: _sign(_claims(nonce="other"))),
        ("missing nonce", lambda: _sign(_claims(nonce=None))),
        ("wrong audience", lambda: _sign(_claims(aud="someone-else"))),
        ("wrong issuer", lambda: _sign(_claims(iss="https://evil.example.com"))),
        ("expired", lambda: _sign(_claims(exp=int(time.time()) - 3600))),
        ("missing exp", lambda: _sign(_claims(exp=None))),
        ("missing iat", lambda: _sign(_claims(iat=None))),
        ("wrong at_hash", lambda: _sign(_claims(at_hash=_at_hash("another-token")))),
        ("foreign azp", lambda: _sign(_claims(aud=["app", "other"], azp="other"))),
        ("azp missing for multi aud", lambda: _sign(_claims(aud=["other", "app2"]))),
        ("unknown kid", lambda: _sign(_claims(), kid="nope")),
        ("alg none", _unsigned),
        ("HS256 confusion", _hs256_with_public_key),
        ("alg/key mismatch", lambda: _sign(_claims(), key=EC_KEY, alg="ES256", kid="rsa-1")),
        ("tampered payload", lambda: _sign(_claims())[:-10] + "AAAAAAAAAA"),
    ],
)
async def test_invalid_tokens(tmp_path: Path, jwks_url: str, name: str, token: Any) -> None:
    cfg = _config(tmp_path, jwks_url)
    with pytest.raises(IdTokenInvalid):
        await _validate(cfg, token())
