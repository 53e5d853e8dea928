"""Credentials for a benchmark run: a signing key and tokens, htpasswd users, API keys.

Generated fresh for every run (nothing secret is stored in the repository) and written
to the run directory: ``data.json`` for the locustfiles (``--outrider-data``), the JWKS,
the htpasswd text and the key list for the sidecar and the native filters.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .envoy_configs import JWT_AUDIENCE, JWT_ISSUER

JSON_BODY_BYTES = 10 * 1024
TOKENS = 50
BASIC_USERS = 50
API_KEYS = 50
KID = "bench-1"


@dataclass(frozen=True)
class Material:
    jwks: dict[str, Any]
    jwt_tokens: tuple[str, ...]
    basic_users: tuple[tuple[str, str], ...]
    htpasswd_sha: str  # "user:{SHA}..." lines: the one format Envoy's basic_auth reads
    api_keys: dict[str, str]  # client id → key

    def locust_data(self) -> dict[str, Any]:
        return {
            "jwt_tokens": list(self.jwt_tokens),
            "basic_users": [list(u) for u in self.basic_users],
            "api_keys": list(self.api_keys.values()),
        }

    def write_locust_data(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.locust_data(), f)


def _sha_htpasswd_line(user: str, password: str) -> str:
    digest = base64.b64encode(hashlib.sha1(password.encode()).digest()).decode()
    return f"{user}:{{SHA}}{digest}"


def generate(lifetime_s: int = 24 * 3600) -> Material:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    public_jwk.update({"kid": KID, "alg": "RS256", "use": "sig"})
    now = int(time.time())
    tokens = tuple(
        jwt.encode(
            {
                "iss": JWT_ISSUER,
                "aud": JWT_AUDIENCE,
                "sub": f"user-{i}",
                "iat": now,
                "exp": now + lifetime_s,
                "scope": "read write",
            },
            key,
            algorithm="RS256",
            headers={"kid": KID},
        )
        for i in range(TOKENS)
    )
    users = tuple((f"user{i}", secrets.token_urlsafe(12)) for i in range(BASIC_USERS))
    htpasswd = "\n".join(_sha_htpasswd_line(u, p) for u, p in users) + "\n"
    keys = {f"client-{i}": secrets.token_urlsafe(24) for i in range(API_KEYS)}
    return Material(
        jwks={"keys": [public_jwk]},
        jwt_tokens=tokens,
        basic_users=users,
        htpasswd_sha=htpasswd,
        api_keys=keys,
    )


def json_body(size: int = JSON_BODY_BYTES) -> bytes:
    """A JSON document of exactly ``size`` bytes with a card number to redact (extproc-json)."""
    doc: dict[str, object] = {
        "card": {"number": "4111111111111111", "holder": "Ada Lovelace"},
        "items": [],
        "note": "",
    }
    items: list[dict[str, object]] = doc["items"]  # type: ignore[assignment]
    while len(json.dumps(doc)) < size - 64:
        items.append({"sku": f"sku-{len(items):05d}", "qty": len(items) % 7 + 1})
    doc["note"] = "x" * (size - len(json.dumps(doc)))
    body = json.dumps(doc).encode()
    assert len(body) == size, len(body)
    return body


JSON_BODY = json_body()
JSON_HEADERS = {"content-type": "application/json"}
