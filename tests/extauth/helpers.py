"""Keys, tokens, htpasswd files and a controllable JWKS server for the extauth tests."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt as pyjwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from passlib.hash import sha256_crypt, sha512_crypt

from services.extauth.config import load_config
from services.extauth.core import CheckRequest
from tests.harness.procs import free_port, replace_text

ISSUER = "https://idp.test"
AUDIENCE = "api://outrider"


@dataclass
class SigningKey:
    kid: str
    private: Any
    alg: str

    def public_jwk(self) -> dict[str, Any]:
        algo = (
            pyjwt.algorithms.RSAAlgorithm
            if self.alg.startswith(("RS", "PS"))
            else pyjwt.algorithms.ECAlgorithm
        )
        jwk = json.loads(algo.to_jwk(self.private.public_key()))
        jwk.update({"kid": self.kid, "use": "sig"})
        return jwk

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return pyjwt.encode(
            claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})}
        )


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.public_jwk() for k in keys]}


def claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 600}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(payload: dict[str, Any], kid: str = "k1") -> str:
    """``alg: none`` with an empty signature (what PyJWT refuses to make for us)."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(payload).encode())}."


def hs256_with_public_key(key: SigningKey, payload: dict[str, Any]) -> str:
    """The key-confusion attack: HS256 keyed with the RSA public key's PEM."""
    import hashlib
    import hmac

    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": key.kid}).encode())
    body = b64url(json.dumps(payload).encode())
    sig = hmac.new(key.public_pem(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(sig)}"


def tamper(token: str, **changes: Any) -> str:
    header, payload, sig = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data.update(changes)
    return f"{header}.{b64url(json.dumps(data).encode())}.{sig}"


# -- htpasswd ------------------------------------------------------------------------
def apache_htpasswd(path: Path, users: dict[str, tuple[str, str]], bcrypt_cost: int = 5) -> None:
    """Write ``path`` with Apache's real ``htpasswd``; users: name → (flag, password).

    flag is ``-B`` (bcrypt), ``-m`` ($apr1$) or ``-s`` ({SHA}); ``sha256``/``sha512``
    entries ($5$/$6$, which htpasswd cannot make) are written with passlib.
    """
    path.touch()
    for user, (flag, password) in users.items():
        if flag in ("sha256", "sha512"):
            scheme = sha256_crypt if flag == "sha256" else sha512_crypt
            with path.open("a") as f:
                f.write(f"{user}:{scheme.using(rounds=5000).hash(password)}\n")
            continue
        extra = ["-C", str(bcrypt_cost)] if flag == "-B" else []
        subprocess.run(
            ["htpasswd", "-b", flag, *extra, str(path), user, password],
            check=True,
            capture_output=True,
        )


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- requests ------------------------------------------------------------------------
def request(
    policy: str | None = "p",
    headers: dict[str, str] | None = None,
    path: str = "/",
    source: str = "127.0.0.1",
    method: str = "GET",
) -> CheckRequest:
    return CheckRequest(
        method=method,
        path=path,
        host="example.test",
        scheme="http",
        headers={k.lower(): v for k, v in (headers or {}).items()},
        source_address=source,
        context_extensions={"policy": policy} if policy else {},
    )


def write_config(directory: Path, policies: dict[str, Any]) -> Path:
    import yaml

    path = directory / "extauth.yaml"
    replace_text(path, yaml.safe_dump({"policies": policies}, sort_keys=False))
    return path


def config_from(directory: Path, policies: dict[str, Any]):
    return load_config(write_config(directory, policies))


# -- JWKS server ---------------------------------------------------------------------
@dataclass
class JWKSServer:
    """A real HTTP JWKS endpoint on loopback, in its own thread and event loop.

    ``mode``: ``ok`` serves ``document``; ``down`` answers 503; ``hang`` never answers.
    """

    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    mode: str = "ok"
    fetches: int = 0
    #: requests held unanswered right now (``hang``)
    hanging: int = 0
    port: int = field(default_factory=free_port)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _stopping: bool = False

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    async def _handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.mode == "down":
            return web.Response(status=503, text="down")
        # polled: mode and _stopping are flipped from the test thread, not this loop
        self.hanging += 1
        try:
            while self.mode == "hang" and not self._stopping:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        finally:
            self.hanging -= 1
        if self._stopping:
            return web.Response(status=503, text="stopping")
        return web.json_response(self.document)

    def start(self) -> JWKSServer:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/jwks.json", self._handle)
            self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
            loop.run_until_complete(self._runner.setup())
            loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name="jwks-server")
        self._thread.start()
        assert ready.wait(10), "JWKS server did not start"
        return self

    def stop(self) -> None:
        self._stopping = True
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop = None


class EngineHarness:
    """The real engine with its real deps (JWKS registry, aiohttp session), no transport."""

    def __init__(self, config: Any, **service_kw: Any) -> None:
        from prometheus_client import CollectorRegistry

        from services.extauth.metrics import ExtauthMetrics
        from services.extauth.service import ExtauthService

        self.registry = CollectorRegistry()
        self.service = ExtauthService(ExtauthMetrics(self.registry), **service_kw)
        self.config = config

    async def __aenter__(self) -> EngineHarness:
        await self.service.start(self.config)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.service.stop()

    async def check(self, req: CheckRequest):
        return await self.service.decide(req, "test")

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0
